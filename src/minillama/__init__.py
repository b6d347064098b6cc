"""Mini Llama: pretrain, sample, evaluate and export small Llama-architecture language models.

The names below are imported on first use, so that tokenizer worker processes and `minillama --help` start
without loading PyTorch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "minillama.config", "PRESETS": "minillama.config", "preset": "minillama.config",
    "MiniLlamaError": "minillama.errors",
    "Transformer": "minillama.model",
    "Tokenizer": "minillama.tokenizer", "load_tokenizer": "minillama.tokenizer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minillama' has no attribute {name!r}")
