"""Checkpoint.open: the happy path on a tiny Llama, and one clear CheckpointError per kind of damage."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers

from llmc.errors import CheckpointError
from llmc.frontend.checkpoint import Checkpoint, TensorInfo

UP = "model.layers.0.mlp.up_proj.weight"


def _tiny_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """One tiny model saved twice (single file and sharded); built once because it is the slow part."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_config())
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20KB")
    return single, sharded, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def ckpt_dir(saved: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path) -> Path:
    """A private copy of the single-file checkpoint that a test may damage."""
    return Path(shutil.copytree(saved[0], tmp_path / "ckpt"))


def _rewrite_header(file: Path, edit) -> None:
    """Apply `edit` to the parsed safetensors header and write the file back with the data unchanged."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_happy_path(saved: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    ckpt = Checkpoint.open(saved[0])
    state = saved[2]
    assert ckpt.config["intermediate_size"] == 64
    assert ckpt.keys() == sorted(ckpt.keys())
    assert set(ckpt.keys()) <= set(state) and UP in ckpt
    assert ckpt.info(UP) == TensorInfo(UP, (64, 32), torch.float32, saved[0] / "model.safetensors")
    for key in ckpt.keys():
        torch.testing.assert_close(ckpt.load(key), state[key], rtol=0, atol=0)


def test_sharded_checkpoint_loads(saved: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    sharded = saved[1]
    assert (sharded / "model.safetensors.index.json").is_file()
    ckpt = Checkpoint.open(sharded)
    assert len({ckpt.info(k).file for k in ckpt.keys()}) > 1
    assert ckpt.keys() == Checkpoint.open(saved[0]).keys()
    torch.testing.assert_close(ckpt.load(UP), saved[2][UP], rtol=0, atol=0)


def test_missing_shard_names_index_and_shard(saved: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    d = Path(shutil.copytree(saved[1], tmp_path / "ckpt"))
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json.*{shard.name}"):
        Checkpoint.open(d)


def test_unknown_key_suggests_close_names(saved: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.wieght'.*did you mean.*up_proj\.weight"):
        Checkpoint.open(saved[0]).load("model.layers.0.mlp.up_proj.wieght")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope"):
        Checkpoint.open(tmp_path / "nope")


def test_truncated_file_names_file(ckpt_dir: Path) -> None:
    file = ckpt_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        Checkpoint.open(ckpt_dir)


def test_file_shorter_than_length_prefix(ckpt_dir: Path) -> None:
    (ckpt_dir / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        Checkpoint.open(ckpt_dir)


def test_huge_header_length_names_file(ckpt_dir: Path) -> None:
    file = ckpt_dir / "model.safetensors"
    file.write_bytes(struct.pack("<Q", 2**62) + file.read_bytes()[8:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header length \d+ is impossible"):
        Checkpoint.open(ckpt_dir)


def test_broken_header_json_names_file(ckpt_dir: Path) -> None:
    file = ckpt_dir / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[8] = ord("#")  # the header's opening brace
    file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header is not valid JSON"):
        Checkpoint.open(ckpt_dir)


def test_offsets_past_end_name_tensor(ckpt_dir: Path) -> None:
    def stretch(header: dict) -> None:
        header[UP]["data_offsets"][1] += 10**9

    _rewrite_header(ckpt_dir / "model.safetensors", stretch)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{UP}': data_offsets .* outside"):
        Checkpoint.open(ckpt_dir)


def test_byte_count_must_match_shape(ckpt_dir: Path) -> None:
    def reshape(header: dict) -> None:
        header[UP]["shape"] = [64, 16]

    _rewrite_header(ckpt_dir / "model.safetensors", reshape)
    with pytest.raises(CheckpointError, match=rf"tensor '{UP}': holds 8192 bytes but shape \(64, 16\)"):
        Checkpoint.open(ckpt_dir)


def test_missing_config(ckpt_dir: Path) -> None:
    (ckpt_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        Checkpoint.open(ckpt_dir)


def test_broken_config_json_names_line_and_column(ckpt_dir: Path) -> None:
    (ckpt_dir / "config.json").write_text('{\n  "hidden_size": 32,\n  oops\n}\n')
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON at line 3, column 3"):
        Checkpoint.open(ckpt_dir)


def test_pickle_only_is_refused(ckpt_dir: Path) -> None:
    (ckpt_dir / "model.safetensors").unlink()
    (ckpt_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors only.*pickle.*safe_serialization=True"):
        Checkpoint.open(ckpt_dir)


def test_no_weights_at_all(ckpt_dir: Path) -> None:
    (ckpt_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        Checkpoint.open(ckpt_dir)


def test_shape_mismatch_names_tensor_and_both_shapes(ckpt_dir: Path) -> None:
    cfg_file = ckpt_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["intermediate_size"] = 128
    cfg_file.write_text(json.dumps(cfg))
    ckpt = Checkpoint.open(ckpt_dir)
    # The meta device gives shapes without allocating or initializing weights.
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ckpt.config))
    expected = {k: (tuple(v.shape), None) for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        ckpt.check_shapes(expected)
    msg = str(err.value)
    assert f"model.safetensors: tensor '{UP}' has shape (64, 32) but config.json implies (128, 32)" in msg
    assert "gate_proj.weight' has shape (64, 32)" in msg and "down_proj.weight' has shape (32, 64)" in msg
    assert "3 tensor(s) differ" in msg


def test_check_shapes_returns_missing_and_unexpected(saved: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    ckpt = Checkpoint.open(saved[0])
    expected = {k: (ckpt.info(k).shape, ckpt.info(k).dtype) for k in ckpt.keys() if k != "lm_head.weight"}
    expected["extra.weight"] = ((1,), None)
    result = ckpt.check_shapes(expected)
    assert result.missing == ["extra.weight"]
    assert result.unexpected == ["lm_head.weight"]
