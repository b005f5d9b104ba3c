"""CPU speed and peak memory of a patched vs stock Hugging Face LED encoder forward (random weights).

    python benchmarks/model_cpu.py                      # S=4096, 2 layers, d_model 256, 4 heads, window 512
    python benchmarks/model_cpu.py --seq 8192 --json out.json
    python benchmarks/model_cpu.py --layers-only        # the encoder layers alone (see below)

Each variant runs in its own subprocess, so its peak resident memory (``ru_maxrss``) is its own: the reported
peak is that high-water mark minus the resident memory just before the first forward (model and inputs already
built). ``--layers-only`` times the encoder layers alone, fed the (B, S) masks they receive: the stock
``LEDEncoder.forward`` first builds its 2-D mask by materialising (B, 1, S, S) float tensors (4 S^2 bytes
each), which the patched model avoids (``apply_longattn`` swaps that mask helper for one computing the row
alone). Time is the median of ``--repeats`` forwards after one warm-up, under ``torch.no_grad()``. Not a test:
numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _run_variant(args) -> dict:
    import torch
    from transformers import LEDConfig, LEDModel

    import longattn

    torch.manual_seed(0)
    config = LEDConfig(vocab_size=1000, d_model=args.hidden, encoder_layers=args.layers, decoder_layers=1,
                       encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
                       encoder_ffn_dim=4 * args.hidden, decoder_ffn_dim=4 * args.hidden,
                       attention_window=args.window, max_encoder_position_embeddings=args.seq,
                       max_decoder_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    encoder = LEDModel(config).get_encoder().eval()
    if args.variant == "patched":
        longattn.apply_longattn(encoder, backend=args.backend)
    ids = torch.randint(3, 1000, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1  # one global token, as a classification head would use
    run = lambda: encoder(input_ids=ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state
    if args.layers_only:
        run = _layers_runner(encoder, ids, glob)
    before = _rss_bytes()
    times = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"variant": args.variant, "median_s": statistics.median(times[1:]), "times_s": times[1:],
            "peak_extra_mib": max(0, peak - before) / 2**20, "probe": out[0, :16, 0].tolist(),
            "threads": torch.get_num_threads()}


def _layers_runner(encoder, ids, glob):
    """A closure running only ``encoder.layers`` on embedded inputs with the (B, S) masks they receive."""
    import torch

    hidden = encoder.layernorm_embedding(encoder.embed_tokens(ids) + encoder.embed_positions(ids.shape))
    is_global = glob.bool()
    is_masked = torch.zeros_like(is_global)
    mask_2d = torch.where(is_global, torch.finfo(hidden.dtype).max, 0.0)

    def run():
        h = hidden
        for layer in encoder.layers:
            h = layer(h, attention_mask=mask_2d, is_index_masked=is_masked, is_index_global_attn=is_global,
                      is_global_attn=True)[0]
        return h

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--window", type=int, default=512, help="HF attention_window (two-sided)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--layers-only", action="store_true", help="time the encoder layers alone")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--variant", choices=["stock", "patched"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # child process: one variant, result as JSON on stdout
        print(json.dumps(_run_variant(args)))
        return
    results = []
    for variant in ("stock", "patched"):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--variant", variant]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    stock, patched = results
    what = "LED encoder layers" if args.layers_only else "LED encoder"
    print(f"{what} forward, B={args.batch} S={args.seq} layers={args.layers} d_model={args.hidden} "
          f"heads={args.heads} attention_window={args.window} fp32, {stock['threads']} threads")
    print(f"{'variant':<8} {'median s':>9} {'peak extra MiB':>15}")
    for r in results:
        print(f"{r['variant']:<8} {r['median_s']:>9.3f} {r['peak_extra_mib']:>15.1f}")
    diff = max(abs(a - b) for a, b in zip(stock["probe"], patched["probe"]))
    print(f"speed-up {stock['median_s'] / patched['median_s']:.2f}x, peak memory "
          f"{stock['peak_extra_mib'] / max(patched['peak_extra_mib'], 1e-9):.2f}x less; "
          f"max |stock - patched| on 16 probe outputs: {diff:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
