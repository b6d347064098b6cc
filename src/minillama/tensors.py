"""The check every weight file passes before anything is loaded from it, whichever format holds it (safetensors or
torch.distributed.checkpoint's sharded folders): the same names, shapes and floating-point dtypes as the model."""

from __future__ import annotations

from pathlib import Path

import torch

from minillama.errors import MiniLlamaError


def check_stored_tensors(where: Path, stored: dict[str, tuple[tuple[int, ...], torch.dtype]],
                         expected: dict[str, torch.Tensor]) -> None:
    """Refuse, naming the first mismatch in `where`, unless `stored` ({name: (shape, dtype)}) lists exactly the
    tensors of `expected`, each of its shape and a floating-point dtype."""
    for key in expected.keys() - stored.keys():
        raise MiniLlamaError(f"{where} lacks tensor '{key}'; it does not match its config.json")
    for key in stored.keys() - expected.keys():
        raise MiniLlamaError(f"{where} has unexpected tensor '{key}'; it does not match its config.json")
    for key, tensor in expected.items():
        shape, dtype = stored[key]
        if tuple(shape) != tuple(tensor.shape):
            raise MiniLlamaError(f"{where}: tensor '{key}' has shape {tuple(shape)}, config.json implies {tuple(tensor.shape)}")
        if not dtype.is_floating_point:
            raise MiniLlamaError(f"{where}: tensor '{key}' has dtype {dtype}; expected a floating-point type")
