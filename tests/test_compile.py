"""`llmc compile` end to end: checkpoint -> target pipeline -> package, and the package reproduces
the recorded golden tokens and top-5 logprobs; bad targets fail with file, key path and a hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmc.cli import app
from llmc.examples_tiny import save_tiny_model
from llmc.runtime.engine import LLMEngine
from llmc.runtime.sampler import SamplingParams

GOLDEN_DIR = Path(__file__).parent / "golden"
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2"]
LOGPROB_ATOL = 1e-4  # float32 end to end; the package computes what the reference interpreter does
runner = CliRunner()


def compile_cli(*args: str):
    return runner.invoke(app, ["compile", *args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_package_reproduces_golden_tokens_and_logprobs(arch, tmp_path):
    model = save_tiny_model(arch, tmp_path / arch)
    result = compile_cli(str(model), "--target", "cpu.yaml", "-o", str(tmp_path / "pkg"))
    assert result.exit_code == 0, result.output
    assert "canonicalize" in result.output and "roofline" in result.output
    engine = LLMEngine.from_package(tmp_path / "pkg")
    golden = json.loads((GOLDEN_DIR / f"{arch}.json").read_text())
    for name, rec in golden["prompts"].items():
        # Decoded step by step through the paged cache; logprobs=5 returns each step's top 5.
        engine.add_request(name, rec["input_ids"], SamplingParams(max_tokens=len(rec["tokens"]), logprobs=5))
        outputs = [out for _ in range(len(rec["tokens"])) for out in engine.step()]
        assert outputs[-1].finished and outputs[-1].output_token_ids == rec["tokens"], f"{arch}/{name}"
        for step, (out, want_ids, want_lp) in enumerate(zip(outputs, rec["top5_ids"], rec["top5_logprobs"])):
            top = dict(out.logprobs[0].top)
            assert sorted(top) == sorted(want_ids), f"{arch}/{name} step {step}: top-5 differs from golden"
            got = [top[i] for i in want_ids]
            assert max(abs(a - b) for a, b in zip(got, want_lp)) <= LOGPROB_ATOL, f"{arch}/{name} step {step}"


def test_dump_ir_and_set_override(tiny, tmp_path):
    result = compile_cli(str(tiny), "-t", "cpu", "-o", str(tmp_path / "pkg"), "--dump-ir", str(tmp_path / "ir"),
                         "--set", "canonicalize.fold_scales=false", "--set", "runtime.kv_page_size=32")
    assert result.exit_code == 0, result.output
    passes = ["canonicalize", "gqa_rewrite", "quantize_kv", "fuse", "prune", "quantize", "attention_lowering",
              "select_logits", "shard", "bucketing", "memory_plan"]
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == [
        "00-input.ir", *(f"{i:02d}-{name}.ir" for i, name in enumerate(passes, 1))]
    plan = json.loads((tmp_path / "pkg" / "plan.json").read_text())
    assert plan["target"]["runtime"]["kv_page_size"] == 32
    assert plan["target"]["pipeline"][0]["options"] == {"fold_scales": False}


def write_target(tmp_path: Path, edit) -> Path:
    from llmc.resources import target_text
    import yaml

    raw = yaml.safe_load(target_text("cpu"))
    edit(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("edit, fragments", [
    (lambda r: r.__setitem__("memory_bandwith_bytes_per_s", 1.0),
     ["bad.yaml", "memory_bandwith_bytes_per_s", "memory_bandwidth_bytes_per_s"]),
    (lambda r: r["pipeline"].__setitem__(0, {"pass": "canonicalise"}),
     ["bad.yaml", "pipeline[0].pass", "canonicalize"]),
    (lambda r: r["pipeline"].__setitem__(0, {"pass": "canonicalize", "options": {"fold_scales": "often"}}),
     ["bad.yaml", "pipeline[0].options.fold_scales"]),
])
def test_bad_target_errors_name_file_key_and_closest_name(tiny, tmp_path, edit, fragments):
    target = write_target(tmp_path, edit)
    result = compile_cli(str(tiny), "--target", str(target), "-o", str(tmp_path / "pkg"))
    assert result.exit_code == 2
    message = " ".join(result.output.split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in result.output
    assert not (tmp_path / "pkg").exists()


def test_targets_and_passes_commands_list_builtins():
    listed = runner.invoke(app, ["targets"])
    assert listed.exit_code == 0 and all(n in listed.output for n in ("cpu", "h100", "a100", "l4"))
    passes = runner.invoke(app, ["passes"])
    assert passes.exit_code == 0 and "canonicalize" in passes.output and "fold_scales" in passes.output
