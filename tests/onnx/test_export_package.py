"""`llmc export-onnx PACKAGE`: a compiled package's ir.json exports to the very ONNX model that the
checkpoint it came from exports to with the same target and options (float32 and int4), and the
errors for an old package without ir.json and for --target/--set given with a package."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from llmc.cli import app
from llmc.codegen.onnx_export import SIDE_FILES, export_package
from llmc.compiler import compile_model
from llmc.errors import LlmcError

from onnx_helpers import PROMPT, session

INT4 = ("quantize.scheme=int4", "quantize.group_size=32")


@pytest.fixture(scope="module")
def int4_package(tmp_path_factory, llama_dir):
    return compile_model(llama_dir, "cpu", tmp_path_factory.mktemp("int4-pkg") / "pkg", overrides=INT4).out_dir


def prefill(path):
    sess = session(path)
    feeds = {"input_ids": np.array(PROMPT, np.int64), "positions": np.arange(len(PROMPT), dtype=np.int64)}
    for i in sess.get_inputs()[2:]:  # past_key_values.*: empty for a prefill
        feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return sess.run(None, feeds)


@pytest.mark.parametrize("variant", ["plain", "int4"])
def test_package_exports_what_its_checkpoint_exports(variant, tiny_llama_cpu_package, int4_package, exported,
                                                     tmp_path):
    package, overrides = (tiny_llama_cpu_package, ()) if variant == "plain" else (int4_package, INT4)
    from_checkpoint, checkpoint_graph = exported("llama", *overrides)
    path, graph = export_package(package, tmp_path / "model.onnx", external_data_threshold=None)
    assert graph == checkpoint_graph
    mine, theirs = onnx.load(str(path)), onnx.load(str(from_checkpoint))
    assert mine.SerializeToString() == theirs.SerializeToString()  # nodes, weights and metadata
    assert "llmc.config" in {p.key for p in mine.metadata_props}
    for name in SIDE_FILES:
        if (from_checkpoint.parent / name).is_file():
            assert (tmp_path / name).read_bytes() == (from_checkpoint.parent / name).read_bytes(), name
    assert all(np.array_equal(a, b) for a, b in zip(prefill(path), prefill(from_checkpoint)))
    if variant == "int4":
        assert any(n.op_type == "MatMulNBits" for n in mine.graph.node)


def test_package_without_ir_json_says_to_recompile(tiny_llama_cpu_package, tmp_path):
    old = tmp_path / "old-pkg"
    shutil.copytree(tiny_llama_cpu_package, old)
    (old / "ir.json").unlink()
    with pytest.raises(LlmcError, match=r"old-pkg has no ir\.json.*recompile it with `llmc compile"):
        export_package(old, tmp_path / "model.onnx")


def test_cli_exports_a_package_and_refuses_target_options_for_it(tiny_llama_cpu_package, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export-onnx", str(tiny_llama_cpu_package), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "config.json").is_file()
    for extra in (["--target", "cpu"], ["--set", "quantize.scheme=int4"]):
        result = runner.invoke(app, ["export-onnx", str(tiny_llama_cpu_package), "-o", str(tmp_path / "x.onnx"),
                                     *extra])
        assert result.exit_code == 2
        assert "already compiled for its target" in " ".join(result.output.split())
        assert not (tmp_path / "x.onnx").exists()
