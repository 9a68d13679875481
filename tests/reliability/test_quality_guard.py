"""The quality bound of a target (``quality.max_kl``, ``quality.on_exceed``): after a lossy pass,
`llmc compile` holds the measured mean KL to it, failing with the number, the bound and the lossy
passes, or (``on_exceed: warn``) recording a warning in report.json that the CLI prints.

The tiny Llama quantized to int4 in groups of 32 moves its logits a little (mean KL about 5e-5 over
64 random ids), so 1e-7 is a bound it must exceed and 1.0 one it must meet. Prints the figures at the
end (``pytest -s``).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmc.cli import app
from llmc.compiler import check_quality_bound, compile_model
from llmc.errors import PipelineError, TargetError
from llmc.examples_tiny import save_tiny_model
from llmc.pipeline import validate_pipeline
from llmc.target import load_target, load_target_with_source

INT4_G32 = ["quantize.scheme=int4", "quantize.group_size=32"]
QUALITY_TOKENS = 64  # the default 1,024 would cost seconds per compile and decide nothing more here
TINY_BOUND, GENEROUS_BOUND = 1e-7, 1.0
FIGURES: list[tuple[str, str, str]] = []  # (case, outcome, seconds)
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("guard") / "tiny-llama")


@pytest.fixture(scope="module", autouse=True)
def print_figures():
    yield
    width = max((len(case) for case, _, _ in FIGURES), default=4)
    print(f"\n\nquality guard, tiny llama, quantize int4 g32, {QUALITY_TOKENS} scored tokens")
    print(f"{'case':<{width}}  {'seconds':>7}  outcome")
    for case, outcome, seconds in FIGURES:
        print(f"{case:<{width}}  {seconds:>7}  {outcome}")


def _compile_cli(tiny: Path, out: Path, *sets: str):
    start = time.perf_counter()
    args = ["compile", str(tiny), "-t", "cpu", "-o", str(out), "--quality-tokens", str(QUALITY_TOKENS)]
    for override in [*INT4_G32, *sets]:
        args += ["--set", override]
    result = runner.invoke(app, args)
    return result, f"{time.perf_counter() - start:.1f}"


def test_built_in_targets_have_no_bound():
    for name in ("cpu", "h100", "a100", "l4"):
        assert load_target(name).quality.max_kl is None, name
    bound = load_target("cpu", ["quality.max_kl=0.01", "quality.on_exceed=warn"]).quality
    assert (bound.max_kl, bound.on_exceed) == (0.01, "warn")


@pytest.mark.parametrize("override, message", [
    ("quality.max_kl=-1", r"quality\.max_kl \(from --set quality\.max_kl=-1\): Input should be greater than or "
                          r"equal to 0"),
    ("quality.on_exceed=ignore", r"quality\.on_exceed \(from --set quality\.on_exceed=ignore\): Input should be "
                                 r"'error' or 'warn'"),
    ("quality.maxkl=0.1", r"did you mean 'quality\.max_kl'\?"),
])
def test_bad_bound_is_a_target_error(override, message):
    with pytest.raises(TargetError, match=message):
        load_target("cpu", [override])


def test_tiny_bound_fails_naming_kl_bound_and_passes(tiny, tmp_path):
    out = tmp_path / "pkg"
    result, seconds = _compile_cli(tiny, out, f"quality.max_kl={TINY_BOUND}")
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())  # one line, whatever width the console wrapped at
    measured = re.search(r"mean KL\(unoptimized \|\| compiled\) (\S+) over 64 scored tokens exceeds "
                         r"quality\.max_kl=1e-07 of target cpu", message)
    assert measured, message
    assert float(measured.group(1)) > TINY_BOUND
    assert "lossy passes: quantize(scheme='int4', group_size=32)" in message
    assert "Traceback" not in result.output
    assert not out.exists()  # the guard runs before codegen: no package for a failed compile
    FIGURES.append((f"max_kl={TINY_BOUND:g}, on_exceed=error", f"exit 2, KL {measured.group(1)}", seconds))


def test_generous_bound_passes(tiny, tmp_path):
    start = time.perf_counter()
    result = compile_model(tiny, "cpu", tmp_path / "pkg", overrides=[*INT4_G32, f"quality.max_kl={GENEROUS_BOUND}"],
                           quality_tokens=QUALITY_TOKENS)
    seconds = f"{time.perf_counter() - start:.1f}"
    kl = result.compile_report["quality"]["kl"]
    assert 0 < kl <= GENEROUS_BOUND
    assert "warnings" not in result.compile_report
    report = json.loads((tmp_path / "pkg" / "report.json").read_text())
    assert report["lossy_passes"] == ["quantize"] and "warnings" not in report
    FIGURES.append((f"max_kl={GENEROUS_BOUND:g}, on_exceed=error", f"compiled, KL {kl:.3g}", seconds))


def test_warn_mode_compiles_and_records_the_warning(tiny, tmp_path):
    out = tmp_path / "pkg"
    result, seconds = _compile_cli(tiny, out, f"quality.max_kl={TINY_BOUND}", "quality.on_exceed=warn")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    [warning] = report["warnings"]
    assert f"{report['quality']['kl']:.6g} over 64 scored tokens exceeds quality.max_kl=1e-07" in warning
    assert "lossy passes: quantize(scheme='int4', group_size=32)" in warning
    assert f"warning: {warning}" in " ".join(result.stderr.split())
    FIGURES.append((f"max_kl={TINY_BOUND:g}, on_exceed=warn", "compiled, 1 warning in report.json", seconds))


def test_unmeasured_or_nan_kl_is_not_a_pass():
    # --quality-tokens 0 skips the measurement; a bound that cannot be checked must not pass silently.
    target, source = load_target_with_source("cpu", [*INT4_G32, "quality.max_kl=1"])
    skipped = {"lossy_passes": ["quantize"], "quality": None}
    with pytest.raises(PipelineError, match=r"quality\.max_kl=1 of target cpu .* cannot be checked: "
                                            r"--quality-tokens 0 skipped the measurement after lossy passes "
                                            r"quantize\(scheme='int4', group_size=32\)"):
        check_quality_bound(skipped, target, source, validate_pipeline(target, source))
    lenient, _ = load_target_with_source("cpu", [*INT4_G32, "quality.max_kl=1", "quality.on_exceed=warn"])
    [warning] = check_quality_bound(skipped, lenient, source, validate_pipeline(lenient, source))
    assert "cannot be checked" in warning
    broken = {"lossy_passes": ["quantize"], "quality": {"kl": math.nan, "tokens": 64}}
    with pytest.raises(PipelineError, match=r"mean KL\(unoptimized \|\| compiled\) nan over 64 scored tokens exceeds"):
        check_quality_bound(broken, target, source, validate_pipeline(target, source))
    lossless = {"lossy_passes": [], "quality": None}  # nothing lossy ran: nothing to hold to the bound
    assert check_quality_bound(lossless, target, source, validate_pipeline(target, source)) == []
