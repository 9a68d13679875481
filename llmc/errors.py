"""Errors llmc raises on purpose: each names the file, key, tensor or module at fault and hints at a fix."""


class LlmcError(Exception):
    """Base class: a user-facing error (the CLI prints it without a traceback)."""


class CheckpointError(LlmcError):
    """A checkpoint directory, config or weight file is missing, malformed or inconsistent."""


class UnsupportedModelError(LlmcError):
    """The frontend found a module it cannot raise into llmc IR."""


class IRError(LlmcError):
    """A graph is malformed (the verifier found a broken invariant)."""


class PipelineError(LlmcError):
    """A pass failed or left broken IR; names the pass and the passes run before it."""


class PluginError(LlmcError):
    """A plugin (entry point in group ``llmc.plugins``) is missing, fails to load or clashes with another."""


class TargetError(LlmcError):
    """A target YAML or a --set override is malformed: unknown key, bad value, unknown pass."""
