"""GPU benchmark of the Triton backend: every kernel vs torch, its bandwidth, and end-to-end decode.

    python bench/gpu.py                          # on an H100/H200; appends a dated section to bench/RESULTS.md
    python bench/gpu.py --target h100 --new-tokens 128 --repeats 5 --results out.md
    python bench/gpu.py --smoke                  # CPU, TRITON_INTERPRET=1, tiny shapes: the logic, not speed

1. Device copy bandwidth: a large tensor copy (read + write bytes over the median time).
2. Every template in codegen/templates/triton/ with a case in bench/gpu_cases.py is rendered with the target's
   template parameters, checked against its torch reference on random inputs (relative error, max
   |diff| / max |reference|), and timed with ``triton.testing.do_bench`` (median); achieved bandwidth
   is the bytes the op must move (inputs read once, outputs written once) over that time, shown as a
   fraction of the copy bandwidth. ``torch F.linear (cuBLAS)`` rows time the plain bfloat16 GEMM at
   the same shapes: that is the baseline a Triton bf16 GEMM would have to beat (the backend calls
   torch for plain linears). Missing templates and kernels that fail are reported, not fatal.
3. End-to-end batch-1 decode tokens/s of one random-weight Llama (~1.1B, TinyLlama's shape) as an
   llmc package (bf16 and int4 g128, compiled for ``--target``) vs HF transformers eager and
   ``torch.compile`` (reduce-overhead) with a static cache, both bf16. Decode tokens/s is
   ``(N - 1) / (t(N new tokens) - t(1 new token))``, so prefill is not counted.

``--smoke`` runs all of it on CPU with tiny shapes under the Triton interpreter (timings are
perf_counter of one interpreted call, meaningless as speed); parts that need CUDA (do_bench, HF
torch.compile) are skipped with a printed note. It writes results only with ``--results``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

if "--smoke" in sys.argv:  # before triton is imported anywhere
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["LLMC_TRITON_INTERPRET"] = "1"

import torch

from gpu_cases import FULL, SMOKE, Shapes, clone_args, cublas_cases, kernel_cases  # bench/gpu_cases.py

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "codegen" / "templates" / "triton"
EXPECTED = ["linear_int4", "linear_int8", "linear_fp8", "linear_w8a8", "rms_norm", "add_rms_norm", "rope",
            "act_mul", "embedding", "kv_cache_write", "paged_decode_attention", "paged_prefill_attention"]
# TinyLlama-1.1B's shape: ~1.1B parameters, 2.2 GB in bfloat16.
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
LLAMA_TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


# ---- measurement -------------------------------------------------------------------------------------

def timer(smoke: bool) -> Callable[[Callable], float]:
    """Median milliseconds of ``fn``: do_bench on a GPU, one perf_counter call in the interpreter."""
    if smoke:
        def once(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return once
    import triton.testing
    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(dev, smoke: bool) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(2**24 if smoke else 2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    ms = statistics.median(timer(smoke)(copy) for _ in range(5)) if smoke else timer(smoke)(copy)
    return 2 * src.numel() / (ms / 1e3)


def reason(exc: Exception) -> str:
    """An exception as one short markdown-table-safe line."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0].replace("|", "/")
    return text if len(text) <= 120 else text[:117] + "..."


def relative_error(got, want) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6))


def check(fn, case) -> str:
    """Run the kernel and the reference on copies of the inputs; 'ok (error)' or '**MISMATCH** (error)'."""
    got_args, want_args = clone_args(case.args), clone_args(case.args)
    got, want = fn(*got_args), case.reference(*want_args)
    if case.result_arg is not None:
        got, want = got_args[case.result_arg], want_args[case.result_arg]
    err = relative_error(got, want)
    return f"ok ({err:.1e})" if err <= case.tolerance else f"**MISMATCH** ({err:.1e})"


def bench_kernels(target, s: Shapes, dev, smoke: bool, bandwidth: float, work: Path) -> list[str]:
    from llmc.codegen import triton_kernels

    configs = {}
    try:  # the one table of per-target template parameters, where the backend has it
        configs = triton_kernels.kernel_configs(target)
    except Exception as exc:
        print(f"note: no kernel_configs for {target.name} ({type(exc).__name__}: {exc}); template defaults")
    time_ms, rows, missing, modules = timer(smoke), [], [], {}
    cases = [("torch", c) for c in cublas_cases(s, dev)]
    for name in dict.fromkeys(EXPECTED + sorted(p.name.removesuffix(".py.jinja") for p in TEMPLATES.glob("*.jinja"))):
        if not (TEMPLATES / f"{name}.py.jinja").is_file():
            print(f"skipped {name}: no template codegen/templates/triton/{name}.py.jinja yet")
            missing.append(f"| {name} | — | — | — | — | missing template |")
            continue
        try:
            found = kernel_cases(name, s, dev)
        except Exception as exc:
            print(f"FAILED {name}: building its inputs: {type(exc).__name__}: {exc}")
            missing.append(f"| {name} | — | — | — | — | failed building inputs: {reason(exc)} |")
            continue
        if not found:
            print(f"skipped {name}: bench/gpu.py has no case for it")
        cases += [(name, c) for c in found]
    for name, case in cases:
        try:
            if name == "torch":
                run, status = (lambda c=case: torch.nn.functional.linear(*c.args)), "baseline"
            else:
                if name not in modules:
                    params = configs.get(name, {"sm_count": target.sm_count or 1})
                    modules[name] = triton_kernels.load_kernel_module(
                        triton_kernels.write_kernel(name, work / "kernels", **params))
                fn = getattr(modules[name], case.fn)
                run, status = (lambda c=case, f=fn: f(*c.args)), check(fn, case)
            ms = time_ms(run)
            gbs = case.nbytes / (ms / 1e3)
            rows.append(f"| {case.label} | {case.nbytes / 1e6:.2f} | {ms * 1e3:.1f} | {gbs / 1e9:.0f} | "
                        f"{gbs / bandwidth:.0%} | {status} |")
        except Exception as exc:
            print(f"FAILED {case.label}: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=-2)
            rows.append(f"| {case.label} | {case.nbytes / 1e6:.2f} | — | — | — | failed: {reason(exc)} |")
        print(rows[-1], flush=True)
    return rows + missing


# ---- end to end: batch-1 decode of a ~1B Llama ------------------------------------------------------

def build_llama(out: Path, config: dict) -> Path:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    return out


def decode_rate(generate: Callable[[int], object], new_tokens: int, repeats: int, sync: Callable) -> float:
    """Decode tokens/s, ``(N - 1) / (t(N) - t(1))``: each a median of ``repeats`` after a warm-up."""
    def seconds(n):
        generate(n)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate(n)
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    return (new_tokens - 1) / max(seconds(new_tokens) - seconds(1), 1e-9)


def llmc_decode(model_dir, target_name, overrides, package, dev, prompt, args, sync):
    from llmc.compiler import compile_model
    from llmc.runtime.llm import LLM
    from llmc.runtime.sampler import SamplingParams

    compile_model(model_dir, target_name, package, overrides=overrides, quality_tokens=0)
    llm = LLM(package, device=str(dev), kv_cache_bytes=(2**26 if args.smoke else 2**32), enable_prefix_caching=False)
    generate = lambda n: llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True))  # noqa: E731
    rate = decode_rate(generate, args.new_tokens, args.repeats, sync)
    return rate, generate(args.new_tokens)[0].output_token_ids


def hf_decode(model_dir, dev, prompt, args, sync, compiled):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev).eval()
    if compiled:  # the transformers docs' recipe: static KV cache, CUDA-graphed compiled forward
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.tensor([prompt], device=dev)

    @torch.inference_mode()
    def generate(n):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    rate = decode_rate(generate, args.new_tokens, args.repeats, sync)
    return rate, generate(args.new_tokens)[0, len(prompt):].tolist()


def weight_bytes(files) -> int:
    """Bytes of the weights one decode step reads: every tensor but the embedding table (gathered)."""
    from safetensors import safe_open

    size = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "I32": 4, "I64": 8}
    total = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if "embed" not in name:
                    t = f.get_slice(name)
                    total += size[t.get_dtype()] * int(torch.tensor(t.get_shape()).prod())
    return total


def bench_decode(target, dev, args, bandwidth: float, work: Path) -> list[str]:
    config = LLAMA_TINY if args.smoke else LLAMA_1B
    model_dir = build_llama(work / "llama", config)
    prompt = torch.randint(0, config["vocab_size"], (32,), generator=torch.Generator().manual_seed(1)).tolist()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    kv_per_token = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 2
    kv_read = kv_per_token * (len(prompt) + args.new_tokens / 2)  # mean context over the decode
    hf_bytes = weight_bytes(sorted(model_dir.glob("*.safetensors")))
    engines = [("HF transformers eager (bf16)", None, lambda: hf_decode(model_dir, dev, prompt, args, sync, False)),
               ("HF torch.compile + static cache (bf16)", None,
                lambda: hf_decode(model_dir, dev, prompt, args, sync, True))]
    variants = [(target.name, "bf16", []), (target.name, "int4 g128", ["quantize.scheme=int4"])]
    if args.smoke:  # the cpu target's torch backend: proves this harness when the target's rows fail
        variants.append(("cpu", "(torch backend, harness check)", []))
    for name, label, overrides in variants:
        package = work / f"package-{name}-{len(overrides)}"
        engines.append((f"llmc {name} {label}", package, lambda n=name, o=overrides, p=package: llmc_decode(
            model_dir, n, o, p, dev, prompt, args, sync)))
    rows, results = [], {}
    for label, package, run in engines:
        if "torch.compile" in label and dev.type != "cuda":
            print(f"skipped {label}: needs CUDA (reduce-overhead captures CUDA graphs)")
            continue
        if "harness check" in label and sum(k.startswith(f"llmc {target.name}") for k in results) == 2:
            continue
        try:
            rate, tokens = run()
        except Exception as exc:  # e.g. the target's backend cannot compile or run this model yet
            print(f"FAILED {label}: {type(exc).__name__}: {str(exc)[:500]}")
            rows.append(f"| {label} | — | — | — | — | — | failed: {reason(exc)} |")
            continue
        per_token = kv_read + (weight_bytes([package / "weights" / "model.safetensors"]) if package else hf_bytes)
        results[label] = rate, tokens, per_token * rate / bandwidth
        compiled = results.get("HF torch.compile + static cache (bf16)")
        eager = results.get("HF transformers eager (bf16)")
        versus = f"{rate / compiled[0]:.2f}x" if compiled else "—"
        same = f"{sum(a == b for a, b in zip(tokens, eager[1]))}/{len(tokens)}" if eager else "—"
        rows.append(f"| {label} | {per_token / 1e6:.1f} | {1e3 / rate:.2f} | {rate:.1f} | {versus} | "
                    f"{results[label][2]:.0%} | {same} |")
        print(rows[-1], flush=True)
    return rows, goals(results, target.name)


def goals(results: dict, target_name: str) -> list[str]:
    """The Triton backend's decode goals, each met or not (or why it has no figure)."""
    bf16, int4 = results.get(f"llmc {target_name} bf16"), results.get(f"llmc {target_name} int4 g128")
    compiled = results.get("HF torch.compile + static cache (bf16)")
    lines = [f"- bf16 decode at {bf16[2]:.0%} of the measured copy bandwidth (goal >= 80%): "
             f"{'met' if bf16[2] >= 0.8 else 'not met'}" if bf16 else "- bf16 decode goal: no llmc bf16 figure"]
    if int4 and compiled:
        ratio = int4[0] / compiled[0]
        lines.append(f"- int4 decode at {ratio:.2f}x HF torch.compile (goal >= 1.5x): {'met' if ratio >= 1.5 else 'not met'}")
    else:
        lines.append("- int4 decode goal: needs both the llmc int4 and the HF torch.compile figures")
    return lines


# ---- report --------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    parser.add_argument("--target", default="h100", help="target whose tile configs and pipeline are used")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode tokens (default 128; smoke 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5; smoke 1)")
    parser.add_argument("--skip-decode", action="store_true", help="kernels only")
    parser.add_argument("--results", type=Path, default=None,
                        help="markdown file to append to (default bench/RESULTS.md; smoke: none)")
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or (4 if args.smoke else 128)
    args.repeats = args.repeats or (1 if args.smoke else 5)
    results = args.results or (None if args.smoke else ROOT / "bench" / "RESULTS.md")
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (H100/H200); run `python bench/gpu.py --smoke` to check it on CPU")
        return 2
    from llmc.target import load_target
    import triton

    target = load_target(args.target)
    dev = torch.device("cpu" if args.smoke else "cuda")
    machine = "CPU, Triton interpreter (smoke run: timings are not speeds)" if args.smoke else \
        torch.cuda.get_device_name()
    work = Path(tempfile.mkdtemp(prefix="llmc-gpu-bench-"))
    bandwidth = copy_bandwidth(dev, args.smoke)
    print(f"# {machine}; torch {torch.__version__}, triton {triton.__version__}; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s", flush=True)
    kernels = bench_kernels(target, SMOKE if args.smoke else FULL, dev, args.smoke, bandwidth, work)
    decode, decode_goals = ([], []) if args.skip_decode else bench_decode(target, dev, args, bandwidth, work)
    command = "python bench/gpu.py " + " ".join(sys.argv[1:])
    lines = [f"\n## Triton backend kernels and decode, {time.strftime('%Y-%m-%d')} (`{command.strip()}`)\n",
             f"{machine}, {platform.machine()}; torch {torch.__version__}, triton {triton.__version__}; target "
             f"`{target.name}`; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write of a large tensor).\n",
             "| kernel | MB moved | us (median) | GB/s | of copy bandwidth | check vs torch |",
             "|---|---|---|---|---|---|", *kernels]
    if decode:
        lines += ["", f"Batch-1 decode, random-weight Llama {'tiny' if args.smoke else '~1.1B (TinyLlama shape)'}, "
                  f"prompt 32, {args.new_tokens} new tokens, median of {args.repeats}; bytes per token = weights "
                  "read (embedding excluded) + mean KV read.\n",
                  "| engine | MB read / token | ms / token | tokens/s | vs HF torch.compile | roofline | "
                  "tokens = HF eager |", "|---|---|---|---|---|---|---|", *decode, "", *decode_goals]
        print("\n".join(decode_goals))
    if results:
        with open(results, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended to {results}")
    mismatches = sum("MISMATCH" in row for row in kernels)
    if mismatches:
        print(f"{mismatches} kernel case(s) disagree with their torch reference")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
