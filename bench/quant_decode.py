"""Batch-1 decode speed of quantized packages vs the float32 one, same model, same run.

    python bench/quant_decode.py [--new-tokens 64] [--repeats 3]

Compiles the ~110M random-weight Llama of bench/throughput.py for the cpu target once per scheme
(float32, int8, int4 g128, W8A8; with and without the LM head quantized: the embedding and LM
head are kept by default, and at vocab 32000 the LM head is a quarter of the weights), then
generates ``--new-tokens`` greedy tokens from a 32-token prompt through each package's engine.
Prints ms per token, speed-up over float32, the bytes one decode step reads (the package's
weights, less the embedding table, which is gathered, not read whole) and that over the target's
bandwidth as a roofline fraction. Random weights: quality is scored elsewhere (report.json).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from throughput import CONFIG, build_model

SCHEMES = {
    "float32": [],
    "int8": ["quantize.scheme=int8"],
    "int8 + lm_head": ["quantize.scheme=int8", "quantize.exclude=['*embed*']"],
    "int4 g128": ["quantize.scheme=int4"],
    "int4 g128 + lm_head": ["quantize.scheme=int4", "quantize.exclude=['*embed*']"],
    "w8a8": ["quantize.scheme=w8a8", "quantize.calibration.sequences=2"],
}


def step_bytes(package: Path) -> int:
    with safe_open(str(package / "weights" / "model.safetensors"), "pt") as f:
        total = 0
        for name in f.keys():
            if "embed" in name:
                continue
            t = f.get_slice(name)
            n = 1
            for d in t.get_shape():
                n *= d
            total += n * {"F32": 4, "BF16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1}[t.get_dtype()]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    args = parser.parse_args()

    from llmc.compiler import compile_model
    from llmc.runtime.engine import LLMEngine
    from llmc.target import load_target

    bandwidth = load_target("cpu").memory_bandwidth_bytes_per_s
    work = Path(tempfile.mkdtemp(prefix="llmc-qbench-"))
    model_dir = build_model(work / "model")
    prompt = torch.randint(0, CONFIG["vocab_size"], (32,), generator=torch.Generator().manual_seed(1)).tolist()
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; Llama ~110M (bench/throughput.py config), batch 1, "
          f"prompt 32, {args.new_tokens} new tokens, median of {args.repeats}")
    print("| scheme | MB read per step | ms / token | tokens/s | vs float32 | roofline |")
    print("|---|---|---|---|---|---|")
    base = None
    for label in args.schemes:
        package = work / label.replace(" ", "_").replace("+", "plus")
        compile_model(model_dir, "cpu", package, overrides=SCHEMES[label], quality_tokens=0)
        engine = LLMEngine.from_package(package)
        engine.generate(prompt, max_tokens=4, ignore_eos=True)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine.generate(prompt, max_tokens=args.new_tokens, ignore_eos=True)
            times.append((time.perf_counter() - start) / args.new_tokens)
        per_token = statistics.median(times)
        base = base or per_token
        nbytes = step_bytes(package)
        print(f"| {label} | {nbytes / 1e6:.0f} | {per_token * 1e3:.1f} | {1 / per_token:.1f} | "
              f"{base / per_token:.2f}x | {nbytes / per_token / bandwidth:.0%} |", flush=True)


if __name__ == "__main__":
    main()
