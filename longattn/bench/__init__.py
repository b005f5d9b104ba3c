"""``longattn bench``: time longattn's ops and the baselines people would otherwise use (DESIGN.md section 5).

Modules, one job each:

- ``cases``    the benchmark inputs of each op (shapes, masks, bias tables), built from the settings;
- ``flops``    the mean number of attended keys and the useful FLOP count of a case;
- ``impls``    the implementations timed: each longattn backend and each baseline (HF, FlexAttention, SDPA);
- ``timing``   forward / backward / forward+backward timings and peak memory, on CPU and GPU; host overhead
               (wall minus GPU time of one call) on GPU;
- ``oracle``   ``--check``: comparison with the float64 oracle of ``tests/reference.py``;
- ``runner``   the sweep over ops x sequence lengths x implementations;
- ``output``   the table, JSON, CSV and plot;
- ``model``    ``--model``: stacks of stock vs patched LED / LongT5 encoder layers (the shared loop);
- ``hf_model`` ``--model modernbert|mistral|gemma3``: one HF model under sdpa / flex_attention / eager / longattn;
- ``ragged``   ``--ragged``: a right-padded ragged batch run padded, packed (``*_varlen`` ops,
               ``apply_longattn(packed=True)``), one sequence at a time and by stock HF;
- ``report``   the README results section from the saved GPU runs in ``benchmarks/results/``;
- ``autotable`` ``longattn auto-table``: ``backend="auto"``'s measured table from saved GPU runs;
- ``cli``      argument parsing.

Nothing here touches the GPU at import time.
"""
