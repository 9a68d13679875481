"""Offline throughput: an llmc package vs HF transformers ``generate``, same model, prompts and batch.

    python bench/throughput.py                      # ~100M-parameter Llama, 16 prompts x 128 tokens, 64 new
    python bench/throughput.py --batch 8 --new-tokens 32 --json out.json

The model is a random-weight Llama (hidden 768, 12 layers, 12 heads / 4 KV heads, SwiGLU 2048,
vocab 32000: ~110M parameters) saved with ``save_pretrained`` and compiled for the cpu target. Both
sides run float32, greedy, every request generating exactly ``--new-tokens`` tokens (no EOS), the
whole batch submitted at once: HF as one static batch (equal prompt lengths, so no padding), llmc
through its continuous-batching engine with room for the whole batch in one step. Each side runs
once to warm up, then ``--repeats`` times; the median wall time counts. Prints tokens/s of both and
the ratio, and the decode roofline fraction (weight bytes per step / step time over the target's
memory bandwidth).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024)


def build_model(out: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    return out


def time_runs(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: first-call allocations, thread pools
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from llmc.compiler import compile_model
    from llmc.runtime.llm import LLM
    from llmc.runtime.sampler import SamplingParams
    from llmc.target import load_target

    work = Path(tempfile.mkdtemp(prefix="llmc-bench-"))
    model_dir = build_model(work / "model")
    compile_model(model_dir, "cpu", work / "pkg")
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.prompt_tokens), generator=gen)

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in hf.parameters())

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False)
        return out[:, args.prompt_tokens:].tolist()

    llm = LLM(work / "pkg", max_num_seqs=args.batch, max_num_batched_tokens=max(512, args.batch * args.prompt_tokens),
              kv_cache_bytes=None)
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)

    def run_llmc():
        outs = llm.generate([p.tolist() for p in prompts], params)
        return [o.output_token_ids for o in outs]

    hf_s, hf_tokens = time_runs(run_hf, args.repeats)
    llmc_s, llmc_tokens = time_runs(run_llmc, args.repeats)
    generated = args.batch * args.new_tokens
    same = sum(a == b for a, b in zip(hf_tokens, llmc_tokens))

    # Decode roofline: each decode step reads every weight once (plus the KV cache, small here).
    target = load_target("cpu")
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    steps = llm.engine.scheduler.counters.steps / (args.repeats + 1)
    step_s = llmc_s / max(steps, 1)
    roofline = weight_bytes / step_s / target.memory_bandwidth_bytes_per_s
    results = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "params": n_params, "batch": args.batch,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "hf_seconds": round(hf_s, 3), "llmc_seconds": round(llmc_s, 3),
        "hf_tokens_per_s": round(generated / hf_s, 1), "llmc_tokens_per_s": round(generated / llmc_s, 1),
        "ratio_llmc_over_hf": round(hf_s / llmc_s, 3), "identical_outputs": f"{same}/{args.batch}",
        "llmc_steps_per_run": steps, "llmc_ms_per_step": round(1000 * step_s, 2),
        "roofline_fraction": round(roofline, 3),
    }
    print(f"model        Llama ~{n_params / 1e6:.0f}M params, float32, {torch.get_num_threads()} threads")
    print(f"workload     {args.batch} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens each, "
          f"greedy, median of {args.repeats}")
    print(f"HF generate  {hf_s:8.2f} s  {generated / hf_s:8.1f} tokens/s")
    print(f"llmc         {llmc_s:8.2f} s  {generated / llmc_s:8.1f} tokens/s   ({steps:.0f} steps, "
          f"{1000 * step_s:.1f} ms/step)")
    print(f"ratio        {hf_s / llmc_s:.2f}x (llmc tokens/s over HF)")
    print(f"roofline     {roofline:.1%} of {target.memory_bandwidth_bytes_per_s / 1e9:.0f} GB/s "
          f"({weight_bytes / 1e6:.0f} MB of weights per step)")
    print(f"outputs      {same}/{args.batch} requests token-identical to HF")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
