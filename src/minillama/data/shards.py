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
VERIFIED = "verified.json"  # the manifest's sha256 once every shard has been hashed and range-checked against it
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MiniLlamaError(f"{path} is not valid JSON ({type(exc).__name__}); re-run `minillama prepare ... --overwrite`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
        raise MiniLlamaError(f"{path}: 'format' is {found!r}; expected '{FORMAT}'")
    problem = _manifest_problem(manifest)
    if problem:
        raise MiniLlamaError(f"{path}: {problem}; the manifest is damaged: re-run `minillama prepare ... --overwrite`")
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's fields, or None: the keys the loader relies on, with usable values."""
    if manifest.get("dtype") not in ("uint16", "uint32"):
        return f"'dtype' is {manifest.get('dtype')!r}; expected \"uint16\" or \"uint32\""
    tokenizer = manifest.get("tokenizer")
    if not (isinstance(tokenizer, dict) and type(tokenizer.get("vocab_size")) is int and isinstance(tokenizer.get("fingerprint"), str)):
        return "'tokenizer' must hold an integer vocab_size and a fingerprint"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return f"'shards' is {shards!r}; expected a list"
    for i, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and shard.get("split") in ("train", "val")
                and type(shard.get("tokens")) is int and shard["tokens"] >= 0 and isinstance(shard.get("sha256"), str)):
            return f"shard entry {i} needs a file name, a split (train or val), a token count and a sha256"
        if not is_plain_name(shard["file"]):
            return f"shard entry {i}'s file {shard['file']!r} is not a plain file name in the data folder"
    if not isinstance(manifest.get("complete"), bool):
        return "'complete' must be true or false"
    if manifest["complete"] and type(manifest.get("tokens")) is not int:
        return "a complete manifest needs its total of tokens"
    return None


def is_plain_name(name: str) -> bool:
    """A file name that stays in its folder: no separators, no '..', nothing absolute (a manifest names only its own
    shards, and none of them is opened before this holds)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def resume_problem(manifest: dict[str, Any]) -> str | None:
    """What keeps `prepare` from continuing a manifest, or None: where each shard ended in the input, and sizes."""
    for i, shard in enumerate(manifest["shards"]):
        if not all(type(shard.get(key)) is int for key in ("end_record", "end_offset", "documents", "skipped_records")):
            return f"shard entry {i} needs whole numbers for end_record, end_offset, documents and skipped_records"
        position = shard.get("source_position")
        if position is not None and not (isinstance(position, dict) and type(position.get("record")) is int
                                         and 0 <= position["record"] <= shard["end_record"] and isinstance(position.get("state"), dict)):
            return f"shard entry {i}'s source_position needs a record (at most its end_record) and a state"
    for key in ("shard_tokens", "val_tokens"):
        if type(manifest.get(key)) is not int or manifest[key] < 1:
            return f"'{key}' is {manifest.get(key)!r}; expected a positive whole number"
    return None


def write_manifest(data_dir: Path, manifest: dict[str, Any]) -> None:
    write_file_atomically(Path(data_dir) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def split_entries(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    return [s for s in manifest["shards"] if s["split"] == split]
