"""Validation loss, perplexity and bits per byte over the fixed validation set of a prepared data directory.

Bits per byte (total nats / ln 2 / UTF-8 bytes of the text the target tokens decode to) compares runs with
different tokenizers, which per-token loss cannot: a 32k vocabulary spends fewer tokens on the same text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
import torch.nn.functional as F
from torch import nn

from minillama.data.loader import validation_batches
from minillama.errors import MiniLlamaError
from minillama.model import evaluating
from minillama.tokenizer import Tokenizer


def token_byte_lengths(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes each token id decodes to (control tokens 0, byte-fallback tokens 1), and whether it starts a
    word with a space ('▁'), a space SentencePiece drops when the token opens a document."""
    sp = tokenizer.sp
    lengths, leading_space = [], []
    for i in range(tokenizer.vocab_size):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i):
            lengths.append(0)
        elif sp.is_byte(i):
            lengths.append(1)
        else:
            lengths.append(len(piece.replace("\u2581", " ").encode("utf-8")))
        leading_space.append(piece.startswith("\u2581") and not sp.is_control(i))
    return torch.tensor(lengths, dtype=torch.long), torch.tensor(leading_space, dtype=torch.bool)


@torch.no_grad()
def check_loss_settings(max_seq_len: int, batch_size: int, seq_len: int, total_tokens: int) -> None:
    """Refuse settings no evaluation can run with, before any work (and before a command names its checkpoint)."""
    for name, value in (("batch size", batch_size), ("sequence length", seq_len), ("tokens to score", total_tokens)):
        if value < 1:
            raise MiniLlamaError(f"the {name} is {value}; expected a positive integer")
    if seq_len > max_seq_len:
        raise MiniLlamaError(f"the sequence length {seq_len} exceeds the model's max_seq_len of {max_seq_len}; use at most {max_seq_len}")
    if total_tokens < seq_len:
        raise MiniLlamaError(f"{total_tokens:,} tokens to score are fewer than one sequence of {seq_len}; score at least {seq_len}")


def evaluate_loss(
    model: nn.Module,
    data_dir: Path,
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    total_tokens: int,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean loss over the first total_tokens/seq_len windows of the val split; all ranks must call it. `progress`
    shows a bar of tokens scored, with the time left, on a terminal.

    `model` may be a compiled or DDP-unwrapped module; it is called as model(x)."""
    check_loss_settings(model.config.max_seq_len if hasattr(model, "config") else seq_len, batch_size, seq_len, total_tokens)
    byte_lengths, leading_space = token_byte_lengths(tokenizer)
    device = next(model.parameters()).device
    byte_lengths, leading_space = byte_lengths.to(device), leading_space.to(device)
    with evaluating(model):
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
        bar = tqdm(total=total_tokens // seq_len * seq_len // world_size, unit="token", unit_scale=True, desc="scoring",
                   disable=None if progress else True, dynamic_ncols=True)  # None: only on a terminal
        for x, y in validation_batches(Path(data_dir), batch_size, seq_len, total_tokens, rank, world_size):
            largest = max(int(x.max()), int(y.max()))  # targets too: the last of a window is only ever a target
            if largest >= tokenizer.vocab_size:  # checked on the CPU, before an index error deep in torch
                raise MiniLlamaError(f"the val split of {data_dir} holds token id {largest}, beyond the vocabulary of "
                                     f"{tokenizer.vocab_size}; check it with: minillama prepare check {data_dir}")
            x, y = x.to(device), y.to(device)
            logits, _ = model(x)
            nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            opens_document = (x == tokenizer.bos_id) & leading_space[y]
            totals += torch.stack([nats.double(), torch.tensor(y.numel(), device=device, dtype=torch.float64),
                                   (byte_lengths[y].sum() - opens_document.sum()).double()])
            bar.update(y.numel())
        bar.close()
        if world_size > 1:
            torch.distributed.all_reduce(totals)
    nats, tokens, n_bytes = totals.tolist()
    if n_bytes == 0:
        raise MiniLlamaError(f"the val split of {data_dir} decodes to no text (only control or unknown tokens); the data is "
                             f"damaged: check it with: minillama prepare check {data_dir}")
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nats / math.log(2) / n_bytes,
            "tokens": int(tokens), "bytes": int(n_bytes)}
