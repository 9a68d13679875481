"""The frontend's errors on bad input: each names the file, tensor or module and gives a hint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from llmc.errors import CheckpointError, UnsupportedModelError
from llmc.frontend.hf import load_hf

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(path)
    return path


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(saved, dst)
    return dst


def test_unsupported_activation_names_module_class_and_ops(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, hidden_act="mish")).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        load_hf(tmp_path)
    msg = str(err.value)
    assert "module 'model.layers.0.mlp.act_fn'" in msg
    assert "Mish" in msg                              # the module class
    assert "aten.mish.default" in msg                 # the ATen ops found
    assert "llmc/frontend/patterns.py" in msg and "plugin" in msg  # how to add a pattern


def test_truncated_weights_name_the_file(copy):
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(copy)


def test_bad_header_names_the_file(copy):
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"{not-js!"
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*header"):
        load_hf(copy)


def test_config_weight_shape_mismatch_names_the_tensor(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_hf(copy)
    msg = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg
    assert "(64, 32)" in msg and "(96, 32)" in msg


def test_remote_code_is_refused(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        load_hf(copy)


def test_pickle_weights_are_refused(copy):
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_hf(copy)


def test_unknown_model_type_names_config(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "no-such-model"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(copy)
