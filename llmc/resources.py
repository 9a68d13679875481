"""Read files shipped inside the llmc package (target YAML), wherever llmc is installed."""

from importlib.resources import files

from llmc.errors import LlmcError


def available_targets() -> list[str]:
    """Names of the built-in targets, e.g. ``["cpu"]``."""
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in files("llmc.targets").iterdir()
        if entry.name.endswith(".yaml")
    )


def target_text(name: str) -> str:
    """The YAML text of built-in target ``name`` (``"cpu"`` or ``"cpu.yaml"``)."""
    stem = name.removesuffix(".yaml")
    available = available_targets()
    # Checked against the listing, not the file system, so a name like "../x" cannot escape.
    if stem not in available:
        raise LlmcError(f"unknown target {name!r}: built-in targets are {', '.join(available)}")
    return (files("llmc.targets") / f"{stem}.yaml").read_text(encoding="utf-8")
