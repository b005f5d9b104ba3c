"""``longattn bench``: argument parsing and the entry point (the work lives in the sibling modules).

Three modes:

- ops (default): ``longattn bench [--op local,longformer,tglobal,aggregate] [--seqlen 4096,16384] ...``
  times each longattn backend and each baseline on each op (see ``runner`` and ``impls``).
- model: ``longattn bench --model led|longt5-local|longt5-tglobal [--layers 2] ...`` times a stack of
  stock vs patched encoder layers (see ``model``); ``--model modernbert|mistral|gemma3 [--size base|tiny]
  [--kv-heads N] [--sliding-only]`` times one random HF model under ``sdpa``, ``flex_attention``, ``eager`` and
  ``attn_implementation="longattn"`` (see ``hf_model``).
- ragged: ``longattn bench --ragged [2048,16384,4096,9000] [--op ...|--model led|longt5-local|longt5-tglobal]``
  times a right-padded batch of those lengths padded, packed (the ``*_varlen`` ops / ``apply_longattn(packed=True)``),
  one sequence at a time and by stock HF (see ``ragged``).
- report: ``longattn bench --report`` writes the README results table and plot from the latest GPU run
  saved in ``benchmarks/results/`` (see ``report``).

Defaults: on a GPU, DESIGN.md section 5's standard shapes (B=1, H=12, D=64, S=4096,16384,65536, bf16,
Longformer window 256 with 1 global token, LongT5 window 127 and block 16). On CPU, a small shape that
finishes in under 2 minutes on 2 cores: B=1, H=4, D=64, S=1024, float32, same windows (S=2048 took
~2 minutes of CPU time, 4.5 minutes of wall time on a 2-core machine shared with other jobs). HF model modes:
``--size base`` on a GPU, ``tiny`` on CPU (the base configs take seconds per forward on 2 cores), S=1024 on CPU
and 4096,8192,32768 on a GPU. ``--ragged`` without lengths: DESIGN.md's shapes and issue 14's lengths
2048,16384,4096,9000 on a GPU; on CPU the same small shape (H=4, D=64, float32) with those lengths / 16,
128,1024,256,562 (the same 52% padding; fwd and fwd+bwd of every row of the four ops, about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .cases import DEFAULT_WINDOW, OPS
from .hf_model import DEFAULT_LAYERS, STOCK_IMPLS
from .hf_model import FAMILIES as HF_FAMILIES

DTYPES = ("float32", "float16", "bfloat16", "float64")
GPU_DEFAULTS = {"seqlen": "4096,16384,65536", "heads": 12, "dtype": "bfloat16", "min_run_time": 0.5}
CPU_DEFAULTS = {"seqlen": "1024", "heads": 4, "dtype": "float32", "min_run_time": 0.1}
HF_GPU_SEQLEN, HF_CPU_SEQLEN = "4096,8192,32768", "1024"
# CPU: issue 14's lengths / 16, so the same share of the padded batch is padding (52%).
RAGGED_GPU_LENGTHS, RAGGED_CPU_LENGTHS = "2048,16384,4096,9000", "128,1024,256,562"
RAGGED_DEFAULT = "default"  # --ragged without lengths: the device's default lengths
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in _csv_list(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _lengths(text: str) -> list[int] | str:
    """``--ragged``: comma-separated positive sequence lengths (or the device default)."""
    if text == RAGGED_DEFAULT:
        return text
    parts = text.split(",")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive sequence lengths (e.g. "
                                         f"{RAGGED_GPU_LENGTHS}), got {text!r}")
    return values


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time the backends and baselines",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to time")
    g.add_argument("--op", default=",".join(OPS), help=f"comma list of {', '.join(OPS)} (default: all)")
    g.add_argument("--backend", default="all", help="comma list of longattn backends, or 'all' / 'none' (default all: "
                   "the unavailable ones are listed with the reason)")
    g.add_argument("--baseline", default="all", help="comma list of hf, flex, sdpa_mask, sdpa_dense (--model "
                   "modernbert|mistral|gemma3: sdpa, flex_attention, eager), or 'all' / 'none' (default all)")
    g.add_argument("--pass", dest="passes", help="comma list of fwd, bwd, fwdbwd (default all three; --ragged: "
                   "fwd,fwdbwd)")
    g.add_argument("--model", choices=("led", "longt5-local", "longt5-tglobal", *HF_FAMILIES),
                   help="model mode: a stack of stock vs longattn layers instead of the ops")
    g.add_argument("--ragged", type=_lengths, nargs="?", const=RAGGED_DEFAULT, metavar="L1,L2,...",
                   help="a right-padded batch of these sequence lengths: padded vs packed vs one-by-one vs stock HF, "
                   f"per op (or --model led|longt5-*); no value: {RAGGED_GPU_LENGTHS} on GPU, {RAGGED_CPU_LENGTHS} "
                   "on CPU")
    g.add_argument("--report", action="store_true", help="write the README results section from the latest GPU "
                   "run in benchmarks/results/ and exit")
    s = p.add_argument_group("shapes (defaults: GPU standard shapes, or the small CPU shape; see above)")
    s.add_argument("--seqlen", type=_int_list, help="comma list of sequence lengths")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--heads", type=int)
    s.add_argument("--head-dim", type=int, help="default 64 (HF model modes: the config's)")
    s.add_argument("--window", type=int, help="one-sided window (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_WINDOW.items() if k != "aggregate")
                   + "); HF model modes: the config's own field, ModernBERT local_attention (full width), "
                   "Mistral/Gemma 3 sliding_window (keys per query)")
    s.add_argument("--globals", type=int, default=1, help="Longformer global tokens (default 1)")
    s.add_argument("--block-size", type=int, default=16, help="LongT5 global block size (default 16)")
    s.add_argument("--no-bias", action="store_true",
                   help="local and tglobal without their relative-position bias tables (the local op as Longformer's "
                        "band runs it; the bias tables' cost is the difference; the longattn backends only)")
    s.add_argument("--dtype", choices=DTYPES, help="default bfloat16 on GPU, float32 on CPU")
    s.add_argument("--device", help="cuda or cpu (default: cuda when visible)")
    s.add_argument("--layers", type=int, help="model mode: layers (default 2; modernbert 3: one global, two "
                   "sliding)")
    s.add_argument("--d-model", type=int, help="model mode: hidden size (default heads x head-dim; HF model "
                   "modes: the config's)")
    s.add_argument("--size", choices=("base", "tiny"), help="HF model modes: the real model's attention shapes or "
                   "the test config (default base on GPU, tiny on CPU)")
    s.add_argument("--kv-heads", type=int, help="HF model modes: num_key_value_heads (default: the config's own)")
    s.add_argument("--sliding-only", action="store_true", help="HF model modes: every layer a sliding-window layer "
                   "(default: the family's own pattern of sliding and global layers)")
    o = p.add_argument_group("measurement and output")
    o.add_argument("--check", action="store_true", help="compare each output with the float64 oracle first")
    o.add_argument("--min-run-time", type=float, help="seconds of timed calls per measurement "
                   "(default 0.5 GPU, 0.1 CPU)")
    o.add_argument("--rounds", type=int, help="--ragged ops: time each op's rows this many times round-robin and keep "
                   "each row's median round (for a shared machine whose load drifts; default 1)")
    o.add_argument("--json", help="write the run (metadata, settings, every row) as JSON")
    o.add_argument("--csv", help="write the rows as CSV")
    o.add_argument("--plot", help="write time and TFLOP/s vs S as a PNG")
    o.add_argument("--save", action="store_true", help="also write the JSON and plot under benchmarks/results/ "
                   "(GPU runs only)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--results-dir", default=str(RESULTS_DIR), help="--report/--save: the results directory")
    o.add_argument("--out", help="--report: the markdown file to write (default: print it)")
    p.set_defaults(func=run)


def resolve_settings(args) -> dict:
    """Fill the device-dependent defaults; returns every setting of the run (recorded in the JSON)."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    ops = _csv_list(args.op)
    bad = [op for op in ops if op not in OPS]
    if bad:
        raise SystemExit(f"longattn bench: --op: unknown {bad}; expected some of {OPS}")
    passes = _csv_list(args.passes or ("fwd,fwdbwd" if args.ragged else "fwd,bwd,fwdbwd"))
    if not passes or any(p not in ("fwd", "bwd", "fwdbwd") for p in passes):
        raise SystemExit(f"longattn bench: --pass: expected some of fwd, bwd, fwdbwd, got {args.passes!r}")
    from ..dispatch import BACKEND_NAMES
    from .impls import BASELINES

    hf = args.model in HF_FAMILIES
    backends = _pick(args.backend, BACKEND_NAMES, "--backend")
    baselines = _pick(args.baseline, STOCK_IMPLS if hf else BASELINES, "--baseline")
    gpu = device.startswith("cuda")
    out = {
        "mode": "model" if args.model else "ops",
        "ops": ops, "model": args.model, "layers": args.layers or DEFAULT_LAYERS.get(args.model, 2),
        "d_model": args.d_model,
        "seqlens": args.seqlen or _int_list((HF_GPU_SEQLEN if gpu else HF_CPU_SEQLEN) if hf else defaults["seqlen"]),
        "batch": args.batch, "heads": args.heads or (None if hf else defaults["heads"]),
        "head_dim": args.head_dim or (None if hf else 64),
        "window": args.window, "globals": args.globals, "block_size": args.block_size, "bias": not args.no_bias,
        "dtype": args.dtype or defaults["dtype"], "device": device, "passes": passes,
        "backends": backends, "baselines": baselines, "check": args.check,
        "min_run_time": args.min_run_time or defaults["min_run_time"],
    }
    if args.rounds is not None and (args.rounds < 1 or not args.ragged or args.model):
        raise SystemExit("longattn bench: --rounds: a positive count, for --ragged without --model only")
    if args.ragged:
        _ragged_settings(args, out, gpu)
    if hf:
        out.update(size=args.size or ("base" if gpu else "tiny"), kv_heads=args.kv_heads,
                   sliding_only=args.sliding_only)
    elif args.size or args.kv_heads or args.sliding_only:
        raise SystemExit("longattn bench: --size, --kv-heads and --sliding-only apply to --model "
                         f"{'|'.join(HF_FAMILIES)} only")
    return out


def _ragged_settings(args, out: dict, gpu: bool) -> None:
    """``--ragged``: the lengths (``out["ragged"]``), mode "ragged", S = the longest; refuses what does not apply."""
    from .ragged import RAGGED_BASELINES

    lengths = args.ragged
    if lengths == RAGGED_DEFAULT:
        lengths = _int_list(RAGGED_GPU_LENGTHS if gpu else RAGGED_CPU_LENGTHS)
    if args.model in HF_FAMILIES:
        raise SystemExit(f"longattn bench: --ragged applies to the ops and to --model led|longt5-local|longt5-tglobal, "
                         f"not --model {args.model}")
    for flag, given in (("--seqlen", args.seqlen), ("--batch", args.batch != 1), ("--plot", args.plot)):
        if given:
            raise SystemExit(f"longattn bench: {flag} does not apply to --ragged (B and S come from its lengths"
                             + ("; the plot is of time vs S" if flag == "--plot" else "") + ")")
    if args.baseline not in ("all", "none"):
        bad = [b for b in out["baselines"] if b not in RAGGED_BASELINES]
        if bad:
            raise SystemExit(f"longattn bench: --ragged: baselines {bad} take no padding; it compares with "
                             f"{', '.join(RAGGED_BASELINES)} only")
    if args.backend == "all":  # the ones that can run here (the others are named with the reason on stderr)
        import longattn

        available = longattn.available_backends(out["device"])
        out["skipped_backends"] = [b for b in out["backends"] if available.get(b)]
        out["backends"] = [b for b in out["backends"] if not available.get(b)]
    out.update(mode="ragged", ragged=lengths, seqlens=[max(lengths)], batch=len(lengths), rounds=args.rounds or 1,
               baselines=[b for b in out["baselines"] if b in RAGGED_BASELINES])


def _pick(text: str, names, flag: str) -> list[str]:
    if text == "all":
        return list(names)
    if text == "none":
        return []
    chosen = _csv_list(text)
    bad = [c for c in chosen if c not in names]
    if bad:
        raise SystemExit(f"longattn bench: {flag}: unknown {bad}; expected some of {list(names)}, 'all' or 'none'")
    return chosen


def run(args) -> int:
    if args.report:
        from .report import main as report_main

        return report_main(args.results_dir, args.out)
    settings = resolve_settings(args)
    if (args.plot or args.save) and importlib.util.find_spec("matplotlib") is None:
        # Fail before minutes of timing, not after.
        raise SystemExit("longattn bench: --plot/--save need matplotlib; pip install 'longattn[bench]'")
    import torch

    from . import output
    from .cases import Settings

    shape = Settings(batch=settings["batch"], heads=settings["heads"], head_dim=settings["head_dim"],
                     window=settings["window"], globals=settings["globals"], block_size=settings["block_size"],
                     bias=settings.get("bias", True), dtype=getattr(torch, settings["dtype"]),
                     device=settings["device"])
    if settings["model"] in HF_FAMILIES:
        from .hf_model import describe

        try:
            settings["model_config"] = describe(settings)  # what the run times: recorded in the JSON too
        except (TypeError, ValueError) as exc:  # a config the options make invalid: say so before any timing
            raise SystemExit(f"longattn bench --model {settings['model']}: {exc}") from exc
    info = output.run_info(settings)
    _print_backends(info, settings)
    if settings["mode"] == "ragged":
        return _run_ragged(args, settings, shape, info)
    if settings["mode"] == "model":
        from .model import run_model

        records = run_model(settings, shape, progress=not args.no_progress)
    else:
        from .impls import impl_names
        from .runner import run_sweep

        # With --json the file is rewritten after each implementation: a run stopped early keeps its rows.
        checkpoint = (lambda recs: output.write_json(args.json, info, recs)) if args.json else None
        records = run_sweep(settings["ops"], settings["seqlens"], shape,
                            impl_names(settings["backends"], settings["baselines"]), settings["passes"],
                            check=settings["check"], min_run_time=settings["min_run_time"],
                            progress=not args.no_progress, checkpoint=checkpoint)
    print(output.format_table(records, memory_note=_memory_note(settings)))
    if settings["model"] in HF_FAMILIES:
        from .hf_model import longattn_notes

        print("\n".join(["", *longattn_notes(records)]))
    shape_text = (f"H={shape.heads} D={shape.head_dim}" if shape.heads else f"{settings['model']} {settings['size']}")
    title = f"{info['device']} | {settings['dtype']} B={shape.batch} {shape_text} | {info['timestamp']}"
    for path, write in ((args.json, lambda p: output.write_json(p, info, records)),
                        (args.csv, lambda p: output.write_csv(p, records)),
                        (args.plot, lambda p: output.write_plot(p, records, title))):
        if path:
            write(path)
            print(f"wrote {path}", file=sys.stderr)
    if args.save:
        return _save(args.results_dir, info, records, title, settings)
    return 0


def _memory_note(settings: dict) -> str:
    return ("peak MiB = peak bytes allocated during the call beyond its inputs ("
            + ("torch.cuda.max_memory_allocated" if settings["device"].startswith("cuda")
               else "torch profiler's record of CPU-allocator allocations; memory outside torch's allocator "
                    "is not seen") + ").")


def _run_ragged(args, settings: dict, shape, info: dict) -> int:
    """``--ragged``: time, print the ragged table, write ``--json`` / ``--csv`` (``--save``: the JSON, GPU only)."""
    from . import output, ragged

    if settings["model"]:
        records = ragged.run_ragged_model(settings, shape, progress=not args.no_progress)
    else:
        checkpoint = (lambda recs: output.write_json(args.json, info, recs)) if args.json else None
        records = ragged.run_ragged_ops(settings, shape, progress=not args.no_progress, checkpoint=checkpoint)
    print(ragged.format_table(records, ragged.describe(settings, shape), memory_note=_memory_note(settings)))
    for path, write in ((args.json, lambda p: output.write_json(p, info, records)),
                        (args.csv, lambda p: output.write_csv(p, records, ragged.CSV_FIELDS))):
        if path:
            write(path)
            print(f"wrote {path}", file=sys.stderr)
    return _save(args.results_dir, info, records, None, settings) if args.save else 0


def _print_backends(info: dict, settings: dict) -> None:
    print(f"device: {info['device']}; torch {info['versions']['torch']}; {settings['dtype']}", file=sys.stderr)
    if settings.get("model_config"):
        print(settings["model_config"], file=sys.stderr)
    for name in settings["backends"] + settings.get("skipped_backends", []):
        reasons = info["backends"].get(name, [])
        if reasons:
            print(f"skipping backend {name}: {'; '.join(reasons)}", file=sys.stderr)


def results_stem(info: dict, settings: dict) -> str:
    """``<timestamp>_<gpu>_<mode>[-<model>]``: the name of a saved run under ``benchmarks/results/``."""
    gpu = info["device"].split("(")[0].split(" ", 1)[-1].strip().replace(" ", "-") or "gpu"
    mode = settings["mode"] + (f"-{settings['model']}" if settings.get("model") else "")
    return f"{info['timestamp'][:19].replace(':', '')}_{gpu}_{mode}"


def _save(results_dir: str, info: dict, records: list[dict], title: str | None, settings: dict) -> int:
    """Write ``<results_dir>/<date>_<gpu>_<mode>.json`` and its plot (none for ``--ragged``: ``title`` None);
    refuses CPU runs (the README shows GPUs)."""
    from . import output

    if not settings["device"].startswith("cuda"):
        print("longattn bench --save: benchmarks/results/ holds GPU runs only; use --json for this CPU run",
              file=sys.stderr)
        return 2
    stem = results_stem(info, settings)
    base = Path(results_dir) / stem
    if not info.get("git_commit"):
        print("longattn bench --save: warning: no git commit known (not a git checkout; set LONGATTN_GIT_COMMIT)",
              file=sys.stderr)
    output.write_json(f"{base}.json", info, records)
    if title is None:
        print(f"saved {base}.json", file=sys.stderr)
        return 0
    output.write_plot(f"{base}.png", records, title)
    print(f"saved {base}.json and {base}.png", file=sys.stderr)
    return 0
