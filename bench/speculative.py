"""Speculative decoding on the example model: target steps per generated token and tokens/s,
plain decoding vs n-gram prompt lookup vs a draft model, in one run.

    python bench/speculative.py                         # draft = the first 2 of the 6 layers
    python bench/speculative.py --draft-layers 1 --new-tokens 96 --repeats 3 --json out.json
    python bench/speculative.py --write-draft build/stdlib-draft  # only the draft checkpoint

The target is ``examples/models/stdlib-llama-6m`` (6 layers, hidden 256, vocab 6144). The draft is
made by truncation (``truncated_checkpoint``): the same checkpoint keeping only its first
``--draft-layers`` decoder layers, with the final norm and the tied embedding / LM head; no
training, so it shares the tokenizer by construction. Both are compiled into one package for the
cpu target (``llmc compile MODEL --draft DRAFT``).

Two workloads of greedy requests, each ``--new-tokens`` long (EOS ignored):

- ``code``: the first lines of held-out stdlib files (``split.json``; the CPython 3.11 stdlib of
  this machine), the text the model was trained on;
- ``repetitive``: code that repeats itself (codec tables, a statement over a run of names, test
  methods alike), where prompt lookup finds what comes next in the context.

Each runs at batch 1 (``max_num_seqs=1``: one request at a time, where decoding is bound by the
fixed cost of a step) and at batch 8 (``max_num_seqs=8``: continuous batching refills the batch as
requests finish; the adaptive policy speculates less there); all requests are queued at once. Modes (``--modes``): off, ngram, draft, and ngram-fixed / draft-fixed, which always
propose ``--num-speculative-tokens`` (the adaptive policy switched off). They alternate within each
repeat; the fastest of the repeats counts (on a machine other processes share, the least disturbed
run is the one that says what the code costs). "Target steps per token" counts, per request, the model steps
that gave it tokens over the tokens it got (1 for plain decoding). Every speculative run's outputs
are checked token for token against plain decoding's.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "models" / "stdlib-llama-6m"
MODES = ("off", "ngram", "draft", "ngram-fixed", "draft-fixed")  # -fixed: always k proposals, no adaptive policy


def truncated_checkpoint(model_dir: str | Path, out_dir: str | Path, num_layers: int) -> Path:
    """A draft made from ``model_dir`` by keeping its first ``num_layers`` decoder layers (and the
    embedding, final norm and LM head): config.json says so, model.safetensors drops the other
    layers' tensors, every other file (tokenizer, generation config) is copied."""
    from safetensors.torch import load_file, save_file

    src, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    key = next(k for k in ("num_hidden_layers", "n_layer") if k in config)
    if not 1 <= num_layers <= config[key]:
        raise ValueError(f"{src} has {config[key]} layers; cannot keep {num_layers}")
    config[key] = num_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:num_layers]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    layer = re.compile(r"\.(?:layers|h)\.(\d+)\.")
    tensors = {name: t for name, t in load_file(str(src / "model.safetensors")).items()
               if not (m := layer.search(name)) or int(m.group(1)) < num_layers}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for file in src.iterdir():
        if file.is_file() and file.name not in ("config.json", "model.safetensors"):
            shutil.copyfile(file, out / file.name)
    return out


def code_prompts(count: int) -> list[str]:
    """The first lines (up to a ``def`` or ``class`` block's header) of held-out stdlib files."""
    import sysconfig

    split = json.loads((EXAMPLE / "split.json").read_text(encoding="utf-8"))
    root = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for name in split["heldout"]:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        match = re.search(r"\n((?:    )?(?:def|class) [^\n]*\n(?:[^\n]*\n){2})", text)
        if match:
            prompts.append(match.group(1))
        if len(prompts) == count:
            break
    if len(prompts) < count:
        raise SystemExit(f"found {len(prompts)} held-out files under {root}; the example model's split "
                         "names CPython 3.11 stdlib files")
    return prompts


REPETITIVE = [  # code whose continuation is in its context: tables, a statement repeated, runs of look-alikes
    "decoding_table = (\n    '\\x00'     #  0x00 -> NULL\n    '\\x01'     #  0x01 -> START OF HEADING\n"
    "    '\\x02'     #  0x02 -> START OF TEXT\n",
    "encoding_map = {\n    0x0000: 0x0000,\n    0x0001: 0x0001,\n    0x0002: 0x0002,\n",
    "        x = x + 1\n        x = x + 1\n        x = x + 1\n",
    "        self.assertEqual(self.parse('a'), 'a')\n        self.assertEqual(self.parse('b'), 'b')\n"
    "        self.assertEqual(self.parse(",
    "        self.alpha = alpha\n        self.beta = beta\n        self.name = name\n        self.",
    "def get_gamma(self):\n    return self._gamma\n\ndef get_theta(self):\n    return self._theta\n\ndef get_",
    "    def test_alpha(self):\n        self.check('alpha')\n\n    def test_beta(self):\n        self.check('beta')\n"
    "\n    def test_",
    "_table = [\n    0, 0, 0, 0, 0, 0, 0, 0,\n    0, 0, 0, 0, 0, 0, 0, 0,\n",
]


def repetitive_prompts(count: int) -> list[str]:
    return [REPETITIVE[i % len(REPETITIVE)] for i in range(count)]


def measure_saturation(engine, repeats: int = 15, context: int = 128) -> tuple[float, float, float]:
    """The adaptive policy's scale S on this machine and model: a least-squares fit of forward time
    against batched tokens, ``time = a + b * tokens``, over decode batches (1-8 sequences x 1 token)
    and verification chunks (1-8 sequences x 3-5 tokens) at a 128-token context; S = a / b. Each
    shape's time is the fastest of ``repeats`` (what the machine can do, without other processes'
    interference). Returns (S, a, b), seconds."""
    from llmc.runtime.block_manager import BlockTable
    from llmc.runtime.paged_attention import batch_step

    points = []
    for sequences, tokens in [(1, 1), (2, 1), (4, 1), (8, 1), (1, 3), (1, 5), (4, 3), (8, 3), (8, 5)]:
        tables = [BlockTable() for _ in range(sequences)]
        for table in tables:
            engine.blocks.allocate(table, 0, context + tokens)
        chunks = [([1] * tokens, context, table.blocks) for table in tables]
        ids, positions, step = batch_step(engine.pool, chunks, list(range(sequences * tokens)))
        times = []
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                engine.forward(engine.weights, ids, positions, step)
                times.append(time.perf_counter() - start)
        for table in tables:
            engine.blocks.free_table(table)
        points.append((sequences * tokens, min(times)))
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    fixed = mean_y - slope * mean_x
    return fixed / slope, fixed, slope


def run(engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]], dict]:
    """Generate for every prompt, all queued at once (the engine's max_num_seqs is the batch);
    (seconds, outputs, metric deltas, with ``target_steps``: the steps that gave each request tokens, summed)."""
    from llmc.runtime.sampler import SamplingParams

    before = engine.metrics()
    outputs: dict[str, list[int]] = {}
    target_steps = 0
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.output_token_ids
                target_steps += out.speculation.target_steps if out.speculation else len(out.output_token_ids)
    seconds = time.perf_counter() - start
    after = engine.metrics()
    delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
    return seconds, [outputs[str(i)] for i in range(len(prompts))], {**delta, "target_steps": target_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft-layers", type=int, default=2, help="decoder layers the draft keeps [2]")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per workload [16]")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request [64]")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="requests in flight [1 8]")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="most proposals per step [4]")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode; the fastest counts [5]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads [1]")
    parser.add_argument("--device", default=None, help="cpu or cuda [the target's]")
    parser.add_argument("--target", default="cpu", help="llmc target to compile for [cpu]")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[:3]),
                        help="what to compare; off is always run first [off ngram draft]")
    parser.add_argument("--saturation-tokens", default="measure",
                        help="the adaptive policy's scale S: measure (fit on this machine first), ridge (the "
                             "target's roofline ridge point, the runtime's default) or a number [measure]")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--write-draft", type=Path, default=None, metavar="DIR",
                        help="only write the truncated draft checkpoint to DIR (for llmc compile --draft) and exit")
    args = parser.parse_args()
    if args.write_draft:
        print(truncated_checkpoint(EXAMPLE, args.write_draft, args.draft_layers))
        return
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from llmc.compiler import compile_model
    from llmc.runtime.engine import EngineConfig, LLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        draft = truncated_checkpoint(EXAMPLE, Path(tmp) / "draft", args.draft_layers)
        package = compile_model(EXAMPLE, args.target, Path(tmp) / "pkg", draft=draft,
                                num_speculative_tokens=args.num_speculative_tokens).out_dir
        modes = ["off"] + [m for m in args.modes if m != "off"]
        saturation = None
        if args.saturation_tokens == "measure":
            saturation, fixed, per_token = measure_saturation(LLMEngine.from_package(package, device=args.device))
            print(f"measured: a step costs {fixed * 1e3:.2f} ms + {per_token * 1e3:.3f} ms per batched token, "
                  f"so S = {saturation:.1f} tokens", flush=True)
        elif args.saturation_tokens != "ridge":
            saturation = float(args.saturation_tokens)
        engines = {(mode, batch): LLMEngine.from_package(package, device=args.device, config=EngineConfig(
            max_num_seqs=batch, max_num_batched_tokens=2048, speculative=mode.split("-")[0],
            adaptive_speculation=not mode.endswith("-fixed"), speculative_saturation_tokens=saturation))
            for mode in modes for batch in args.batches}
        for (mode, batch), engine in engines.items():
            if batch == args.batches[0] and engine.speculator:
                print(engine.speculator.describe(), flush=True)
        tokenizer = engines["off", args.batches[0]].tokenizer
        workloads = {"code": code_prompts(args.prompts), "repetitive": repetitive_prompts(args.prompts)}
        rows = []
        for workload, texts in workloads.items():
            prompts = [tokenizer.encode(t) for t in texts]
            for batch in args.batches:
                for mode in modes:  # warm-up: first-call allocations, thread pools
                    run(engines[mode, batch], prompts[:1], 4)
                times = {mode: [] for mode in modes}
                results = {}
                for _ in range(args.repeats):
                    for mode in modes:
                        seconds, outputs, delta = run(engines[mode, batch], prompts, args.new_tokens)
                        times[mode].append(seconds)
                        results[mode] = (outputs, delta)
                base = min(times["off"])
                for mode in modes:
                    outputs, delta = results[mode]
                    tokens = sum(len(o) for o in outputs)
                    wall = min(times[mode])
                    rows.append({
                        "workload": workload, "batch": batch, "mode": mode, "tokens": tokens,
                        "target_steps": delta["target_steps"], "steps_per_token": delta["target_steps"] / tokens,
                        "engine_steps": delta["steps"],
                        "proposed_per_verify": delta.get("spec_draft_tokens", 0) / max(1, delta.get("spec_verifications", 0)),
                        "tokens_per_s": tokens / wall, "speedup": base / wall,
                        "acceptance_rate": delta.get("spec_accepted_tokens", 0) / max(1, delta.get("spec_draft_tokens", 0)),
                        "tokens_per_verify": (delta.get("spec_accepted_tokens", 0) + delta.get("spec_verifications", 0))
                        / max(1, delta.get("spec_verifications", 0)),
                        "same_as_plain": outputs == results["off"][0]})
                    print(_line(rows[-1]), flush=True)
        draft_forwards = sum(e.speculator.proposer.forwards for (m, _), e in engines.items() if m.startswith("draft"))
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"draft = first {args.draft_layers} of 6 layers ({draft_forwards} draft forwards in all); "
          f"S = {saturation or 'the ridge point'}")
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "saturation_tokens": saturation}, indent=1) + "\n")


def _line(r: dict) -> str:
    return (f"{r['workload']:>10} batch {r['batch']:>2} {r['mode']:>11}: {r['steps_per_token']:.3f} steps/token, "
            f"{r['tokens_per_s']:7.1f} tokens/s ({r['speedup']:.2f}x), acceptance {r['acceptance_rate']:.2f}, "
            f"{r['proposed_per_verify']:.2f} proposed and {r['tokens_per_verify']:.2f} kept per verify, "
            f"same as plain: {r['same_as_plain']}")


def _table(rows: list[dict]) -> str:
    lines = ["| workload | batch | mode | target steps / token | tokens/s | vs plain | acceptance | proposed / verify "
             "| kept / verify | outputs = plain |", "|---|--:|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        spec = r["mode"] != "off"
        acceptance = f"{r['acceptance_rate']:.2f}" if spec else ""
        per_verify = f"{r['tokens_per_verify']:.2f}" if spec else ""
        proposed = f"{r['proposed_per_verify']:.2f}" if spec else ""
        lines.append(f"| {r['workload']} | {r['batch']} | {r['mode']} | {r['steps_per_token']:.3f} | "
                     f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | {acceptance} | {proposed} | {per_verify} | "
                     f"{'yes' if r['same_as_plain'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
