"""Frontends: raise a Hugging Face causal LM into llmc IR."""
