"""Golden tests: for each architecture, the raised IR run by the reference interpreter must match
HF transformers eager on the same checkpoint, and the recorded outputs under tests/golden/.

Each tiny model is built from a seeded config, saved with ``save_pretrained`` and loaded back from
disk by the frontend, so the real loading code runs. ``pytest --update-golden`` rewrites the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from llmc.examples_tiny import TINY_CONFIGS, save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import generate_greedy

GOLDEN_DIR = Path(__file__).parent
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2"]
PREFILL_TOKENS = 17
DECODE_STEPS = 24
TOP_K = 5
# float32 end to end; the only differences from HF are summation order inside matmuls/softmax.
LOGIT_ATOL = 1e-4
# Recorded logprobs were written on one machine; other BLAS builds may round differently.
GOLDEN_LOGPROB_ATOL = 1e-3


def prompts(vocab: int) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(1234)
    return {
        "random17": torch.randint(0, vocab, (PREFILL_TOKENS,), generator=gen).tolist(),
        "short5": [1, 2, 3, 4, 5],
    }


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    arch = request.param
    path = save_tiny_model(arch, tmp_path_factory.mktemp(arch))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # generate exactly DECODE_STEPS tokens, like the IR loop
    return arch, path, hf, load_hf(path)


def test_all_architectures_covered():
    assert set(ARCHS) <= set(TINY_CONFIGS)


def test_prefill_logits_match_hf(model):
    arch, _, hf, imported = model
    ids = prompts(hf.config.vocab_size)["random17"]
    _, ours = generate_greedy(imported.graph, ids, 1)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    diff = (ours - ref).abs().max().item()
    assert diff <= LOGIT_ATOL, f"{arch}: prefill logits differ from HF by {diff:.3g}"


def test_greedy_decode_matches_hf_generate(model):
    arch, _, hf, imported = model
    for name, ids in prompts(hf.config.vocab_size).items():
        ours, _ = generate_greedy(imported.graph, ids, DECODE_STEPS)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=DECODE_STEPS, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):]
        assert ours == ref.tolist(), f"{arch}/{name}: IR greedy tokens differ from HF generate"


def record(imported, vocab: int) -> dict:
    out = {"architecture": imported.architecture, "op_counts": dict(sorted(imported.graph.op_counts().items())),
           "prompts": {}}
    for name, ids in prompts(vocab).items():
        steps: list[torch.Tensor] = []
        tokens, _ = generate_greedy(imported.graph, ids, DECODE_STEPS, step_logits=steps)
        top = [torch.log_softmax(s.double(), -1).topk(TOP_K) for s in steps]
        out["prompts"][name] = {
            "input_ids": ids,
            "tokens": tokens,
            "top5_ids": [t.indices.tolist() for t in top],
            "top5_logprobs": [[round(v, 6) for v in t.values.tolist()] for t in top],
        }
    return out


def test_matches_recorded_golden(model, request):
    arch, _, hf, imported = model
    path = GOLDEN_DIR / f"{arch}.json"
    got = record(imported, hf.config.vocab_size)
    if request.config.getoption("--update-golden"):
        path.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"rewrote {path.name}")
    assert path.exists(), f"{path} missing: run pytest --update-golden and review the diff"
    want = json.loads(path.read_text())
    assert got["op_counts"] == want["op_counts"], f"{arch}: raised graph changed"
    for name, rec in want["prompts"].items():
        cur = got["prompts"][name]
        assert cur["input_ids"] == rec["input_ids"]
        assert cur["tokens"] == rec["tokens"], f"{arch}/{name}: greedy tokens differ from the golden file"
        for step, (ids, vals, want_ids, want_vals) in enumerate(zip(
                cur["top5_ids"], cur["top5_logprobs"], rec["top5_ids"], rec["top5_logprobs"])):
            worst = max(abs(a - b) for a, b in zip(vals, want_vals))
            assert worst <= GOLDEN_LOGPROB_ATOL, f"{arch}/{name} step {step}: top-5 logprobs drift by {worst:.3g}"
            for i, (a, b) in enumerate(zip(ids, want_ids)):
                # Near-ties may legitimately swap order; any clearly separated rank must agree.
                gaps = [abs(want_vals[i] - want_vals[j]) for j in (i - 1, i + 1) if 0 <= j < len(want_vals)]
                if min(gaps) > 2 * GOLDEN_LOGPROB_ATOL:
                    assert a == b, f"{arch}/{name} step {step}: rank {i} is token {a}, golden has {b}"
