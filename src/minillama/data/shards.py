"""Token shards on disk: flat binary arrays of token ids, and the manifest.json that describes them.

A shard is the raw bytes of a uint16 array (uint32 when the vocabulary exceeds 65,536), so it can be
memory-mapped with numpy and read by any language. Every document is [BOS] + its tokens; documents follow each
other with no separator beyond that BOS, and may continue from one shard into the next.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from minillama.errors import MiniLlamaError
from minillama.files import write_file_atomically

MANIFEST = "manifest.json"
FORMAT = "minillama-shards"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_shard(path: Path, tokens: np.ndarray) -> str:
    """Write one shard atomically and return its sha256."""
    data = memoryview(np.ascontiguousarray(tokens)).cast("B")
    write_file_atomically(path, data)
    return hashlib.sha256(data).hexdigest()


def read_manifest(data_dir: Path) -> dict[str, Any] | None:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MiniLlamaError(f"{path} is not valid JSON ({exc}); re-run `minillama prepare ... --overwrite`") from None
    if manifest.get("format") != FORMAT:
        raise MiniLlamaError(f"{path}: 'format' is {manifest.get('format')!r}; expected '{FORMAT}'")
    return manifest


def write_manifest(data_dir: Path, manifest: dict[str, Any]) -> None:
    write_file_atomically(Path(data_dir) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def split_entries(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    return [s for s in manifest["shards"] if s["split"] == split]
