"""Built-in target descriptions, shipped as package data (imported as ``llmc.targets``)."""
