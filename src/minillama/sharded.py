"""Sharded weights: what an FSDP run writes in place of model.safetensors, in torch.distributed.checkpoint's
(DCP's) format — each rank writes its own part, rank 0 an index (`.metadata`) of which part holds which slice.

Any number of processes can read such a folder, each the slices it needs, which is how a run resumes on another
number of ranks, and how a single process reads the whole model. DCP's own reader unpickles the index with plain
pickle, which would run code from a file a user hands us; here the index is read by an unpickler that builds only
DCP's metadata records, and only tensors (which DCP reads with weights_only=True) are ever loaded.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from minillama.errors import MiniLlamaError
from minillama.tensors import check_stored_tensors

INDEX_FILE = ".metadata"  # DCP's name for the index

_INDEX_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
      ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INDEX_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint index")


class SafeReader(FileSystemReader):
    """DCP's file reader with the index read by `_IndexUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_index(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_index(folder: Path) -> Metadata:
    """The index of a sharded folder: which tensors it holds, their shapes, and which file holds each slice."""
    path = Path(folder) / INDEX_FILE
    try:
        with open(path, "rb") as f:
            index = _IndexUnpickler(f).load()
    except FileNotFoundError:
        raise MiniLlamaError(f"{folder} has no {INDEX_FILE}; the sharded checkpoint is incomplete") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise MiniLlamaError(f"{path} is not a checkpoint index ({exc}); the checkpoint is damaged") from None
    problem = "it is not DCP's Metadata" if not isinstance(index, Metadata) else _index_problem(index)
    if problem:
        raise MiniLlamaError(f"{path} is not a checkpoint index ({problem}); the checkpoint is damaged")
    return index


def _index_problem(index: Metadata) -> str | None:
    """What is malformed in an index whose classes were all allowed (their fields can still hold anything), or None."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex

    def sizes(value: Any) -> bool:
        return isinstance(value, torch.Size) and all(type(n) is int and n >= 0 for n in value)

    entries = getattr(index, "state_dict_metadata", None)
    if not isinstance(entries, dict) or not all(isinstance(key, str) for key in entries):
        return "its table of tensors is not a mapping of names"
    for key, entry in entries.items():
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not (isinstance(entry, TensorStorageMetadata) and sizes(getattr(entry, "size", None))
                and isinstance(getattr(getattr(entry, "properties", None), "dtype", None), torch.dtype)
                and isinstance(getattr(entry, "chunks", None), list)
                and all(isinstance(c, ChunkStorageMetadata) and sizes(getattr(c, "offsets", None)) and sizes(getattr(c, "sizes", None))
                        for c in entry.chunks)):
            return f"its entry '{key}' is not a well-formed tensor record"
    storage = getattr(index, "storage_data", None)
    if not isinstance(storage, dict) or not all(
            isinstance(where, MetadataIndex) and isinstance(info, _StorageInfo) and isinstance(getattr(info, "relative_path", None), str)
            and type(getattr(info, "offset", None)) is int and type(getattr(info, "length", None)) is int
            for where, info in storage.items()):
        return "its table of where each slice is stored is malformed"
    return None


def check_tensors(folder: Path, expected: dict[str, torch.Tensor], prefix: str) -> dict[str, TensorStorageMetadata]:
    """Refuse, naming the first mismatch, unless the index lists every `prefix + key` of `expected` as a tensor of its
    shape and a floating-point dtype, and nothing else under `prefix`; their index entries by key. Only then is
    anything loaded: what is read is known to be tensors."""
    stored = {key[len(prefix):]: entry for key, entry in read_index(folder).state_dict_metadata.items() if key.startswith(prefix)}
    where = Path(folder) / INDEX_FILE
    for key, entry in stored.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise MiniLlamaError(f"{where}: '{key}' is not stored as a tensor; the checkpoint is damaged")
    check_stored_tensors(where, {key: (entry.size, entry.properties.dtype) for key, entry in stored.items()}, expected)
    return stored


def read_weights(folder: Path, expected: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The whole of each tensor of `expected` (names and shapes; values unused) from sharded weights, onto `device`,
    in one process however many ranks wrote them."""
    import torch.distributed.checkpoint as dcp

    stored = check_tensors(folder, expected, "model.")
    state = {key: torch.empty(tensor.shape, dtype=stored[key].properties.dtype, device=device) for key, tensor in expected.items()}
    try:
        with warnings.catch_warnings():  # that a single process reads is the point, not a surprise
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": state}, storage_reader=SafeReader(str(folder)), no_dist=True)
    except (OSError, CheckpointException) as exc:
        cause = first_failure(exc) if isinstance(exc, CheckpointException) else exc
        detail = (f"{cause.strerror}: {Path(cause.filename).name}" if isinstance(cause, OSError) and cause.filename
                  else (str(cause).strip().splitlines() or [type(cause).__name__])[0])  # torch's messages run to several lines
        raise MiniLlamaError(f"{folder} cannot be read ({detail}); the sharded checkpoint is incomplete") from None
    return state


def first_failure(exc: CheckpointException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException (which gathers every rank's)."""
    failure = next(iter(exc.failures.values()))
    return failure[0] if isinstance(failure, tuple) else failure
