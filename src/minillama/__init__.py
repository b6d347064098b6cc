"""Mini Llama: pretrain, sample, evaluate and export small Llama-architecture language models."""

from minillama.config import PRESETS, ModelConfig, preset
from minillama.errors import MiniLlamaError
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer, load_tokenizer

__all__ = ["PRESETS", "MiniLlamaError", "ModelConfig", "Tokenizer", "Transformer", "load_tokenizer", "preset"]
__version__ = "0.1.0"
