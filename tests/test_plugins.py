"""Plugins through the `llmc.plugins` entry-point group, with examples/llmc-plugin-example.

Nothing is installed: each test writes a ``*.dist-info/entry_points.txt`` into a temporary
directory on ``sys.path`` (what ``pip install`` would leave in site-packages), so
``importlib.metadata`` discovers the plugin the way it would in a user's environment. Every test
gets fresh copies of the global registries, so loads and registrations do not leak between tests.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jinja2
import pytest
import torch

import llmc.plugins as plugins
from llmc.errors import PluginError, TargetError
from llmc.examples_tiny import save_tiny_model
from llmc.frontend import patterns
from llmc.frontend.hf import load_hf
from llmc.frontend.values import Act, Axis
from llmc.ir import OPS, GraphBuilder, Interpreter, T, TensorType
from llmc.pipeline import PASSES, run_pipeline, validate_pipeline
from llmc.resources import target_text
from llmc.target import load_target
from package_helpers import target_with

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llmc-plugin-example"


@pytest.fixture(autouse=True)
def fresh_registries(monkeypatch):
    """Copies of every registry a plugin writes to; the originals come back after the test."""
    import llmc.passes  # noqa: F401  (built-ins first, or they would register into the copy only)
    monkeypatch.setattr(PASSES, "_passes", dict(PASSES._passes))
    monkeypatch.setattr(OPS, "_ops", dict(OPS._ops))
    monkeypatch.setattr(patterns, "PATTERNS", list(patterns.PATTERNS))
    for name in ("KERNEL_TEMPLATES", "TARGETS", "_LOADED", "_FAILED"):
        monkeypatch.setattr(plugins, name, {})
    yield
    for module in [m for m in sys.modules if m == "llmc_plugin_example" or m.startswith("llmc_plugin_example.")]:
        del sys.modules[module]


def install_entry_points(site: Path, dist: str, entry_points: dict[str, str], monkeypatch) -> None:
    """What pip leaves for a distribution's entry points, on a sys.path entry of its own."""
    info = site / f"{dist}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{plugins.GROUP}]\n{lines}")
    monkeypatch.syspath_prepend(str(site))


@pytest.fixture
def example_plugin(tmp_path, monkeypatch) -> dict[str, str]:
    """The example's entry points, read from its pyproject.toml, "installed" as above."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    entry_points = project["entry-points"][plugins.GROUP]
    install_entry_points(tmp_path / "site", project["name"].replace("-", "_"), entry_points, monkeypatch)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    return entry_points




@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return load_hf(save_tiny_model("llama", tmp_path_factory.mktemp("llama"))).graph


# ---- the example plugin's pass, named in a target ------------------------------------------------

def test_a_target_naming_the_plugin_pass_loads_the_plugin_and_runs_it(example_plugin, tmp_path, tiny_llama):
    assert example_plugin == {"layer_stats": "llmc_plugin_example:register"}
    assert "llmc_plugin_example" not in sys.modules and not plugins._LOADED   # nothing loaded yet
    target, source = target_with(tmp_path, [{"pass": "canonicalize"}, {"pass": "layer_stats"}])
    report = run_pipeline(tiny_llama, target, source=source)
    assert plugins._LOADED == {"layer_stats": "llmc_plugin_example:register"}

    stats = report.records[1].stats
    layer = {"rms_norm": 2, "linear": 7, "rope": 2, "attention": 1, "add": 2, "silu": 1, "mul": 1}
    assert stats["layers"] == 2
    assert [Counter(stats["per_layer"][k]["ops"]) for k in ("0", "1")] == [layer, layer]
    assert stats["per_layer"]["other"]["ops"] == {"embedding": 1, "linear": 1, "rms_norm": 1}
    assert sum(entry["param_bytes"] for entry in stats["per_layer"].values()) == tiny_llama.param_bytes()
    assert stats["per_layer"]["0"]["param_bytes"] == stats["per_layer"]["1"]["param_bytes"] > 0

    readme = (EXAMPLE / "README.md").read_text()
    assert json.loads(re.search(r"```json\n(.*?)```", readme, re.DOTALL).group(1)) == stats   # docs say so

    graph = report.graph
    assert graph.meta["layer_stats"] == stats["per_layer"]
    assert graph == tiny_llama and not report.records[1].changed   # metadata only: the same IR
    layers = Counter(node.meta["layer"] for node in graph.nodes)
    assert layers == {0: sum(layer.values()), 1: sum(layer.values()), None: 3}


def test_plugin_pass_options_are_validated_like_built_in_ones(example_plugin, tmp_path):
    target, source = target_with(tmp_path, [{"pass": "layer_stats", "options": {"layer_patern": "x"}}])
    with pytest.raises(TargetError, match=r"target\.yaml: pipeline\[0\]\.options\.layer_patern: unknown "
                                          r"option of pass 'layer_stats'; did you mean 'layer_pattern'"):
        validate_pipeline(target, source)


def test_loading_is_lazy_by_name_and_idempotent(example_plugin):
    assert plugins.load_plugins("layer_stats") == ["layer_stats"]
    registered = dict(PASSES._passes)
    assert plugins.load_plugins("layer_stats") == ["layer_stats"]   # again: nothing re-registers
    assert plugins.load_plugins() == ["layer_stats"]
    assert PASSES._passes == registered and "clamp" in OPS
    with pytest.raises(PluginError, match=r"no plugin named 'layer_stat' .*did you mean 'layer_stats'"):
        plugins.load_plugins("layer_stat")


# ---- the example's op, raising pattern and kernel template ---------------------------------------

def test_the_clamp_op_reference_runs_in_the_interpreter(example_plugin):
    plugins.load_plugins("layer_stats")
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 8), "float32"))
    b.output("y", b.add("clamp", [x], min=-0.5))
    values = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    out = Interpreter(b.build()).run({"x": values})["y"]
    torch.testing.assert_close(out, values.clamp(min=-0.5), atol=0, rtol=0)


class RecordingRaiser:
    def __init__(self) -> None:
        self.emitted: list[tuple] = []

    def emit(self, node, op, inputs, **attrs) -> str:
        self.emitted.append((op, list(inputs), attrs))
        return "%9"


def test_the_clamp_pattern_raises_constant_bounds_only(example_plugin):
    plugins.load_plugins("layer_stats")
    [pattern] = [p for p in patterns.PATTERNS if "clamp" in p.ops]
    assert patterns.PATTERNS[-1] is pattern   # after every built-in pattern
    x = Act("%3", (Axis("T"), Axis("F", 8)))
    rx = RecordingRaiser()
    assert pattern.fn(rx, None, {"self": x, "min": 0, "max": 6.0}) == Act("%9", x.axes)
    assert pattern.fn(rx, None, {"self": x, "min": -1.5}) is not None           # clamp_min
    assert pattern.fn(rx, None, {"self": x, "min": x, "max": 1.0}) is None      # a tensor bound
    assert rx.emitted == [("clamp", ["%3"], {"min": 0.0, "max": 6.0}), ("clamp", ["%3"], {"min": -1.5, "max": None})]


def test_the_kernel_template_is_registered_and_renders_to_python(example_plugin):
    path = plugins.kernel_template("clamp")   # a miss loads the plugins
    assert path == EXAMPLE / "llmc_plugin_example" / "templates" / "clamp.py.jinja"
    source = jinja2.Template(path.read_text()).render(kernel_name="clamp_f32", min=-1.0, max=None)
    compile(source, "clamp_f32.py", "exec")
    assert "def clamp_f32(x" in source and "tl.maximum(x, -1.0)" in source and "tl.minimum" not in source


# ---- loading errors, targets ---------------------------------------------------------------------

def write_plugin(root: Path, module: str, body: str, monkeypatch) -> None:
    (root / f"{module}.py").write_text(body)
    monkeypatch.syspath_prepend(str(root))


def test_two_plugins_with_one_name_raise(tmp_path, monkeypatch):
    install_entry_points(tmp_path / "a", "plugin_a", {"stats": "plugin_a:register"}, monkeypatch)
    install_entry_points(tmp_path / "b", "plugin_b", {"stats": "plugin_b:register"}, monkeypatch)
    with pytest.raises(PluginError, match=r"two plugins are named 'stats'.*plugin_(a|b) 0\.1\.0"):
        plugins.load_plugins()


def test_a_plugin_registering_a_taken_name_fails_naming_itself(tmp_path, monkeypatch):
    write_plugin(tmp_path, "clash_plugin", "from llmc.plugins import register_pass\n"
                 "def register():\n    register_pass('canonicalize')(lambda graph, ctx: None)\n", monkeypatch)
    install_entry_points(tmp_path / "site", "clash_plugin", {"clash": "clash_plugin:register"}, monkeypatch)
    for _ in range(2):   # the failure is remembered, not retried into a half-registered state
        with pytest.raises(PluginError, match=r"plugin 'clash' \(clash_plugin:register, from clash_plugin "
                                              r"0\.1\.0\) failed to load: PipelineError: pass 'canonicalize' is "
                                              r"already registered"):
            plugins.load_plugins("clash")


def test_a_plugin_can_register_a_target_but_not_shadow_a_built_in_one(tmp_path, monkeypatch):
    (tmp_path / "board.yaml").write_text(target_text("cpu").replace("name: cpu", "name: board"))
    write_plugin(tmp_path, "board_plugin", "from pathlib import Path\nfrom llmc.plugins import register_target\n"
                 "register_target('board', Path(__file__).parent / 'board.yaml')\n", monkeypatch)
    install_entry_points(tmp_path / "site", "board_plugin", {"board": "board_plugin"}, monkeypatch)
    assert plugins.plugin_target_path("board.yaml") == tmp_path / "board.yaml"   # a module entry point
    assert plugins.plugin_target_path("nowhere") is None
    from llmc.target import load_target
    assert load_target("board").name == "board"                                   # --target board works
    with pytest.raises(PluginError, match=r"target 'cpu' is built in"):
        plugins.register_target("cpu", tmp_path / "board.yaml")


# ---- the example is a real package and its README matches its code ------------------------------

@pytest.mark.slow
def test_the_example_builds_as_a_package(tmp_path):
    pytest.importorskip("setuptools")   # --no-build-isolation builds with this environment's setuptools
    copy = shutil.copytree(EXAMPLE, tmp_path / "example")   # the build writes egg-info beside the sources
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--dry-run", str(copy)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Would install llmc-plugin-example-0.1.0" in done.stdout


def test_readme_code_blocks_headed_by_a_file_are_copied_from_it():
    readme = (EXAMPLE / "README.md").read_text()
    blocks = re.findall(r"```(?:python|jinja)\n# (llmc_plugin_example/\S+)\n(.*?)```", readme, re.DOTALL)
    assert len(blocks) >= 5
    for path, code in blocks:
        assert code in (EXAMPLE / path).read_text(), f"README block from {path} is out of date"
