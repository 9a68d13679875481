"""Built-in llmc passes (imported as ``llmc.passes``); one pass per file."""
