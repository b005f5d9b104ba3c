"""Sequence parallelism over NCCL on the GPU (issue 15's GPU checks); skipped without a CUDA device.

- P = 1 over NCCL is bitwise equal to the plain ops, for each kernel backend (the sequence-parallel path hands a
  one-rank call to the plain op; this checks that nothing on the way, e.g. the agreement check's collective,
  changes the result or syncs differently on a GPU).
- With two or more GPUs, P = 2 runs the halo-reading kernels across ranks and matches the fp64 oracle within the
  tolerance rule (bf16; the baseline is the torch backend's single-process op in bf16).

The CPU tests of every case are ``test_distributed.py`` (gloo); the halo kernels' own GPU tests are in
``test_cuda_halo.py`` / ``test_triton_halo.py``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import longattn
import longattn.distributed as ld
from tests.tolerance import assert_within_rule

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]

B, S, H, D = 1, 4096, 4, 64


def _inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(device, dtype) for _ in range(3))
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    mask[:, S - 100:] = False
    glob = torch.zeros(B, S, dtype=torch.bool, device=device)
    glob[:, [0, S // 2 + 1, S - 200]] = True
    return q, k, v, mask, glob


def _calls(q, k, v, mask, glob, backend, **sp):
    return {
        "local": lambda: longattn.local_attention(q, k, v, 256, key_padding_mask=mask, backend=backend, **sp),
        "longformer": lambda: longattn.longformer_attention(q, k, v, 256, glob, key_padding_mask=mask, max_globals=4,
                                                            backend=backend, **sp),
    }


def _worker(rank, world, store, backend, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        q, k, v, mask, glob = _inputs(f"cuda:{rank}", torch.bfloat16)
        sh = ld.SeqShards.even(S, dist.group.WORLD, multiple_of=256)
        a, b = sh.start, sh.stop
        plain = {n: f() for n, f in _calls(q, k, v, mask, glob, backend).items()}
        base = {n: f() for n, f in _calls(q, k, v, mask, glob, "torch").items()}  # the tolerance rule's baseline
        oracle = {n: f() for n, f in _calls(q.double(), k.double(), v.double(), mask, glob, "torch").items()}
        local = _calls(q[:, a:b], k[:, a:b], v[:, a:b], mask[:, a:b], glob[:, a:b], backend, seq_parallel=sh)
        got = {n: f() for n, f in local.items()}
        torch.save({n: tuple(x.cpu() for x in (got[n], plain[n][:, a:b], base[n][:, a:b], oracle[n][:, a:b]))
                    for n in got}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(world, backend, tmp_path):
    reasons = longattn.available_backends("cuda")[backend]
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available in this torch build")
    mp.start_processes(_worker, args=(world, str(tmp_path / "store"), backend, str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    return [torch.load(tmp_path / f"{r}.pt") for r in range(world)]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_p1_over_nccl_is_bitwise_the_plain_op(backend, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    (results,) = _run(1, backend, tmp_path)
    for name, (got, plain, _, _) in results.items():
        assert torch.equal(got, plain), name


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_p2_over_nccl_matches_the_plain_op(backend, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (NCCL runs one rank per device)")
    for results in _run(2, backend, tmp_path):
        for name, (got, _, base, oracle) in results.items():
            assert_within_rule(name, got, base, oracle)
