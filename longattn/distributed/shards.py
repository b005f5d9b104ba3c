"""``SeqShards``: which contiguous slice of the sequence each rank of a process group holds.

Rank ``r`` of the group holds global positions ``[bounds[r], bounds[r+1])``; every sharded tensor a rank passes
to ``longattn.distributed`` is its *local* slice, ``(B, S_r, ...)`` with ``S_r = bounds[r+1] - bounds[r]``.
Windows, block ids and global-token positions keep the meaning they have on the unsharded sequence.

Before any data moves, every op runs :meth:`SeqShards.agree`: one all-gather of a few int64 per rank that
carries each rank's local-check verdict and a fingerprint of the call (sizes, window, dtype, options). A rank
with bad input, or ranks that disagree, make *every* rank raise the same ``ValueError`` instead of leaving the
others blocked in a collective until its timeout. Inside ``sequence_parallel`` the layers' checks run once per
forward for each distinct fingerprint (:meth:`SeqShards.agreed_once`), after its entry check compared the models.
"""

from __future__ import annotations

import copy
import math
import zlib

import torch
import torch.distributed as dist

from . import _comm


def _process_group(group):
    """A ProcessGroup from a ProcessGroup, a 1-D DeviceMesh or None (the default group)."""
    if group is None:
        if not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised (call init_process_group first)")
        return dist.group.WORLD
    mesh_type = getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)
    if mesh_type is not None and isinstance(group, mesh_type):
        if group.ndim != 1:
            raise ValueError(f"group: expected a 1-D DeviceMesh (e.g. mesh['cp']), got a {group.ndim}-D mesh "
                             f"of shape {tuple(group.shape)}")
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(f"group: expected a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")


class SeqShards:
    """A process group (or 1-D DeviceMesh) plus the contiguous shard bounds of the sequence.

    Args:
        group: a ``torch.distributed`` ProcessGroup, a 1-D ``DeviceMesh``, or None for the default group.
        bounds: ``(0, b_1, ..., b_{P-1}, S)``, strictly increasing (every shard holds at least one token: pad the
            sequence with masked tokens instead of leaving a rank empty), ``P + 1`` entries for a group of P.
        verify: run the cross-rank agreement check (one tiny all-gather) at every call; ``False`` skips it
            once a setup is known to be good (a bad call may then block until the collective timeout).
    """

    def __init__(self, group, bounds, *, verify: bool = True):
        self.group = _process_group(group)
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        try:
            bounds = tuple(int(b) for b in bounds)
        except (TypeError, ValueError):
            raise TypeError(f"bounds: expected a sequence of ints, got {bounds!r}") from None
        if len(bounds) != self.size + 1:
            raise ValueError(f"bounds: expected {self.size + 1} entries for a group of {self.size} ranks, "
                             f"got {len(bounds)}: {bounds}")
        if bounds[0] != 0 or any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
            raise ValueError(f"bounds: expected 0 = b_0 < b_1 < ... < b_P = S (no empty shard), got {bounds}")
        self.bounds = bounds
        self.verify = bool(verify)
        self._agreed: set | None = None  # see agreed_once

    @classmethod
    def even(cls, S: int, group=None, *, multiple_of: int = 1, verify: bool = True) -> SeqShards:
        """Shards of ``ceil(S / (P * m)) * m`` tokens (``m = multiple_of``), the last one shorter.

        Raises ``ValueError`` when that leaves a rank empty: pad ``S`` (with masked tokens) first.
        """
        pg = _process_group(group)
        P = dist.get_world_size(pg)
        if isinstance(S, bool) or not isinstance(S, int) or S <= 0:
            raise ValueError(f"S: expected a positive int, got {S!r}")
        if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of <= 0:
            raise ValueError(f"multiple_of: expected a positive int, got {multiple_of!r}")
        chunk = math.ceil(S / (P * multiple_of)) * multiple_of
        bounds = tuple(min(r * chunk, S) for r in range(P + 1))
        if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
            raise ValueError(f"S: {S} tokens in shards of {chunk} (multiple_of={multiple_of}) leave a rank of {P} "
                             f"empty (bounds {bounds}); pad the sequence to at least {(P - 1) * chunk + 1}")
        return cls(pg, bounds, verify=verify)

    @property
    def seq_len(self) -> int:
        """``S``, the length of the whole sequence."""
        return self.bounds[-1]

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    @property
    def local_len(self) -> int:
        return self.stop - self.start

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice ``[start, stop)`` of a whole-sequence tensor along ``dim`` (a view, no copy)."""
        return x.narrow(dim, self.start, self.local_len)

    def __repr__(self) -> str:
        return f"SeqShards(rank={self.rank}/{self.size}, bounds={self.bounds})"

    def agreed_once(self) -> SeqShards:
        """A copy whose :meth:`agree` runs its all-gather once per distinct call fingerprint, until
        :meth:`forget_agreed` (``sequence_parallel`` calls it at every forward of its model).

        Only for callers that know the ranks make the same sequence of calls with inputs that, once they agreed
        for a fingerprint, cannot start to disagree before the next ``forget_agreed``: the layers of one
        forward, whose shapes, dtypes and options are fixed by the forward's inputs and the model (both
        checked by ``sequence_parallel``), and their recomputes under gradient checkpointing (the same calls
        again, maybe after another forward: every rank's cache holds the same digests, since each was added on
        every rank by one all-gather they all passed, so every rank hits or misses together). A rank with a
        local error still runs the all-gather (so do the others, at the first call of each fingerprint); were a
        rank to meet a fingerprint the others had already agreed on while its own differs, it would block in the
        all-gather instead of raising.
        """
        other = copy.copy(self)
        other._agreed = set()
        return other

    def forget_agreed(self) -> None:
        """Make the next call of each fingerprint run the agreement all-gather again (no-op without a cache)."""
        if self._agreed is not None:
            self._agreed.clear()

    def agree(self, what: str, fingerprint: tuple, error: Exception | None, device) -> None:
        """Make all ranks raise together if any rank's input is bad or the ranks disagree on ``fingerprint``.

        ``error`` is this rank's local validation error (or None); ``fingerprint`` holds what must be equal on
        every rank (sizes, window, dtype, options). Skipped (the local error raised directly) when
        ``verify=False`` or ``P = 1``.
        """
        if self.size == 1 or not self.verify or torch.compiler.is_compiling():  # (a host sync: not traced)
            if error is not None:
                raise error
            return
        digest = zlib.crc32(repr((what, fingerprint)).encode())
        if error is None and self._agreed is not None and digest in self._agreed:
            return  # all ranks agreed on this fingerprint earlier in this forward (agreed_once)
        mine = torch.tensor([0 if error is None else 1, digest], dtype=torch.int64, device=device)
        allr = _comm.all_gather_ints(mine, self.group).cpu().tolist()
        if error is not None:
            raise error
        bad = [r for r, (e, _) in enumerate(allr) if e]
        if bad:
            raise ValueError(f"seq_parallel: rank(s) {bad} of the group rejected their input to {what} "
                             f"(see the error raised there); this rank ({self.rank}) stops too")
        if len({d for _, d in allr}) != 1:
            raise ValueError(f"seq_parallel: the ranks disagree on the arguments of {what} (window, sizes, dtype or "
                             f"options); this rank ({self.rank}) has {fingerprint}")
        if self._agreed is not None:
            self._agreed.add(digest)


def check_shards(seq_parallel) -> SeqShards:
    if not isinstance(seq_parallel, SeqShards):
        raise TypeError(f"seq_parallel: expected a longattn.distributed.SeqShards, got {type(seq_parallel).__name__}")
    return seq_parallel


def check_local(name: str, x, shards: SeqShards, dim: int = 1) -> None:
    """``x.shape[dim]`` must be this rank's shard length (a local slice, not the whole sequence)."""
    if x is not None and isinstance(x, torch.Tensor) and x.dim() > dim and x.shape[dim] != shards.local_len:
        raise ValueError(f"{name}: expected this rank's shard of {shards.local_len} tokens along dim {dim} "
                         f"(bounds {shards.bounds}, rank {shards.rank}), got shape {tuple(x.shape)}")
