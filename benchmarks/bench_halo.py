"""What reading the halo in place costs (issue 15's GPU target: <= 3 % over the plain band op at S_r = 131072).

    python benchmarks/bench_halo.py [--seqlen 131072] [--window 256] [--backend triton,cuda] [--json OUT]

One rank's band work, no process group: ``S_r`` query rows of one shard, per backend and pass (fwd, fwd+bwd),
timed three ways on the same q, k, v:

- ``plain``: ``local_attention`` on the shard alone (its edge rows see fewer keys): the reference cost;
- ``halo``: the same rows with ``window`` keys on each side in a halo buffer, read in place by the kernels (what
  ``seq_parallel`` runs, ``longattn.distributed.band``); the overhead is ``halo / plain - 1``;
- ``copy``: what sequence parallelism ran before the kernels read the halo: the op on ``[halo | shard | halo]``
  copied into one tensor, with zero query rows for the halo.

Writes a JSON (device, versions, commit, shapes, times) with ``--json``; prints a table. Timing: CUDA events
(GPU) or wall clock (CPU), median of ``longattn.bench.timing.time_call``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import longattn
from longattn import api
from longattn.bench.output import run_info
from longattn.bench.timing import time_call


def _inputs(S, H, D, W, device, dtype, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(requires_grad)

    return rand(1, S, H, D), rand(1, S, H, D), rand(1, S, H, D), rand(1, 2 * W, H, D), rand(1, 2 * W, H, D)


def _calls(q, k, v, hk, hv, W, backend):
    def plain():
        return api._band_side(*api._local_inputs(q, k, v, W, None, None, None, 0.0, backend))

    def halo():
        return api._band_side(*api._local_inputs(q, k, v, W, None, None, None, 0.0, backend), halo=(hk, hv, None, W))

    def copy():
        k_ext, v_ext = torch.cat([hk[:, :W], k, hk[:, W:]], 1), torch.cat([hv[:, :W], v, hv[:, W:]], 1)
        q_ext = torch.nn.functional.pad(q, (0, 0, 0, 0, W, W))
        return longattn.local_attention(q_ext, k_ext, v_ext, W, backend=backend)[:, W:-W]

    return {"plain": plain, "halo": halo, "copy": copy}


def _fwd_bwd(fn, leaves):
    def run():
        out = fn()
        return torch.autograd.grad(out, leaves, torch.ones_like(out))
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=131072, help="S_r, the shard's rows")
    p.add_argument("--window", type=int, default=256, help="left = right = halo width on each side")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--backend", default="triton,cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    S, W = args.seqlen, args.window
    records = []
    for backend in args.backend.split(","):
        reasons = longattn.dispatch.unsupported_reasons(backend, device, dtype, args.head_dim, "band_side",
                                                        ("halo",))
        if reasons:
            records.append(dict(backend=backend, status="not run", reason="; ".join(reasons)))
            continue
        for which in ("fwd", "fwdbwd"):
            tensors = _inputs(S, args.heads, args.head_dim, W, device, dtype, which == "fwdbwd")
            row = dict(backend=backend, S_r=S, window=W, H=args.heads, D=args.head_dim, dtype=args.dtype,
                       status="ok", **{"pass": which})
            for name, fn in _calls(*tensors, W, backend).items():
                leaves = list(tensors[:3] if name == "plain" else tensors)  # plain reads no halo
                run = _fwd_bwd(fn, leaves) if which == "fwdbwd" else torch.no_grad()(fn)
                try:
                    row[f"{name}_ms"] = time_call(run, device, min_run_time=args.min_run_time).median_s * 1e3
                except (RuntimeError, ValueError) as e:  # e.g. out of memory for the copy path
                    row[f"{name}_ms"], row[f"{name}_error"] = None, str(e).splitlines()[0]
            if row.get("halo_ms") and row.get("plain_ms"):
                row["halo_overhead"] = row["halo_ms"] / row["plain_ms"] - 1.0
            records.append(row)
    print(f"{'backend':<8}{'pass':<8}{'plain ms':>10}{'halo ms':>10}{'copy ms':>10}{'halo overhead':>15}")
    for r in records:
        if r["status"] != "ok":
            print(f"{r['backend']:<8}not run: {r['reason']}")
            continue
        fmt = lambda x: "-" if x is None else f"{x:.3f}"
        over = r.get("halo_overhead")
        print(f"{r['backend']:<8}{r['pass']:<8}{fmt(r.get('plain_ms')):>10}{fmt(r.get('halo_ms')):>10}"
              f"{fmt(r.get('copy_ms')):>10}{'-' if over is None else f'{over * 100:+.1f} %':>15}")
    if args.json:
        info = run_info(dict(vars(args), device=str(device)))
        with open(args.json, "w") as f:
            json.dump({**info, "results": records}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
