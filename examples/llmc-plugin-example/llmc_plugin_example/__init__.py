"""An example llmc plugin, loaded through the entry point ``layer_stats`` of group ``llmc.plugins``.

Importing this package registers nothing; llmc calls ``register()`` once, when a target names a
pass it does not have built in (or when ``llmc.plugins.load_plugins("layer_stats")`` is called).
"""

from __future__ import annotations

from pathlib import Path

from llmc.plugins import register_kernel_template, register_op, register_pass, register_pattern

from llmc_plugin_example.clamp import Clamp, raise_clamp
from llmc_plugin_example.layer_stats import LayerStatsOptions, layer_stats

TEMPLATES = Path(__file__).parent / "templates"


def register() -> None:
    """Register the plugin's pass, op, raising pattern and kernel template with llmc."""
    register_pass("layer_stats", options=LayerStatsOptions, requires=("raised",))(layer_stats)
    register_op("clamp", ("x",), {"min": None, "max": None})(Clamp)
    register_pattern(("clamp", "clamp_min", "clamp_max"), doc="clamp(x, lo, hi) -> clamp")(raise_clamp)
    register_kernel_template("clamp", TEMPLATES / "clamp.py.jinja")
