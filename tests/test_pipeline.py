"""The pass manager: registry, pipeline validation (file + key path + closest name), requires/provides
order, the verifier between passes, IR dumps, progress events, and the compile cache key."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import sys

import pytest

from llmc.errors import PipelineError, TargetError
from llmc.ir import Graph, GraphBuilder, Param, T, TensorType, format_graph
from llmc import pipeline as pipeline_module
from llmc.pipeline import (PASSES, PassOptions, PassRegistry, PassResult, cache_key, register_pass, run_pipeline,
                           validate_pipeline)
from llmc.target import load_target
from package_helpers import target_with




def small_graph() -> Graph:
    """x -> linear -> scale(2) -> scale(3) -> logits, plus a dead relu."""
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 4), "float32"))
    w = b.param(Param("w", TensorType((4, 4), "float32")))
    h = b.add("linear", [x, w])
    b.add("relu", [h])
    b.output("logits", b.add("scale", [b.add("scale", [h], factor=2.0)], factor=3.0))
    return b.build()


def keep(graph, ctx):
    return PassResult(graph, changed=False)


def drop_last_node(graph, ctx):
    """Deliberately broken: the output keeps pointing at the node it removed."""
    return PassResult(dataclasses.replace(graph, nodes=graph.nodes[:-1]), changed=True)


def explode(graph, ctx):
    raise ValueError("boom")


def test_registering_a_pass_name_twice_is_an_error():
    registry = PassRegistry()
    register_pass("keep", registry=registry)(keep)
    with pytest.raises(PipelineError, match=r"pass 'keep' is already registered \(by test_pipeline\)"):
        register_pass("keep", registry=registry)(explode)
    with pytest.raises(PipelineError, match=r"pass name 'fuse.qkv' must be an identifier"):
        register_pass("fuse.qkv", registry=registry)(keep)


def test_builtin_passes_register_on_lookup_with_their_source_hash():
    info = PASSES["canonicalize"]
    module = sys.modules[info.fn.__module__]
    assert info.source_hash == hashlib.sha256(inspect.getsource(module).encode()).hexdigest()
    assert info.provides == ("canonical",) and "canonicalize" in PASSES.names()
    with pytest.raises(PipelineError, match=r"unknown pass 'canonicalise'; did you mean 'canonicalize'"):
        PASSES["canonicalise"]


def test_unknown_pass_names_the_file_the_key_path_and_the_closest_name(tmp_path):
    with pytest.raises(TargetError) as err:
        target, source = target_with(tmp_path, [{"pass": "canonicalise"}])
        validate_pipeline(target, source)
    message = str(err.value)
    assert "target.yaml" in message and "pipeline[0].pass" in message
    assert "did you mean 'canonicalize'" in message


@pytest.mark.parametrize("options, key, hint", [
    ({"fold_scales": "sometimes"}, "pipeline[0].options.fold_scales", "valid boolean"),
    ({"fold_scale": False}, "pipeline[0].options.fold_scale", "did you mean 'fold_scales'"),
])
def test_bad_option_names_the_file_the_key_path_and_the_fix(tmp_path, options, key, hint):
    with pytest.raises(TargetError) as err:
        target, source = target_with(tmp_path, [{"pass": "canonicalize", "options": options}])
        validate_pipeline(target, source)
    message = str(err.value)
    assert "target.yaml" in message and key in message and hint in message


def test_valid_options_are_parsed_into_the_pass_options_model(tmp_path):
    target, source = target_with(tmp_path, [{"pass": "canonicalize", "options": {"fold_scales": False}}])
    [(info, options)] = validate_pipeline(target, source)
    assert info.name == "canonicalize" and options.fold_scales is False


def test_requires_must_be_provided_by_an_earlier_pass(tmp_path):
    registry = PassRegistry()
    register_pass("lower", requires=("canonical",), registry=registry)(keep)
    register_pass("canon", provides=("canonical",), registry=registry)(keep)
    register_pass("needs_raised", requires=("raised",), registry=registry)(keep)  # the frontend provides it
    target, source = target_with(tmp_path, [{"pass": "needs_raised"}, {"pass": "lower"}, {"pass": "canon"}])
    with pytest.raises(TargetError, match=r"target\.yaml: pipeline\[1\]\.pass: pass 'lower' requires "
                                          r"'canonical'.*pass 'canon' \(pipeline\[2\]\).*move it before"):
        validate_pipeline(target, source, registry)
    target, source = target_with(tmp_path, [{"pass": "lower"}])
    with pytest.raises(TargetError, match=r"add pass 'canon' \(it provides 'canonical'\) before pipeline\[0\]"):
        validate_pipeline(target, source, registry)
    target, source = target_with(tmp_path, [{"pass": "canon"}, {"pass": "lower"}])
    assert [info.name for info, _ in validate_pipeline(target, source, registry)] == ["canon", "lower"]


def test_the_verifier_runs_after_every_pass_and_names_the_passes_before(tmp_path):
    registry = PassRegistry()
    register_pass("keep", registry=registry)(keep)
    register_pass("drop_last_node", registry=registry)(drop_last_node)
    register_pass("explode", registry=registry)(explode)
    target, source = target_with(tmp_path, [{"pass": "keep"}, {"pass": "keep"}, {"pass": "drop_last_node"}])
    with pytest.raises(PipelineError, match=r"pass 'drop_last_node' \(pipeline\[2\], test_pipeline\) left invalid "
                                            r"IR: output 'logits' refers to undefined value .*; "
                                            r"passes run before it: keep, keep$"):
        run_pipeline(small_graph(), target, source=source, registry=registry)
    target, source = target_with(tmp_path, [{"pass": "explode"}])
    with pytest.raises(PipelineError, match=r"pass 'explode' .* failed: ValueError: boom; no pass ran before it") as err:
        run_pipeline(small_graph(), target, source=source, registry=registry)
    assert isinstance(err.value.__cause__, ValueError)


def test_run_records_each_pass_dumps_the_ir_and_reports_progress(tmp_path):
    registry = PassRegistry()
    register_pass("keep", registry=registry)(keep)
    registry.register(PASSES["canonicalize"])
    target, source = target_with(tmp_path, [{"pass": "keep"}, {"pass": "canonicalize"}])
    events = []
    dump = tmp_path / "ir"
    dump.mkdir()
    (dump / "07-stale.ir").write_text("from an earlier, longer run")
    report = run_pipeline(small_graph(), target, source=source, dump_dir=dump, registry=registry,
                          on_event=lambda kind, name, record: events.append((kind, name, record)))
    assert [(kind, name) for kind, name, _ in events] == [
        ("start", "keep"), ("end", "keep"), ("start", "canonicalize"), ("end", "canonicalize")]
    assert events[0][2] is None and events[-1][2] is report.records[-1]
    assert [(r.name, r.changed, r.nodes_before, r.nodes_after) for r in report.records] == [
        ("keep", False, 4, 4), ("canonicalize", True, 4, 2)]
    assert report.records[1].stats == {"dead": 2, "identity": 0, "folded": 1}
    assert all(r.seconds >= 0 for r in report.records)
    assert sorted(p.name for p in dump.iterdir()) == ["00-input.ir", "01-keep.ir", "02-canonicalize.ir"]
    assert (dump / "00-input.ir").read_text() == format_graph(small_graph()) + "\n"
    assert (dump / "02-canonicalize.ir").read_text() == format_graph(report.graph) + "\n"
    assert "seconds" not in report.as_dict(timings=False)["passes"][0]


class Factor(PassOptions):
    factor: float = 1.0


def test_cache_key_changes_with_options_sources_target_and_checkpoint(tmp_path, monkeypatch):
    registry = PassRegistry()
    register_pass("scaled", options=Factor, registry=registry)(keep)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    (ckpt / "model.safetensors").write_bytes(b"\0" * 64)

    def key(options: dict, **target_changes) -> str:
        target, source = target_with(tmp_path, [{"pass": "scaled", "options": options}])
        target = target.model_copy(update=target_changes)
        return cache_key(target, ckpt, validate_pipeline(target, source, registry))

    base = key({"factor": 2.0})
    assert key({"factor": 2.0}) == base                  # stable
    assert key({"factor": 2}) == base                    # the same validated options
    assert key({"factor": 3.0}) != base                  # an option
    assert key({"factor": 2.0}, name="renamed") != base  # the target record
    target, source = target_with(tmp_path, [{"pass": "scaled", "options": {"factor": 2.0}}])
    [(info, options)] = validate_pipeline(target, source, registry)
    edited = dataclasses.replace(info, source_hash="0" * 64)
    assert cache_key(target, ckpt, [(edited, options)]) != base  # the pass's source
    real = pipeline_module.generated_code_hash()
    assert len(real) == 64 and key({"factor": 2.0}) == base
    monkeypatch.setattr(pipeline_module, "generated_code_hash", lambda: "1" * 64)
    assert key({"factor": 2.0}) != base                  # codegen / runtime sources (model.py's code)
    monkeypatch.undo()
    (ckpt / "model.safetensors").write_bytes(b"\1" + b"\0" * 63)
    assert key({"factor": 2.0}) != base                  # the checkpoint's bytes
