"""llmc code generation backends (imported as ``llmc.codegen``)."""
