"""bench/gpu.py: its arithmetic, and a whole ``--smoke`` run on CPU under the Triton interpreter."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402  (bench/gpu.py)
from gpu_cases import Case  # noqa: E402


def test_check_flags_a_kernel_that_disagrees():
    x = torch.randn(4, 8)
    case = Case("double", "", (x,), reference=lambda t: t * 2, nbytes=0, tolerance=1e-3)
    assert gpu.check(lambda t: t * 2, case).startswith("ok")
    assert "MISMATCH" in gpu.check(lambda t: t * 2.01, case)


def test_check_compares_the_argument_an_in_place_op_writes():
    pages = torch.zeros(3)
    case = Case("write", "", (pages, 1.0), reference=lambda p, v: p.fill_(v), nbytes=0, result_arg=0)
    assert gpu.check(lambda p, v: None, case).startswith("**MISMATCH**")  # wrote nothing
    assert gpu.check(lambda p, v: p.fill_(v), case).startswith("ok")
    assert torch.equal(pages, torch.zeros(3))  # both sides ran on copies


def test_decode_rate_leaves_prefill_out(monkeypatch):
    """A fake clock: every generate costs 0.5 s of prefill plus 10 ms per token -> 100 tokens/s."""
    clock = [0.0]

    def generate(n):
        clock[0] += 0.5 + 0.01 * n
    monkeypatch.setattr(gpu.time, "perf_counter", lambda: clock[0])
    assert gpu.decode_rate(generate, 65, 3, lambda: None) == pytest.approx(100.0)


@pytest.mark.slow
def test_smoke_run_writes_the_tables(tmp_path):
    """The whole script on tiny shapes: interpreted kernels, and tiny-model decodes (the h100 packages
    under the interpreter): about 40 s of CPU."""
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--results", str(results)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert "## Triton backend kernels and decode" in text and "`python bench/gpu.py --smoke" in text
    assert re.search(r"measured copy bandwidth \d+\.\d GB/s", text)
    for name in ("linear_int4", "linear_int8", "linear_fp8", "linear_w8a8"):
        for tokens in (1, 17):  # decode (split-K) and prefill tiles, checked against quant.py
            assert re.search(rf"^\| {name} T={tokens} \[\d+x\d+\] \| [\d.]+ \| [\d.]+ \| \d+ \| \d+% \| ok \(",
                             text, re.M), name
    for template in (ROOT / "codegen" / "templates" / "triton").glob("*.py.jinja"):
        assert re.search(rf"^\| {template.name.removesuffix('.py.jinja')}\b", text, re.M), template.name
    assert "skipped HF torch.compile + static cache (bf16): needs CUDA" in proc.stdout
    eager = re.search(r"^\| HF transformers eager \(bf16\) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", text, re.M)
    assert eager and float(eager.group(1)) > 0
    for label in ("llmc h100 bf16", "llmc h100 int4 g128"):  # a figure, or the reason it has none
        assert re.search(rf"^\| {label} \| ([\d.]+ \| [\d.]+ \| [\d.]+ \||— .*failed: )", text, re.M), label
    # The packages decode through the engine (when the h100 ones cannot, the cpu one proves the harness).
    llmc = re.findall(r"^\| llmc [^|]+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", text, re.M)
    assert llmc and all(float(rate) > 0 for rate in llmc)


def test_goals_say_met_or_not_and_why_a_figure_is_missing():
    results = {"llmc h100 bf16": (300.0, [], 0.83), "llmc h100 int4 g128": (400.0, [], 0.5),
               "HF torch.compile + static cache (bf16)": (280.0, [], 0.7)}
    lines = gpu.goals(results, "h100")
    assert lines == ["- bf16 decode at 83% of the measured copy bandwidth (goal >= 80%): met",
                     "- int4 decode at 1.43x HF torch.compile (goal >= 1.5x): not met"]
    missing = gpu.goals({}, "h100")
    assert "no llmc bf16 figure" in missing[0] and "needs both" in missing[1]
