"""The inference runtime copied verbatim into every compiled package (``runtime/`` there).

It imports only the standard library, torch, safetensors, tokenizers and jinja2 — never ``llmc`` —
so a package runs where llmc is not installed. Modules import each other relatively, which works
both when a package runs as ``python PKG`` (top-level ``runtime``) and when it is pip-installed
(``<package>.runtime``).
"""
