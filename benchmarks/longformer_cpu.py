"""Issue-2 measurement: the torch backend vs HF's LongformerSelfAttention on CPU (not a test).

fp32, B=1, H=12, D=64, S=4096, attention_window=512 (window 256), one global token (position 0).
Forward+backward of the attention layer (projections included on both sides: the same nn.Linear weights),
median of several runs; peak memory as the growth of the process's max RSS (each implementation runs in its
own subprocess so the two peaks do not mix).

    python benchmarks/longformer_cpu.py [--seqlen 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def build(seqlen, heads=12, head_dim=64, seed=0):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    torch.manual_seed(seed)
    E = heads * head_dim
    config = LongformerConfig(hidden_size=E, num_attention_heads=heads, attention_window=[512],
                              attention_probs_dropout_prob=0.0)
    module = LongformerSelfAttention(config, layer_id=0).eval()
    hidden = torch.randn(1, seqlen, E, requires_grad=True)
    is_global = torch.zeros(1, seqlen, dtype=torch.bool)
    is_global[0, 0] = True
    return module, hidden, is_global


def run_hf(module, hidden, is_global):
    mask = torch.zeros(is_global.shape)
    mask[is_global] = 10000.0
    out = module(hidden, attention_mask=mask, is_index_masked=torch.zeros_like(is_global),
                 is_index_global_attn=is_global, is_global_attn=True)[0]
    return out


def run_longattn(module, hidden, is_global):
    import longattn

    B, S, E = hidden.shape
    H = module.num_heads

    def proj(layer):
        return layer(hidden).view(B, S, H, E // H)

    out = longattn.longformer_attention(
        proj(module.query), proj(module.key), proj(module.value), 256, is_global,
        q_global=proj(module.query_global), k_global=proj(module.key_global), v_global=proj(module.value_global),
        backend="torch")
    return out.reshape(B, S, E)


def measure(impl, seqlen, repeats):
    module, hidden, is_global = build(seqlen)
    fn = run_hf if impl == "hf" else run_longattn
    grad = torch.randn(1, seqlen, hidden.shape[-1])
    fn(module, hidden, is_global).backward(grad)  # warm-up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(module, hidden, is_global).backward(grad)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"impl": impl, "median_s": statistics.median(times), "min_s": min(times),
            "peak_rss_growth_mib": (peak - base) / 1024, "peak_rss_mib": peak / 1024}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impl", choices=["hf", "longattn"])
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(measure(args.impl, args.seqlen, args.repeats)))
        return
    results = []
    for impl in ("hf", "longattn"):
        out = subprocess.run([sys.executable, __file__, "--impl", impl, "--seqlen", str(args.seqlen),
                              "--repeats", str(args.repeats)], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in results:
        print(f"{r['impl']:>9}: fwd+bwd median {r['median_s'] * 1e3:8.1f} ms (min {r['min_s'] * 1e3:.1f}), "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    hf, ours = results
    ratio = ours['peak_rss_mib'] / hf['peak_rss_mib']
    print(f"speed-up {hf['median_s'] / ours['median_s']:.2f}x, peak RSS ratio {ratio:.2f}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
