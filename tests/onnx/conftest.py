"""Fixtures of the ONNX tests: tiny checkpoints exported once per session (onnx and onnxruntime
are optional dependencies: without them these tests skip)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from llmc.codegen.onnx_export import export_checkpoint  # noqa: E402
from llmc.examples_tiny import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def llama_dir(tiny_llama_cpu_package) -> Path:
    """The seed-0 tiny Llama the shared cpu package was compiled from (so its compile is reused)."""
    return tiny_llama_cpu_package.parent / "tiny-llama"


@pytest.fixture(scope="session")
def exported(tmp_path_factory, llama_dir):
    """exported(arch, *overrides) -> (model.onnx path, the exported IR graph), made once per session."""
    made: dict[tuple, tuple[Path, object]] = {}

    def export(arch: str, *overrides: str):
        key = (arch, *overrides)
        if key not in made:
            root = tmp_path_factory.mktemp(f"onnx-{arch}")
            model = llama_dir if arch == "llama" else save_tiny_model(arch, root / arch)
            made[key] = export_checkpoint(model, root / "export" / "model.onnx", "cpu", overrides=overrides,
                                          external_data_threshold=None)
        return made[key]

    return export
