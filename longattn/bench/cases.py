"""The benchmark inputs of each op, built from the settings (one ``Case`` per op and sequence length).

Every implementation of a case (longattn backends and baselines) reads the same tensors, so timings and
``--check`` errors compare like with like. Layout is longattn's ``(B, S, H, D)``.

Ops and what they mirror (DESIGN.md section 5's standard shapes):

- ``local``:      LongT5 local attention: ``window=r`` (default 127), a relative bias table, ``scale=1``.
- ``longformer``: Longformer / LED: ``window=w`` (default 256, HF ``attention_window=2w``) plus ``globals``
                  global tokens (default 1, at position 0; more are spread evenly over the sequence).
- ``tglobal``:    LongT5 transient-global: ``window=r`` plus ``G = S // block_size`` side keys (block sums),
                  band and side bias tables, ``scale=1``.
- ``aggregate``:  LongT5's block sums + RMS norm of ``(B, S, H*D)`` hidden states into ``G`` blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

OPS = ("local", "longformer", "tglobal", "aggregate")
DEFAULT_WINDOW = {"local": 127, "longformer": 256, "tglobal": 127, "aggregate": 127}
# T5's relative-position buckets (LongT5 defaults); the bias tables are looked up from bucket embeddings so
# the HF modules, given the same embeddings, compute exactly the same biases (needed by --check).
NUM_BUCKETS = 32
MAX_DISTANCE = 128


@dataclass
class Settings:
    """Shape settings shared by every case of a sweep (``window=None``: the op's default)."""

    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    window: int | None = None
    globals: int = 1
    block_size: int = 16
    bias: bool = True  # False: local / tglobal without their relative-position bias tables
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    seed: int = 0


@dataclass
class Case:
    """The inputs of one op at one sequence length. Tensors are leaves; ``grad_names`` need gradients."""

    op: str
    B: int
    S: int
    H: int
    D: int
    window: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    scale: float | None
    tensors: dict = field(default_factory=dict)
    globals: int = 0
    block_size: int = 0
    num_blocks: int = 0

    @property
    def grad_names(self) -> tuple[str, ...]:
        """The inputs every implementation differentiates (the same for all, so backward times compare)."""
        if self.op == "aggregate":
            return ("x",)
        if self.op == "tglobal":
            return ("q", "k", "v", "side_k", "side_v")
        return ("q", "k", "v")

    def label(self) -> str:
        extra = {"longformer": f" globals={self.globals}", "tglobal": f" block={self.block_size}",
                 "aggregate": f" block={self.block_size}"}.get(self.op, "")
        return f"{self.op} B={self.B} S={self.S} H={self.H} D={self.D} window={self.window[0]}{extra}"


def script_settings(on_gpu: bool, args=None) -> Settings:
    """The shape of the benchmark scripts beside the bench (``benchmarks/profile_ops.py``, ``host_profile.py``):
    DESIGN.md's standard shape on a GPU (B=1, H=12, D=64, bf16), a small float32 one on CPU (their plumbing runs).
    ``args``: the parsed ``add_script_arguments`` options, whose ``--window`` and ``--no-bias`` apply."""
    window, bias = (None, True) if args is None else (args.window, not args.no_bias)
    if on_gpu:
        return Settings(heads=12, head_dim=64, dtype=torch.bfloat16, device="cuda", window=window, bias=bias)
    return Settings(heads=2, head_dim=32, dtype=torch.float32, device="cpu", window=window, bias=bias)


def add_script_arguments(parser, on_gpu: bool, seqlen_gpu: int, seqlen_cpu: int) -> None:
    """The scripts' shared options: ``--seqlen``, ``--op`` and ``--backend`` (comma lists; see ``script_choices``),
    ``--window`` (one side; default the op's, ``DEFAULT_WINDOW``) and ``--no-bias`` (local / tglobal without their
    bias tables: with both, the local op is the band pass Longformer runs, as in the bench's target 4 rows)."""
    parser.add_argument("--seqlen", type=int, default=seqlen_gpu if on_gpu else seqlen_cpu)
    parser.add_argument("--op", default=",".join(OPS))
    parser.add_argument("--backend", default="triton,cuda" if on_gpu else "torch")
    parser.add_argument("--window", type=int, default=None, help="window, one side (default: the op's)")
    parser.add_argument("--no-bias", action="store_true", help="local / tglobal without their bias tables")


def script_choices(parser, args) -> tuple[list[str], list[str]]:
    """(ops, backends) of ``add_script_arguments``' options; an unknown op is the parser's error."""
    ops = [o for o in args.op.split(",") if o]
    if set(ops) - set(OPS):
        parser.error(f"--op: unknown {sorted(set(ops) - set(OPS))}; expected some of {OPS}")
    return ops, [b for b in args.backend.split(",") if b]


def t5_relative_bucket(relative_position: torch.Tensor, num_buckets: int = NUM_BUCKETS,
                       max_distance: int = MAX_DISTANCE) -> torch.Tensor:
    """T5's bidirectional relative-position bucket (the formula of HF's ``_relative_position_bucket``)."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    n = relative_position.abs()
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, n, large)


def global_positions(S: int, G: int) -> torch.Tensor:
    """Positions of ``G`` global tokens: 0 for one (Longformer's CLS), else spread evenly from 0 to S-1."""
    if G <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.unique(torch.linspace(0, S - 1, min(G, S)).round().long())


def build_case(op: str, S: int, settings: Settings) -> Case:
    """The inputs of ``op`` at sequence length ``S`` (random, seeded: every run sees the same numbers)."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    st = settings
    device = torch.device(st.device)
    w = DEFAULT_WINDOW[op] if st.window is None else st.window
    gen = torch.Generator().manual_seed(st.seed + S)
    B, H, D = st.batch, st.heads, st.head_dim

    def randn(*shape, scale=1.0):
        # Generated on the CPU with a seeded generator (same numbers on every device), then moved.
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=st.dtype)

    case = Case(op=op, B=B, S=S, H=H, D=D, window=(w, w), dtype=st.dtype, device=device, scale=None)
    t = case.tensors
    if op == "aggregate":
        ids, _ = _block_ids(B, S, st.block_size, device)
        case.block_size, case.num_blocks = st.block_size, S // st.block_size
        t["x"] = randn(B, S, H * D)
        t["block_ids"] = ids
        t["weight"] = 1.0 + 0.1 * randn(H * D)
        return case
    t["q"], t["k"], t["v"] = randn(B, S, H, D), randn(B, S, H, D), randn(B, S, H, D)
    if op == "longformer":
        pos = global_positions(S, st.globals)
        mask = torch.zeros(B, S, dtype=torch.bool)
        mask[:, pos] = True
        case.globals = len(pos)
        t["global_mask"], t["global_pos"] = mask.to(device), pos.to(device)
        return case
    # LongT5 ops: no 1/sqrt(d) scaling; bias tables from random bucket embeddings, as the HF modules do.
    case.scale = 1.0
    # Scores of O(1) inputs with scale 1 are O(sqrt(D)); scale q down so softmax is not one-hot.
    t["q"] = t["q"] * D**-0.5
    t["bucket_emb"] = randn(NUM_BUCKETS, H)
    offsets = torch.arange(-w, w + 1, device=device)
    t["rel_bias"] = t["bucket_emb"][t5_relative_bucket(offsets)].T.contiguous()  # (H, 2w+1)
    if op == "tglobal":
        ids, block_mask = _block_ids(B, S, st.block_size, device)
        G = S // st.block_size
        case.block_size, case.num_blocks = st.block_size, G
        t["side_k"], t["side_v"] = randn(B, G, H, D), randn(B, G, H, D)
        t["query_block"], t["side_mask"] = ids, block_mask
        t["side_bucket_emb"] = randn(NUM_BUCKETS, H)
        side_offsets = torch.arange(-G, G + 1, device=device)
        t["side_bias"] = t["side_bucket_emb"][t5_relative_bucket(side_offsets)].T.contiguous()  # (H, 2G+1)
    if not st.bias:  # the tables are drawn all the same, so the other inputs are the biased case's
        for name in ("bucket_emb", "rel_bias", "side_bucket_emb", "side_bias"):
            t.pop(name, None)
    return case


def padding_mask(lengths, S: int, device) -> torch.Tensor:
    """``(B, S)`` bool, True at the first ``lengths[b]`` positions of row b (a right-padded ragged batch)."""
    return (torch.arange(S)[None] < torch.tensor(list(lengths))[:, None]).to(device)


def _block_ids(B: int, S: int, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    from ..api import tglobal_block_ids

    return tglobal_block_ids(torch.ones(B, S, dtype=torch.bool, device=device), block_size)


def leaves(case: Case, requires_grad: bool) -> dict:
    """Fresh leaf copies of the case's tensors (``grad_names`` requiring grad when asked)."""
    out = {}
    for name, value in case.tensors.items():
        if name in case.grad_names:
            value = value.detach().requires_grad_(requires_grad)
        out[name] = value
    return out
