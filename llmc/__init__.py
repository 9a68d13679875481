"""llmc: compile a Hugging Face causal LM into an optimized, self-contained inference package."""

__version__ = "0.1.0"
