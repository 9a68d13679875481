"""Content fingerprints for the compile cache key (``llmc.pipeline.cache_key``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

# Files up to 64 MiB are hashed whole; bigger weight shards by size, mtime and their first and last
# MiB (a safetensors header, with every name/dtype/shape/offset, sits at the start): hashing a
# 140 GB checkpoint on every compile would cost more than the compile it might save.
FULL_HASH_BYTES = 64 << 20
EDGE_BYTES = 1 << 20


def file_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if stat.st_size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(EDGE_BYTES), b""):
                digest.update(chunk)
            return {"size": stat.st_size, "sha256": digest.hexdigest()}
        digest.update(f.read(EDGE_BYTES))
        f.seek(-EDGE_BYTES, 2)
        digest.update(f.read(EDGE_BYTES))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "edges_sha256": digest.hexdigest()}


def checkpoint_fingerprint(checkpoint_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Relative path -> fingerprint of every file under ``checkpoint_dir`` (hidden ones skipped)."""
    root = Path(checkpoint_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return {p.relative_to(root).as_posix(): file_fingerprint(p) for p in files}
