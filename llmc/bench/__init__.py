"""`llmc bench`: llmc beside the engines users would pick instead, on one model, one machine, one run.

    models.py       what runs: a package, a checkpoint compiled on the fly, or a named bench model
    workloads.py    the requests: batch-1 decode, an offline spread of lengths, Poisson arrivals
    engines.py      llmc and the peers (HF eager, HF + torch.compile, llama.cpp), one interface
    gguf_export.py  the checkpoint as a GGUF file for llama.cpp
    online.py       the package's real HTTP server under an open-loop streaming client
    roofline.py     measured memory bandwidth and bytes per decode token
    runner.py       the run: warm-up, repeats, medians, ratios
    report.py       table, markdown for bench/RESULTS.md, JSON, plots
"""

from .models import BENCH_MODELS, BenchSubject, build_bench_model, resolve_subject
from .runner import BASELINES, WORKLOADS, BenchOptions, run_bench

__all__ = ["BASELINES", "BENCH_MODELS", "WORKLOADS", "BenchOptions", "BenchSubject", "build_bench_model",
           "resolve_subject", "run_bench"]
