"""llmc code generation backends (imported as ``llmc.codegen``): the torch backend and the package emitter."""

from .package import emit_package

__all__ = ["emit_package"]
