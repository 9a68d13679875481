"""Hardware targets: the typed, frozen record a target YAML (``targets/*.yaml``) validates into.

A target says what the hardware is (device, backend, memory, bandwidth, peak FLOP/s per dtype),
which passes to run in which order (``pipeline``) and the runtime defaults (page size, batch
limits, shape buckets), and optionally how much the lossy passes may cost (``quality.max_kl``,
off unless set). ``load_target("h100")`` reads a built-in target, ``load_target(path)`` a
file; ``--set``-style overrides (``runtime.kv_page_size=32``, ``canonicalize.fold_scales=false``)
apply on top. Errors name the file, the key path and the closest valid name. Pass names and pass
options are checked by ``llmc.pipeline.validate_pipeline``, which owns the pass registry.

The JSON Schema in ``specs/target.schema.json`` (used by editors through the ``$schema`` comment at
the top of each YAML) is generated from these models; after changing them, regenerate it with

    python -m llmc.target --write-specs

``tests/test_target.py`` fails while the file is stale.
"""

from __future__ import annotations

import difflib
import json
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, Sequence, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError,
                      model_validator)

from llmc.errors import TargetError
from llmc.resources import available_targets, target_text

SPEC_PATH = Path(__file__).resolve().parents[1] / "specs" / "target.schema.json"

# torch dtype names, so `getattr(torch, name)` works.
DType = Literal["float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "int8"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class PassSpec(_Strict):
    """One pipeline step: a pass name and its options (checked by the pass's own options model)."""

    name: str = Field(alias="pass", min_length=1, description="Registered pass name.")
    options: dict[str, Any] = Field(default_factory=dict, description="Options of the pass.")


def _check_buckets(name: str, buckets: list[int], limit: int, limit_name: str) -> None:
    if not buckets or any(b <= 0 for b in buckets) or buckets != sorted(set(buckets)):
        raise ValueError(f"{name} must be positive and strictly increasing, got {buckets}")
    if buckets[-1] < limit:  # every batch the scheduler may form must fit some bucket
        raise ValueError(f"largest of {name} ({buckets[-1]}) is below {limit_name} ({limit})")


class RuntimeDefaults(_Strict):
    """What the packaged runtime starts with: KV paging, batch limits, compiled shape buckets."""

    kv_page_size: PositiveInt = Field(description="Tokens per KV-cache page.")
    kv_cache_bytes: PositiveInt = Field(description="Bytes of KV-cache pages the runtime allocates "
                                                    "(the package's --kv-cache-bytes overrides it).")
    max_num_seqs: PositiveInt = Field(description="Most sequences scheduled in one step.")
    max_num_batched_tokens: PositiveInt = Field(description="Most tokens processed in one step.")
    token_buckets: list[int] = Field(description="Token counts the graph is specialized for.")
    batch_buckets: list[int] = Field(description="Batch sizes the graph is specialized for.")
    default_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        description="Dtype of activations and (unquantized) weights.")

    @model_validator(mode="after")
    def _buckets_cover_limits(self) -> RuntimeDefaults:
        _check_buckets("token_buckets", self.token_buckets, self.max_num_batched_tokens,
                       "max_num_batched_tokens")
        _check_buckets("batch_buckets", self.batch_buckets, self.max_num_seqs, "max_num_seqs")
        return self


class QualityBound(_Strict):
    """How much a lossy pass (quantize, prune, gqa_rewrite, quantize_kv) may cost, checked against
    the compile-time quality measurement (``llmc/quality.py``) before the package is written."""

    max_kl: float | None = Field(None, ge=0, description="Largest mean KL(unoptimized || compiled) "
                                                         "accepted after a lossy pass; null = no bound.")
    on_exceed: Literal["error", "warn"] = Field("error", description="Over the bound: fail the compile, or "
                                                                     "record a warning in report.json.")


class Target(_Strict):
    """A hardware target: capabilities, the pass pipeline, and runtime defaults."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Short name, e.g. h100.")
    description: str = Field(description="One line saying what hardware this is.")
    device: Literal["cpu", "cuda"] = Field(description="torch device type.")
    backend: Literal["torch", "triton"] = Field(description="Code generator for the model.")
    compute_capability: str | None = Field(None, pattern=r"^\d+\.\d+$",
                                           description="CUDA compute capability, e.g. '9.0'.")
    memory_bytes: PositiveInt = Field(description="Device memory (host RAM for cpu).")
    memory_bandwidth_bytes_per_s: PositiveFloat = Field(description="Peak memory bandwidth.")
    peak_flops: dict[DType, PositiveFloat] = Field(
        description="Peak dense (no sparsity) FLOP/s, or OP/s for integers, per dtype.")
    dtypes: list[DType] = Field(min_length=1, description="Dtypes the target computes in.")
    sm_count: PositiveInt | None = Field(None, description="Streaming multiprocessors (cuda).")
    pipeline: list[PassSpec] = Field(description="Passes to run, in order.")
    runtime: RuntimeDefaults
    quality: QualityBound = Field(default_factory=QualityBound,
                                  description="Quality bound on lossy passes, e.g. --set quality.max_kl=0.01.")

    @model_validator(mode="after")
    def _consistent(self) -> Target:
        if unlisted := [d for d in self.peak_flops if d not in self.dtypes]:
            raise ValueError(f"peak_flops names dtypes missing from dtypes: {unlisted}")
        if self.runtime.default_dtype not in self.dtypes:
            raise ValueError(f"runtime.default_dtype {self.runtime.default_dtype} is not in dtypes")
        if self.device == "cuda" and (self.compute_capability is None or self.sm_count is None):
            raise ValueError("a cuda target needs compute_capability and sm_count")
        return self


def schema_text() -> str:
    """The JSON Schema of target YAML, exactly as ``specs/target.schema.json`` should hold it."""
    return json.dumps(Target.model_json_schema(by_alias=True), indent=2, sort_keys=True) + "\n"


def load_target(name_or_path: str, overrides: Sequence[str] = ()) -> Target:
    """Read, override and validate a target: an existing file path, else a built-in name.

    A file wins over a built-in of the same name, so an edited copy ``./h100.yaml`` is used as is.
    """
    return load_target_with_source(name_or_path, overrides)[0]


def load_target_with_source(name_or_path: str, overrides: Sequence[str] = ()) -> tuple[Target, str]:
    """``load_target`` plus the file the target came from, for later errors to name."""
    text, source = _read(str(name_or_path))
    try:
        raw = yaml.safe_load(text)
        nodes = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        since = f" ({exc.context} on line {context.line + 1})" if context and exc.context else ""
        problem = getattr(exc, "problem", None) or exc
        raise TargetError(f"{where}: invalid YAML: {problem}{since}") from None
    if not isinstance(raw, dict):
        raise TargetError(f"{source}: a target must be a mapping of keys, got {type(raw).__name__}")
    applied = {tuple(_apply_override(raw, o, source)): o for o in overrides}
    try:
        return Target.model_validate(raw), source
    except ValidationError as exc:
        problems = "\n".join(_describe(e, nodes, raw, applied) for e in exc.errors())
        raise TargetError(f"{source}: invalid target:\n{problems}") from None


def _read(name_or_path: str) -> tuple[str, str]:
    path = Path(name_or_path)
    stem = name_or_path.removesuffix(".yaml")
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetError(f"{path}: cannot read target file: {exc}") from None
    builtins = available_targets()
    if stem in builtins:
        return target_text(stem), str(files("llmc.targets") / f"{stem}.yaml")
    from llmc.plugins import plugin_target_path  # plugin targets are named like built-in ones

    plugin_path = plugin_target_path(stem)
    if plugin_path is not None:
        return plugin_path.read_text(encoding="utf-8"), str(plugin_path)
    close = difflib.get_close_matches(stem, builtins, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TargetError(f"no target {name_or_path!r}: no such file, and the built-in targets are "
                      f"{', '.join(builtins)}{hint}")


def _apply_override(raw: dict, override: str, source: str) -> list[str | int]:
    """Set ``a.b=value`` in the raw YAML; returns the key path it set (pass options resolved)."""
    key, sep, value_text = override.partition("=")
    if not sep or not key.strip():
        raise TargetError(f"--set {override!r}: expected KEY=VALUE, e.g. runtime.kv_page_size=32")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as exc:
        raise TargetError(f"--set {override!r}: the value is not valid YAML: {exc}") from None
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    where = [i for i, name in enumerate(_pass_names(raw)) if name == path[0]]
    if len(where) > 1:
        raise TargetError(f"--set {override!r}: pass {path[0]!r} runs more than once in {source}; "
                          f"name one step as pipeline.<index>.options.<key>=<value>")
    if where and len(path) == 1:
        raise TargetError(f"--set {override!r}: name an option, as {path[0]}.<option>=<value>")
    if where:
        path = ["pipeline", where[0], "options", *path[1:]]
    node: Any = raw
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, dict) and not last and node.get(part) is None:
            node[part] = {}  # a new (or null) key: make the mapping to set in
        if not (isinstance(node, dict) or isinstance(node, list) and part in range(len(node))):
            raise TargetError(f"--set {override!r}: cannot set {part!r} in "
                              f"{_dotted(path[:depth])}, which holds {node!r}")
        if last:
            node[part] = value
        node = node[part]
    return path


def _describe(error: dict, nodes: yaml.Node, raw: dict, applied: dict) -> str:
    """One line for one pydantic error: the key path, its YAML line, what is wrong, a suggestion."""
    loc = [part for part in error["loc"] if part != "[key]"]  # pydantic's marker for a bad dict key
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1], raw)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        message = (f"unknown key; did you mean {_dotted([*loc[:-1], close[0]])!r}?" if close
                   else f"unknown key; valid keys: {', '.join(valid)}")
    elif error["type"] == "missing":
        message = "required key is missing"
    else:
        got = error["input"]
        message = error["msg"] + ("" if isinstance(got, (dict, list)) else f" (got {got!r})")
    # An override set this key, or created its unknown parent (`canonicalise.x=1` -> canonicalise).
    origin = next((o for p, o in applied.items()
                   if loc and (loc[: len(p)] == list(p) or list(p[: len(loc)]) == loc)), None)
    line = _line_of(nodes, loc) if origin is None else None
    where = f" (line {line})" if line else f" (from --set {origin})" if origin else ""
    return f"  {_dotted(loc) or '<top level>'}{where}: {message}"


def _valid_keys(loc: list, raw: dict) -> list[str]:
    """Keys allowed in the mapping at ``loc``; at the top level, pass names too (for --set)."""
    annotation: Any = Target
    for part in loc:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = annotation.model_fields[part].annotation
        else:
            is_container = get_origin(annotation) in (list, dict)
            annotation = get_args(annotation)[-1] if is_container else None  # list[X], dict[K, X]
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return []
    keys = [field.alias or name for name, field in annotation.model_fields.items()]
    if not loc:
        keys += [name for name in _pass_names(raw) if isinstance(name, str)]
    return keys


def _pass_names(raw: dict) -> list[Any]:
    """The ``pass`` of each pipeline step in the raw YAML (None where a step has none)."""
    steps = raw.get("pipeline")
    return [s.get("pass") if isinstance(s, dict) else None
            for s in (steps if isinstance(steps, list) else [])]


def _line_of(node: yaml.Node | None, loc: list) -> int | None:
    """1-based line of the YAML node at ``loc`` (its nearest existing ancestor), if any."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            key, node = next(((k, v) for k, v in node.value if k.value == part), (None, None))
        elif isinstance(node, yaml.SequenceNode) and part in range(len(node.value)):
            key = node = node.value[part]
        else:
            key = None
        if key is None:
            break
        line = key.start_mark.line + 1
    return line


def _dotted(path: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def main(argv: Sequence[str]) -> int:
    """``python -m llmc.target --write-specs`` regenerates specs/target.schema.json."""
    if list(argv) != ["--write-specs"]:
        print("usage: python -m llmc.target --write-specs", file=sys.stderr)
        return 2
    SPEC_PATH.write_text(schema_text(), encoding="utf-8")
    print(f"wrote {SPEC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
