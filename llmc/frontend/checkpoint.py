"""Open a Hugging Face checkpoint directory: config.json plus safetensors weights, validated up front."""

from __future__ import annotations

import difflib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from llmc.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Pickle formats can run arbitrary code on load, so we refuse them rather than fall back.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The safetensors library itself refuses headers above 100 MB; a bigger length is garbage.
_MAX_HEADER_BYTES = 100_000_000
_MAX_REPORTED = 10

# safetensors dtype codes (the spec's names) -> torch dtypes; sub-byte formats are left out
# because their byte size is not numel * itemsize.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a safetensors header (no data loaded)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


@dataclass(frozen=True)
class ShapeCheck:
    """Names the model expects but the checkpoint lacks, and names the checkpoint has but the model does not."""

    missing: list[str]
    unexpected: list[str]


class Checkpoint:
    """A validated checkpoint directory; tensors are loaded lazily, one per `load` call."""

    def __init__(self, path: Path, config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
        self.path = path
        self.config = config
        self._tensors = tensors

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Check the directory, config.json and every safetensors header; raise CheckpointError on any fault."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist or is not a directory")
        config = _read_json_object(root / "config.json", what="config.json")
        tensors: dict[str, TensorInfo] = {}
        for file in _weight_files(root):
            for info in _read_header(file):
                if info.name in tensors:
                    raise CheckpointError(
                        f"{file}: tensor {info.name!r} is also stored in {tensors[info.name].file.name}; "
                        "each tensor must live in exactly one shard"
                    )
                tensors[info.name] = info
        if (root / INDEX_FILE).is_file() and not (root / SINGLE_FILE).is_file():
            _check_index_matches(root / INDEX_FILE, tensors)
        return cls(root, config, tensors)

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._tensors)} tensors)"

    def info(self, key: str) -> TensorInfo:
        if key not in self._tensors:
            close = difflib.get_close_matches(key, self._tensors, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise CheckpointError(f"{self.path}: no tensor named {key!r} in the checkpoint{hint}")
        return self._tensors[key]

    def load(self, key: str) -> torch.Tensor:
        """Read one tensor from disk (memory-mapped by safetensors), on CPU."""
        info = self.info(key)
        try:
            with safe_open(str(info.file), framework="pt") as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            # The header was valid at open(); the file changed or became unreadable since.
            raise CheckpointError(f"{info.file}: cannot read tensor {key!r}: {e}") from e

    def check_shapes(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]]) -> ShapeCheck:
        """Compare expected shapes (and dtypes, where not None) with the checkpoint; raise on any mismatch."""
        problems: list[str] = []
        for name in sorted(expected):
            if name not in self._tensors:
                continue
            shape, dtype = tuple(expected[name][0]), expected[name][1]
            info = self._tensors[name]
            if info.shape != shape:
                problems.append(
                    f"{info.file.name}: tensor {name!r} has shape {info.shape} but config.json implies {shape}"
                )
            elif dtype is not None and info.dtype != dtype:
                problems.append(
                    f"{info.file.name}: tensor {name!r} has dtype {info.dtype} but the model expects {dtype}"
                )
        if problems:
            more = len(problems) - _MAX_REPORTED
            lines = problems[:_MAX_REPORTED] + ([f"... and {more} more"] if more > 0 else [])
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} does not match its config "
                f"({len(problems)} tensor(s) differ):\n  " + "\n  ".join(lines)
            )
        return ShapeCheck(
            missing=sorted(set(expected) - set(self._tensors)),
            unexpected=sorted(set(self._tensors) - set(expected)),
        )


def _read_json_object(file: Path, what: str) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{file} not found: a checkpoint directory needs a {what}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _weight_files(root: Path) -> list[Path]:
    """The safetensors files holding the weights: the single file, else the shards the index names."""
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = _read_json_object(index, what=INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to shard files")
        files = []
        for shard in sorted(set(weight_map.values())):
            file = root / shard
            # A shard name like '../x' would read outside the checkpoint; refuse it.
            if file.resolve().parent != root.resolve():
                raise CheckpointError(f"{index}: shard {shard!r} is not a file name inside the checkpoint directory")
            if not file.is_file():
                raise CheckpointError(f"{index}: lists shard {shard!r}, which is missing from {root}")
            files.append(file)
        return files
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root}: found only pickle weights ({', '.join(pickles)}); llmc loads safetensors only and never "
            "unpickles, since pickle can run arbitrary code. Convert the checkpoint first, e.g. "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    others = sorted(p.name for p in root.glob("*.safetensors"))
    hint = f" (found {', '.join(others)}; rename or add an index)" if others else ""
    raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _read_header(file: Path) -> list[TensorInfo]:
    """Parse and check one safetensors header ourselves, so corrupt files give one clear error."""
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{file}: truncated ({size} bytes); a safetensors file starts with an 8-byte header length"
            )
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER_BYTES:  # checked before reading, so a hostile length allocates nothing
            raise CheckpointError(
                f"{file}: header length {n} is impossible: it exceeds the {_MAX_HEADER_BYTES}-byte limit of "
                "safetensors; the file is corrupt or not safetensors"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"{file}: header length {n} is impossible for a {size}-byte file; "
                "the file is truncated or not safetensors"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: header is not valid JSON ({e}); the file is corrupt or not safetensors") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is not a JSON object")
    data_size = size - 8 - n
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos.append(_tensor_info(file, name, entry, data_size))
    _check_data_layout(file, {i.name: header[i.name]["data_offsets"] for i in infos}, data_size)
    try:  # the library's own checks too, so a load can never fail later on a header we accepted
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: the safetensors library rejects the file: {e}") from e
    return infos


def _check_data_layout(file: Path, offsets: dict[str, list[int]], data_size: int) -> None:
    """Tensors must tile the data bytes exactly, as the safetensors format requires: no overlap
    (two tensors sharing bytes), no hole and no trailing bytes (data no tensor accounts for)."""
    end, previous = 0, None
    for name, (begin, stop) in sorted(offsets.items(), key=lambda item: tuple(item[1])):
        if begin < end:
            raise CheckpointError(
                f"{file}: tensor {name!r} (data_offsets [{begin}, {stop}]) overlaps tensor {previous!r}, "
                f"which ends at byte {end}; the file is corrupt"
            )
        if begin > end:
            after = f"after tensor {previous!r} " if previous else ""
            raise CheckpointError(
                f"{file}: {begin - end} data bytes {after}before tensor {name!r} belong to no tensor; "
                "the file is corrupt"
            )
        end, previous = stop, name
    if end != data_size:
        raise CheckpointError(
            f"{file}: {data_size - end} trailing data bytes after the last tensor belong to no tensor; "
            "the file is corrupt"
        )


def _tensor_info(file: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise CheckpointError(f"{where}: unsupported dtype {entry.get('dtype')!r} (known: {', '.join(_DTYPES)})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the {data_size} data bytes of the file; "
            "the file is truncated or corrupt"
        )
    want = math.prod(shape) * dtype.itemsize
    if end - begin != want:
        raise CheckpointError(
            f"{where}: holds {end - begin} bytes but shape {tuple(shape)} of {dtype} needs {want}"
        )
    return TensorInfo(name=name, shape=tuple(shape), dtype=dtype, file=file)


def _check_index_matches(index: Path, tensors: dict[str, TensorInfo]) -> None:
    """The index must say where each tensor really is; a stale index would send loads to the wrong shard."""
    weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    for name, shard in sorted(weight_map.items()):
        if name not in tensors:
            raise CheckpointError(f"{index}: lists tensor {name!r} in {shard!r}, but no shard holds it")
        if tensors[name].file.name != Path(shard).name:
            raise CheckpointError(
                f"{index}: lists tensor {name!r} in {shard!r}, but it is stored in {tensors[name].file.name}"
            )
