"""Targets: built-in YAMLs validate, overrides apply, mistakes name the file, key path and fix."""

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from llmc.errors import LlmcError, TargetError
from llmc.resources import available_targets, target_text
from llmc.target import PassSpec, Target, load_target, schema_text

REPO = Path(__file__).resolve().parents[1]
BUILTINS = ["a100", "cpu", "h100", "l4"]


def test_the_builtin_targets_are_the_four_expected():
    assert available_targets() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_target_loads_and_points_editors_at_the_schema(name):
    target = load_target(name)
    assert isinstance(target, Target)
    assert target.name == name
    assert target.pipeline[0] == PassSpec(name="canonicalize")
    assert target.runtime.default_dtype in target.dtypes
    schema_comment = "# yaml-language-server: $schema=../specs/target.schema.json\n"
    assert target_text(name).startswith(schema_comment)


@pytest.mark.parametrize("name", BUILTINS)
def test_figures_are_positive_floats_in_the_yaml_itself(name):
    # PyYAML reads `30e9` as the string "30e9" (YAML 1.1 wants `3.0e+10`). Pydantic would coerce it,
    # but the JSON Schema an editor checks against would not, so the raw YAML must hold floats.
    raw = yaml.safe_load(target_text(name))
    figures = {"memory_bandwidth_bytes_per_s": raw["memory_bandwidth_bytes_per_s"],
               **{f"peak_flops.{k}": v for k, v in raw["peak_flops"].items()}}
    for key, value in figures.items():
        assert type(value) is float and value > 0, f"{name}.yaml {key} = {value!r}"
    target = load_target(name)
    assert all(type(v) is float for v in [target.memory_bandwidth_bytes_per_s,
                                           *target.peak_flops.values()])


def test_gpu_targets_carry_the_datasheet_figures():
    h100, a100, l4 = load_target("h100"), load_target("a100"), load_target("l4")
    assert (h100.device, h100.backend, h100.runtime.default_dtype) == ("cuda", "triton", "bfloat16")
    assert h100.memory_bandwidth_bytes_per_s == 3.35e12 and h100.peak_flops["bfloat16"] == 989e12
    assert (h100.compute_capability, h100.sm_count, h100.memory_bytes) == ("9.0", 132, 80 * 2**30)
    assert a100.peak_flops["int8"] == 624e12 and "float8_e4m3fn" not in a100.dtypes
    assert (l4.compute_capability, l4.sm_count) == ("8.9", 58)
    assert l4.peak_flops["float8_e4m3fn"] == 242.5e12


def test_name_with_suffix_and_file_path_load_the_same_target(tmp_path):
    copy = tmp_path / "mine.yaml"
    copy.write_text(target_text("h100"))
    assert load_target("h100") == load_target("h100.yaml") == load_target(str(copy))
    assert load_target(REPO / "targets" / "h100.yaml") == load_target("h100")


def test_unknown_target_suggests_the_closest_builtin():
    with pytest.raises(TargetError, match=r"no target 'h10'.*a100, cpu, h100, l4.*'h100'"):
        load_target("h10")


def test_targets_are_frozen():
    with pytest.raises(ValidationError):
        load_target("cpu").name = "other"


def test_schema_file_is_in_sync_with_the_models():
    assert (REPO / "specs" / "target.schema.json").read_text(encoding="utf-8") == schema_text(), (
        "specs/target.schema.json is stale: run `python -m llmc.target --write-specs`")


def _broken_cpu(tmp_path: Path, old: str, new: str) -> Path:
    text = target_text("cpu")
    assert old in text
    path = tmp_path / "broken.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def _line_of(path: Path, fragment: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if fragment in line)


def test_unknown_top_level_key_names_file_key_line_and_the_fix(tmp_path):
    path = _broken_cpu(tmp_path, "memory_bandwidth_bytes_per_s:", "memory_bandwith_bytes_per_s:")
    with pytest.raises(TargetError) as caught:
        load_target(str(path))
    message = str(caught.value)
    assert str(path) in message
    line = _line_of(path, "memory_bandwith_bytes_per_s:")
    assert f"memory_bandwith_bytes_per_s (line {line}): unknown key" in message
    assert "did you mean 'memory_bandwidth_bytes_per_s'?" in message
    assert isinstance(caught.value, LlmcError)  # the CLI prints it without a traceback


def test_unknown_nested_key_names_its_path_and_the_fix(tmp_path):
    path = _broken_cpu(tmp_path, "kv_page_size:", "kv_page_sise:")
    with pytest.raises(TargetError, match=re.escape(str(path))) as caught:
        load_target(str(path))
    assert "runtime.kv_page_sise" in str(caught.value)
    assert "did you mean 'runtime.kv_page_size'?" in str(caught.value)


def test_unknown_key_in_a_pipeline_step_names_its_index(tmp_path):
    step = "  - pass: canonicalize"
    path = _broken_cpu(tmp_path, step, f"{step}\n    optionz: {{}}")
    with pytest.raises(TargetError, match=r"pipeline\[0\]\.optionz .*'pipeline\[0\]\.options'"):
        load_target(str(path))


def test_bad_type_names_the_key_path_and_the_value(tmp_path):
    path = _broken_cpu(tmp_path, "kv_page_size: 16", "kv_page_size: many")
    with pytest.raises(TargetError, match=r"runtime\.kv_page_size .*integer.*'many'"):
        load_target(str(path))


@pytest.mark.parametrize("old, new, expected", [
    ("  float32: 1.57e+11", "  fp32: 1.57e+11", r"peak_flops\.fp32 .*'float32'"),
    ("max_num_seqs: 8", "max_num_seqs: 16", r"batch_buckets \(8\) is below max_num_seqs \(16\)"),
    ("[16, 32, 64", "[32, 16, 64", r"token_buckets must be positive and strictly increasing"),
    ("dtypes: [float32, bfloat16, float16]", "dtypes: [bfloat16]",
     r"peak_flops names dtypes missing from dtypes: \['float32'\]"),
    ("device: cpu", "device: cuda", r"cuda target needs compute_capability and sm_count"),
])
def test_inconsistent_values_are_rejected(tmp_path, old, new, expected):
    with pytest.raises(TargetError, match=expected):
        load_target(str(_broken_cpu(tmp_path, old, new)))


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: cpu\nruntime:\n  kv_page_size: [16\n  max_num_seqs: 8\n")
    with pytest.raises(TargetError, match=rf"{re.escape(str(path))}:4: invalid YAML.*line 3"):
        load_target(str(path))


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- cpu\n")
    with pytest.raises(TargetError, match="must be a mapping"):
        load_target(str(path))


def test_override_sets_a_target_field():
    target = load_target("cpu", ["runtime.kv_page_size=32", "peak_flops.bfloat16=1e12"])
    assert target.runtime.kv_page_size == 32
    assert target.peak_flops["bfloat16"] == 1e12  # "1e12" parses as a string, validated to float
    assert load_target("cpu").runtime.kv_page_size == 16  # the built-in is untouched


def test_override_naming_a_pass_sets_its_option():
    target = load_target("cpu", ["canonicalize.fold_scales=false"])
    assert target.pipeline[0].options == {"fold_scales": False}
    assert load_target("cpu", ["pipeline.0.options.fold_scales=true"]).pipeline[0].options == {
        "fold_scales": True}


@pytest.mark.parametrize("override, expected", [
    ("runtime.kv_page_sise=32", r"runtime\.kv_page_sise \(from --set runtime\.kv_page_sise=32\): "
                                r"unknown key; did you mean 'runtime\.kv_page_size'\?"),
    ("canonicalise.fold_scales=false",
     r"canonicalise \(from --set .*did you mean 'canonicalize'\?"),
    ("memory_bandwith_bytes_per_s=1e9", r"did you mean 'memory_bandwidth_bytes_per_s'\?"),
    ("runtime.kv_page_size=many", r"runtime\.kv_page_size \(from --set .*integer.*'many'"),
    ("runtime.max_num_seqs=16", r"runtime \(from --set .*below max_num_seqs \(16\)"),
])
def test_bad_override_names_the_key_path_and_the_fix(override, expected):
    with pytest.raises(TargetError, match=expected):
        load_target("cpu", [override])


@pytest.mark.parametrize("override, expected", [
    ("runtime", r"expected KEY=VALUE"),
    ("canonicalize=1", r"name an option, as canonicalize\.<option>=<value>"),
    ("runtime.kv_page_size.x=1", r"cannot set 'x' in runtime\.kv_page_size, which holds 16"),
    ("pipeline.42.options.x=1", r"cannot set 42 in pipeline"),
    ("runtime.kv_page_size=[1", r"not valid YAML"),
])
def test_malformed_override_is_rejected(override, expected):
    with pytest.raises(TargetError, match=expected):
        load_target("cpu", [override])


def test_override_of_a_pass_run_twice_asks_for_an_index(tmp_path):
    step = "  - pass: canonicalize"
    path = _broken_cpu(tmp_path, step, f"{step}\n{step}")
    with pytest.raises(TargetError, match=r"runs more than once.*pipeline\.<index>\.options"):
        load_target(str(path), ["canonicalize.fold_scales=false"])
    assert load_target(str(path), ["pipeline.1.options.fold_scales=false"]).pipeline[1].options
