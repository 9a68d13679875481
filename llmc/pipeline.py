"""The pass manager: a registry of passes, validation of a target's pipeline, and running it.

A pass is a pure function ``(Graph, PassContext) -> PassResult`` registered with its name, options
model, and the graph properties it ``requires`` and ``provides`` (attention lowering requires
``canonical``, which canonicalize provides). The IR is verified after every pass.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import inspect
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError

import llmc
from llmc.cache import checkpoint_fingerprint
from llmc.errors import IRError, PipelineError, TargetError
from llmc.ir import Graph, format_graph, verify

if TYPE_CHECKING:
    from llmc.target import Target

# What the frontend guarantees of a freshly raised graph; passes add to it through `provides`.
INITIAL_PROPERTIES = frozenset({"raised"})


class PassOptions(BaseModel):
    """Base for pass options: strict (YAML ``true`` is a bool, ``"yes"`` is not), frozen, no unknown keys."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoOptions(PassOptions):
    """Options of a pass that takes none: any key given is an unknown option."""


@dataclass(frozen=True)
class PassContext:
    """What a pass may read besides the graph: the target record and its own validated options."""
    target: Target
    options: BaseModel


@dataclass(frozen=True)
class PassResult:
    """A pass's output graph, whether it changed anything, and JSON-friendly counts (matches, bytes)."""
    graph: Graph
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


PassFn = Callable[[Graph, PassContext], PassResult]


@dataclass(frozen=True)
class PassInfo:
    """A registered pass. ``source_hash`` (sha256 of its module's source) goes into the cache key."""
    name: str
    fn: PassFn
    options: type[BaseModel]
    requires: tuple[str, ...]
    provides: tuple[str, ...]
    source_hash: str
    lossy: bool = False  # changes the model's numbers: a compile that ran it measures quality (report.json)

    module = property(lambda self: self.fn.__module__)
    doc = property(lambda self: (inspect.getdoc(self.fn) or "").partition("\n")[0])  # for `llmc passes`


def _source_hash(fn: Callable) -> str:
    """sha256 of the source of the module defining ``fn``, so editing a pass changes the cache key."""
    module = inspect.getmodule(fn)
    try:
        text = inspect.getsource(module) if module is not None else inspect.getsource(fn)
    except (OSError, TypeError):  # defined where no source is kept (exec, a REPL): hash the bytecode
        text = repr((fn.__code__.co_code, fn.__code__.co_consts))
    return hashlib.sha256(text.encode()).hexdigest()


def _hint(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class PassRegistry:
    """An explicit registry of passes; registering a name twice is an error. With ``discover`` (the
    global ``PASSES``) a lookup that misses imports ``llmc.passes``, then the ``llmc.plugins``."""

    def __init__(self, discover: bool = False) -> None:
        self._passes: dict[str, PassInfo] = {}
        self._discover = discover

    def register(self, info: PassInfo) -> PassInfo:
        if not info.name.isidentifier():  # it becomes a dump file name and the key of `--set name.option=`
            raise PipelineError(f"pass name {info.name!r} must be an identifier (letters, digits, _)")
        known = self._passes.get(info.name)
        if known is not None:
            raise PipelineError(f"pass {info.name!r} is already registered (by {known.module}); "
                                f"{info.module} cannot register it again")
        self._passes[info.name] = info
        return info

    def _load_all(self, plugins: bool) -> None:
        if self._discover:
            import llmc.passes  # noqa: F401  (registers the built-in passes)
            if plugins:
                from llmc.plugins import load_plugins
                load_plugins()

    def lookup(self, name: str) -> PassInfo | None:
        """The pass called ``name``, loading built-ins and then plugins on a miss; None if unknown."""
        for plugins in (False, True):
            if name in self._passes:
                break
            self._load_all(plugins)
        return self._passes.get(name)

    def __getitem__(self, name: str) -> PassInfo:
        if (info := self.lookup(name)) is None:
            raise PipelineError(f"unknown pass {name!r}{_hint(name, self.names())}")
        return info

    def names(self) -> list[str]:
        self._load_all(plugins=True)
        return sorted(self._passes)

    def __iter__(self) -> Iterator[PassInfo]:
        return iter([self._passes[name] for name in self.names()])


PASSES = PassRegistry(discover=True)


def register_pass(name: str, options: type[BaseModel] | None = None, requires: Sequence[str] = (),
                  provides: Sequence[str] = (), lossy: bool = False, registry: PassRegistry = PASSES):
    """Decorator: register ``fn(graph, ctx) -> PassResult`` as pass ``name``; returns ``fn`` unchanged.
    ``lossy`` passes (quantize, prune, gqa_rewrite) change the model's outputs on purpose; when one
    changed the graph, ``llmc compile`` measures the quality cost against the unoptimized graph."""

    def wrap(fn: PassFn) -> PassFn:
        registry.register(PassInfo(name, fn, options or NoOptions, tuple(requires), tuple(provides),
                                   _source_hash(fn), lossy))
        return fn

    return wrap


# ---- validation ----------------------------------------------------------------------------------

def _option_errors(exc: ValidationError, where: str, info: PassInfo) -> str:
    fields = list(info.options.model_fields)
    parts = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"{where}.options.{key}: unknown option of pass {info.name!r}"
                         f"{_hint(str(err['loc'][0]), fields)} (options: {', '.join(fields) or 'none'})")
        else:
            parts.append(f"{where}.options.{key}: {err['msg']} (got {err['input']!r})")
    return "; ".join(parts)


def _requires_error(i: int, info: PassInfo, need: str, pipeline: Sequence[Any], registry: PassRegistry) -> str:
    later = [(j, spec.name) for j, spec in enumerate(pipeline) if j > i
             and (p := registry.lookup(spec.name)) is not None and need in p.provides]
    if later:
        j, other = later[0]
        fix = f"pass {other!r} (pipeline[{j}]) provides it: move it before pipeline[{i}]"
    else:
        providers = [p.name for p in registry if need in p.provides]
        fix = (f"add pass {providers[0]!r} (it provides {need!r}) before pipeline[{i}]" if providers
               else f"no registered pass provides {need!r}")
    return f"pipeline[{i}].pass: pass {info.name!r} requires {need!r}, which no earlier pass provides; {fix}"


def validate_pipeline(target: Target, source: str = "<target>",
                      registry: PassRegistry = PASSES) -> list[tuple[PassInfo, BaseModel]]:
    """Each pipeline entry's pass and validated options, with requires/provides checked in order.
    Errors are ``TargetError``s naming ``source`` (the YAML file), the key path and the closest name."""
    steps: list[tuple[PassInfo, BaseModel]] = []
    have = set(INITIAL_PROPERTIES)
    for i, spec in enumerate(target.pipeline):
        where = f"pipeline[{i}]"
        info = registry.lookup(spec.name)
        if info is None:
            raise TargetError(f"{source}: {where}.pass: unknown pass {spec.name!r}"
                              f"{_hint(spec.name, registry.names())} (registered: {', '.join(registry.names())})")
        try:
            options = info.options.model_validate(dict(spec.options))
        except ValidationError as exc:
            raise TargetError(f"{source}: {_option_errors(exc, where, info)}") from None
        for need in info.requires:
            if need not in have:
                raise TargetError(f"{source}: {_requires_error(i, info, need, target.pipeline, registry)}")
        have.update(info.provides)
        steps.append((info, options))
    return steps


# ---- running -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PassRecord:
    """What one pass did: wall time, whether it changed the graph, its stats, node counts around it."""
    name: str
    seconds: float
    changed: bool
    stats: dict[str, Any]
    nodes_before: int
    nodes_after: int
    lossy: bool = False


@dataclass(frozen=True)
class PipelineReport:
    graph: Graph
    records: list[PassRecord]

    def as_dict(self, timings: bool = True) -> dict[str, Any]:
        """JSON-friendly report; ``timings=False`` leaves out wall times (for byte-identical output)."""
        passes = [asdict(r) for r in self.records]
        if not timings:
            for entry in passes:
                del entry["seconds"]
        return {"passes": passes}


def _ran_before(records: Sequence[PassRecord]) -> str:
    names = [r.name for r in records]
    return f"; passes run before it: {', '.join(names)}" if names else "; no pass ran before it"


def run_pipeline(graph: Graph, target: Target, *, source: str = "<target>", dump_dir: str | Path | None = None,
                 on_event: Callable[[str, str, PassRecord | None], None] | None = None,
                 registry: PassRegistry = PASSES) -> PipelineReport:
    """Run ``target.pipeline`` over ``graph``, verifying the IR after every pass.

    ``on_event(kind, pass_name, record)`` is called with ``"start"`` (record None) before each pass
    and ``"end"`` (its PassRecord) after it. ``dump_dir`` gets ``00-input.ir``, ``01-<pass>.ir``, ...
    """
    steps = validate_pipeline(target, source, registry)
    notify = on_event or (lambda kind, name, record: None)
    dump = Path(dump_dir) if dump_dir is not None else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        for stale in dump.glob("[0-9][0-9]-*.ir"):  # a longer earlier run would leave misleading files
            stale.unlink()
    try:
        verify(graph)
    except IRError as exc:
        raise PipelineError(f"the input graph is invalid before any pass ran: {exc}") from exc

    def write_dump(index: int, name: str) -> None:
        if dump is not None:
            (dump / f"{index:02d}-{name}.ir").write_text(format_graph(graph) + "\n", encoding="utf-8")

    write_dump(0, "input")
    records: list[PassRecord] = []
    for i, (info, options) in enumerate(steps):
        notify("start", info.name, None)
        where = f"pass {info.name!r} (pipeline[{i}], {info.module})"
        start = time.perf_counter()
        try:
            result = info.fn(graph, PassContext(target, options))
        except Exception as exc:  # any failure inside a pass is reported with the pipeline position
            raise PipelineError(f"{where} failed: {type(exc).__name__}: {exc}{_ran_before(records)}") from exc
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise PipelineError(f"{where} returned {type(result).__name__}, not a PassResult{_ran_before(records)}")
        try:
            verify(result.graph)
        except IRError as exc:
            raise PipelineError(f"{where} left invalid IR: {exc}{_ran_before(records)}") from exc
        record = PassRecord(info.name, seconds, result.changed, dict(result.stats),
                            len(graph.nodes), len(result.graph.nodes), info.lossy)
        records.append(record)
        graph = result.graph
        write_dump(i + 1, info.name)
        notify("end", info.name, record)
    return PipelineReport(graph, records)


# ---- cache identity ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def generated_code_hash() -> str:
    """sha256 over the sources a package's code comes from (codegen, its templates, and the runtime
    whose functions are copied into model.py): a package built by other code is not reused."""
    import llmc.codegen
    import llmc.runtime

    digest = hashlib.sha256()
    for package in (llmc.codegen, llmc.runtime):
        root = Path(package.__file__).parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".jinja") and p.is_file()):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cache_key(target: Target, checkpoint_dir: str | Path, passes: Sequence[tuple[PassInfo, BaseModel]],
              extra: Mapping[str, Any] | None = None) -> str:
    """sha256 over what can change the output: llmc version, each pass's name, source hash and
    options, the whole target record, the checkpoint files, and ``extra`` (codegen's own inputs)."""
    identity = {
        "llmc": llmc.__version__,
        "codegen_runtime_sha256": generated_code_hash(),
        "passes": [{"name": info.name, "source_sha256": info.source_hash,
                    "options": options.model_dump(mode="json")} for info, options in passes],
        "target": target.model_dump(mode="json", by_alias=True, exclude={"pipeline"}),  # passes cover it
        "checkpoint": checkpoint_fingerprint(checkpoint_dir),
        "extra": dict(extra or {}),
    }
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
