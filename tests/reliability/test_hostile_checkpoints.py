"""Hostile checkpoints: damaged or malicious variants of the tiny Llama, each refused by the frontend
(``load_hf``, which `llmc compile`, `inspect`, `run` and `eval` go through) with a CheckpointError
naming the file and the key or tensor at fault. No code from the checkpoint runs, and nothing
outside the checkpoint directory is opened.

"Opened" is what the process reads: Python's ``open``, ``os.open`` and directory listings, seen by
an audit hook (PEP 578), plus the paths handed to safetensors' ``safe_open``, whose Rust code opens
files where no audit hook sees it. Code execution is caught by marker files that a malicious pickle
or a checkpoint's own Python module would write, and by the ``pickle.find_class`` audit event that
any unpickling of a global raises. Prints a table of the cases at the end (``pytest -s``).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
import sys
import time
import tracemalloc
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmc.frontend.checkpoint as checkpoint_module
from llmc.errors import CheckpointError
from llmc.examples_tiny import save_tiny_model
from llmc.frontend.hf import load_hf

UP = "model.layers.0.mlp.up_proj.weight"          # [128, 64] float32
EMBED = "model.embed_tokens.weight"               # [128, 64] float32, same shape as lm_head.weight
HEADER_LIMIT = 100_000_000                        # safetensors' own limit on the header length
FIGURES: list[tuple[str, str, str]] = []          # (case, error, read outside the directory)


# --- what the process opens and unpickles ------------------------------------------------------------

@dataclass
class Watch:
    """Paths opened or listed, and globals unpickled, while a ``watching`` block ran."""

    root: Path
    opened: list[str] = field(default_factory=list)
    unpickled: list[str] = field(default_factory=list)

    def outside(self) -> list[str]:
        root = self.root.resolve()
        return sorted({p for p in self.opened if not Path(p).resolve().is_relative_to(root)})


_ACTIVE: list[Watch] = []  # the audit hook cannot be removed, so it records only while a watch is on


def _audit(event: str, args: tuple) -> None:
    if not _ACTIVE:
        return
    if event in ("open", "os.listdir", "os.scandir") and isinstance(args[0], (str, bytes, Path)):
        _ACTIVE[-1].opened.append(str(args[0], "utf-8", "replace") if isinstance(args[0], bytes) else str(args[0]))
    elif event == "pickle.find_class":
        _ACTIVE[-1].unpickled.append(f"{args[0]}.{args[1]}")


@pytest.fixture(scope="module")
def watching(monkeypatch_module) -> Callable[[Path], object]:
    sys.addaudithook(_audit)
    real_safe_open = checkpoint_module.safe_open

    def recording_safe_open(filename, *args, **kwargs):
        if _ACTIVE:
            _ACTIVE[-1].opened.append(str(filename))
        return real_safe_open(filename, *args, **kwargs)

    monkeypatch_module.setattr(checkpoint_module, "safe_open", recording_safe_open)

    @contextmanager
    def watch(root: Path) -> Iterator[Watch]:
        _ACTIVE.append(Watch(root))
        try:
            yield _ACTIVE[-1]
        finally:
            _ACTIVE.pop()

    return watch


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# --- building the variants ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = save_tiny_model("llama", tmp_path_factory.mktemp("hostile") / "tiny-llama")
    load_hf(path)  # a clean import first, so later watches see the checkpoint's reads, not lazy imports
    return path


def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_header(d: Path, edit: Callable[[dict], None]) -> None:
    header, data = _header(d / "model.safetensors")
    edit(header)
    _write(d / "model.safetensors", header, data)


def _edit_config(d: Path, **fields) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **fields}))


def _edit_tensor(d: Path, name: str, index: tuple[int, int], value: float) -> None:
    tensors = load_file(d / "model.safetensors")
    tensors[name][index] = value
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


class _RunsCodeWhenUnpickled:
    """Unpickling this calls exec(), which creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({EMBED: _RunsCodeWhenUnpickled(marker)})


def _index_pointing_at(d: Path, shard_of_up: str) -> None:
    """Shard the checkpoint as one file plus an index whose entry for UP names ``shard_of_up``."""
    shard = d / "model-00001-of-00001.safetensors"
    (d / "model.safetensors").rename(shard)
    weight_map = {name: shard.name for name in _header(shard)[0] if name != "__metadata__"}
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {**weight_map, UP: shard_of_up}}))


def _decoy(d: Path) -> Path:
    """A valid safetensors file beside the checkpoint directory, holding UP: what a naive loader would read."""
    decoy = d.parent / "outside" / "decoy.safetensors"
    decoy.parent.mkdir(exist_ok=True)
    save_file({UP: torch.zeros(128, 64)}, decoy)
    return decoy


def _truncate(d: Path) -> None:
    file = d / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _length_beyond_file(d: Path) -> None:
    file = d / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes(struct.pack("<Q", len(raw) + 1000) + raw[8:])


def _length_over_limit(d: Path) -> None:
    # A sparse 300 MB file, so the 200 MB length fits the file and only the limit refuses it.
    with (d / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", 2 * HEADER_LIMIT))
        f.truncate(8 + 3 * HEADER_LIMIT)


def _overlap(d: Path) -> None:
    _edit_header(d, lambda h: h[EMBED].update(data_offsets=h["lm_head.weight"]["data_offsets"]))


def _out_of_range(d: Path) -> None:
    _edit_header(d, lambda h: h[UP].update(data_offsets=[h[UP]["data_offsets"][0] + 2**40,
                                                         h[UP]["data_offsets"][1] + 2**40]))


def _trailing_bytes(d: Path) -> None:
    with (d / "model.safetensors").open("ab") as f:
        f.write(b"\0" * 64)


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(_malicious_pickle(d.parent / "markers" / "pickle-ran"))


def _pickle_beside_safetensors(d: Path) -> None:
    (d / "pytorch_model.bin").write_bytes(_malicious_pickle(d.parent / "markers" / "pickle-ran"))


def _remote_code(d: Path) -> None:
    marker = d.parent / "markers" / "module-ran"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                        "class EvilConfig: pass\nclass EvilForCausalLM: pass\n")
    _edit_config(d, auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                              "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path], None]
    message: str | None      # regex the CheckpointError must match; None: the checkpoint must load
    never_opened: tuple[str, ...] = ()  # files in the directory that must not even be read
    max_allocated: int | None = None    # bound on Python allocations during the refusal, where it matters


CASES = [
    Case("truncated safetensors", _truncate,
         rf"model\.safetensors: tensor '[^']+': data_offsets \[\d+, \d+\] lie outside the \d+ data bytes .*truncated"),
    Case("header length beyond the file", _length_beyond_file,
         r"model\.safetensors: header length \d+ is impossible for a \d+-byte file"),
    Case("header length over 100 MB", _length_over_limit,
         r"model\.safetensors: header length 200000000 is impossible: it exceeds the 100000000-byte limit",
         max_allocated=HEADER_LIMIT // 100),  # refused before the 200 MB read, not after
    Case("overlapping tensor offsets", _overlap,
         rf"model\.safetensors: tensor '(lm_head\.weight|{EMBED})' \(data_offsets \[0, 32768\]\) overlaps tensor "
         rf"'(lm_head\.weight|{EMBED})'"),
    Case("out-of-range tensor offsets", _out_of_range,
         rf"model\.safetensors: tensor '{UP}': data_offsets \[\d+, \d+\] lie outside the \d+ data bytes"),
    Case("bytes no tensor covers", _trailing_bytes,
         r"model\.safetensors: 64 trailing data bytes after the last tensor belong to no tensor"),
    Case("dtype vs config mismatch (F32 stored as I32)", lambda d: _edit_header(d, lambda h: h[UP].update(dtype="I32")),
         rf"model\.safetensors: tensor '{UP}' has dtype torch\.int32, but the model built from config\.json expects "
         "a floating-point tensor"),
    Case("shape vs config mismatch", lambda d: _edit_config(d, intermediate_size=96),
         rf"model\.safetensors: tensor '{UP}' has shape \(128, 64\) but config\.json implies \(96, 64\)"),
    Case("NaN weight", lambda d: _edit_tensor(d, UP, (3, 5), float("nan")),
         rf"model\.safetensors: tensor '{UP}' holds 1 NaN and 0 infinite value\(s\) .* \(first at index \(3, 5\)\)"),
    Case("Inf weight", lambda d: _edit_tensor(d, EMBED, (7, 1), float("-inf")),
         rf"model\.safetensors: tensor '{EMBED}' holds 0 NaN and 1 infinite value\(s\) .* \(first at index \(7, 1\)\)"),
    Case("pytorch_model.bin only (code-running pickle)", _pickle_only,
         r"found only pickle weights \(pytorch_model\.bin\); llmc loads safetensors only and never unpickles",
         never_opened=("pytorch_model.bin",)),
    Case("code-running pickle beside model.safetensors", _pickle_beside_safetensors, None,
         never_opened=("pytorch_model.bin",)),
    Case("auto_map (remote code) in config.json", _remote_code,
         r"config\.json: 'auto_map' asks for custom model code; llmc never runs code from a checkpoint",
         never_opened=("modeling_evil.py",)),
    Case("index maps a tensor to ../../etc/passwd", lambda d: _index_pointing_at(d, "../../etc/passwd"),
         r"model\.safetensors\.index\.json: shard '\.\./\.\./etc/passwd' is not a file name inside the checkpoint"),
    Case("index maps a tensor to /etc/passwd", lambda d: _index_pointing_at(d, "/etc/passwd"),
         r"model\.safetensors\.index\.json: shard '/etc/passwd' is not a file name inside the checkpoint"),
    Case("index maps a tensor to ../outside/decoy.safetensors",
         lambda d: (_decoy(d), _index_pointing_at(d, "../outside/decoy.safetensors")),
         r"model\.safetensors\.index\.json: shard '\.\./outside/decoy\.safetensors' is not a file name inside"),
    Case("index maps a tensor to an absolute decoy path", lambda d: _index_pointing_at(d, str(_decoy(d))),
         r"model\.safetensors\.index\.json: shard '/.*/outside/decoy\.safetensors' is not a file name inside"),
]


@pytest.fixture(scope="module", autouse=True)
def print_figures():
    start = time.perf_counter()
    yield
    width = max((len(case) for case, _, _ in FIGURES), default=4)
    print(f"\n\nhostile checkpoints ({len(FIGURES)} cases, {time.perf_counter() - start:.1f} s with the tiny model's "
          "build); <dir> is the checkpoint directory")
    print(f"{'case':<{width}}  {'read outside':<14}  error")
    for case, error, outside in FIGURES:
        print(f"{case:<{width}}  {outside:<14}  {error}")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_checkpoint_is_refused_cleanly(case: Case, base: Path, watching, tmp_path: Path) -> None:
    d = Path(shutil.copytree(base, tmp_path / "ckpt"))
    (tmp_path / "markers").mkdir()
    case.damage(d)
    error: CheckpointError | None = None
    if case.max_allocated is not None:
        tracemalloc.start()  # only here: tracing every allocation slows an import several times
    try:
        with watching(d) as watch:
            try:
                load_hf(d)
            except CheckpointError as exc:
                error = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    if case.message is None:
        assert error is None, f"{case.name}: {error}"
    else:
        assert error is not None, f"{case.name}: the checkpoint was accepted"
        assert error.__class__ is CheckpointError
        assert str(d) in str(error), "the message names the file by its path"
        assert re.search(case.message, str(error)), str(error)
    # Nothing ran: no marker written, no global unpickled, no code file of the checkpoint read.
    assert list((tmp_path / "markers").iterdir()) == []
    assert watch.unpickled == []
    assert not {str(d / name) for name in case.never_opened} & set(watch.opened)
    assert watch.outside() == [], f"{case.name}: opened outside {d}: {watch.outside()}"
    if case.max_allocated is not None:
        assert peak < case.max_allocated, f"{peak} bytes allocated for a refused header"
    shown = " ".join(str(error).replace(str(d), "<dir>").replace(str(tmp_path), "<tmp>").split()) if error \
        else "none: loads; the .bin is never read"
    FIGURES.append((case.name, shown if len(shown) <= 150 else shown[:147] + "...",
                    f"no ({len(set(watch.opened))} opened)"))


def test_watch_sees_reads_outside_and_unpickling(base: Path, watching, tmp_path: Path) -> None:
    """The instrument itself: an open outside the directory, a safe_open of the decoy and an unpickling
    are all recorded, and the malicious pickle really runs code when unpickled."""
    d = Path(shutil.copytree(base, tmp_path / "ckpt"))
    decoy, marker = _decoy(d), tmp_path / "ran"
    with watching(d) as watch:
        decoy.read_bytes()
        with checkpoint_module.safe_open(str(decoy), framework="pt"):
            pass
        pickle.loads(_malicious_pickle(marker))
    assert watch.outside() == sorted([str(decoy.resolve()), str(marker.resolve())])  # the exec wrote the marker
    assert watch.opened.count(str(decoy)) == 2 and "builtins.exec" in watch.unpickled
    assert marker.exists()
