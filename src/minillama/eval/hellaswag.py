"""HellaSwag, scored completion-style as in the reference recipe.

Each of an example's 4 candidates is [BOS] + context tokens + ending tokens; the model's cross-entropy is taken
over the ending tokens only. `acc_norm` picks the ending with the lowest mean loss per token (the number the
reference run reports), `acc` the lowest summed loss. This is not the lm-evaluation-harness number, which
normalises by the ending's length in bytes.

SentencePiece prefixes every encoded text with a word-boundary marker, so encoding the ending on its own gives
exactly "the ending preceded by a space".
"""

from __future__ import annotations

import json
import math
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from minillama.errors import MiniLlamaError
from minillama.files import write_file_atomically
from minillama.inference.cache import CachedPass, KVCache, SharedPrefixes, right_padded
from minillama.inference.scoring import score_targets
from minillama.model import Transformer, compute_dtype, evaluating
from minillama.tokenizer import Tokenizer

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


@dataclass(frozen=True)
class Example:
    context: str
    endings: tuple[str, str, str, str]
    label: int
    index: int  # position in the file, for per-example reports


@dataclass(frozen=True)
class Prediction:
    index: int
    label: int
    pred_norm: int  # argmin of mean loss per ending token
    pred_sum: int  # argmin of summed loss
    losses: tuple[float, ...]  # summed loss of each ending, in nats
    ending_tokens: tuple[int, ...]


HELLASWAG_VAL_EXAMPLES = 10_042  # rows of the official validation file


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minillama"


def download_hellaswag(cache_dir: Path | None = None) -> Path:
    """The official validation file, downloaded once into the user cache."""
    target = (cache_dir or default_cache_dir()) / "hellaswag_val.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(HELLASWAG_VAL_URL, timeout=60) as response:
            data = response.read()
    except OSError as exc:
        raise MiniLlamaError(f"could not download HellaSwag from {HELLASWAG_VAL_URL} ({exc}); pass --data FILE.jsonl") from None
    write_file_atomically(target, data)
    return target


def load_examples(path: Path, limit: int | None = None) -> list[Example]:
    """Read HellaSwag's jsonl (fields ctx, endings, label), checking each line."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise MiniLlamaError(f"the example limit is {limit}; expected a positive integer (or no limit)")
    if not path.is_file():
        raise MiniLlamaError(f"{path}: no such HellaSwag file")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise MiniLlamaError(f"{path} is not UTF-8 text (byte {exc.start:,}); pass HellaSwag's jsonl file") from None
    except OSError as exc:
        raise MiniLlamaError(f"{path} cannot be read ({exc.strerror})") from None
    examples = []
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
            context, endings, label = record["ctx"], record["endings"], record["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MiniLlamaError(f"{where}: not a HellaSwag record with ctx, endings and label ({type(exc).__name__}: {exc})") from None
        if not isinstance(context, str):
            raise MiniLlamaError(f"{where}: 'ctx' is {context!r}; expected a string")
        if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
            raise MiniLlamaError(f"{where}: 'endings' must be a list of 4 strings")
        if not all(e.strip() for e in endings):
            empty = next(i for i, e in enumerate(endings) if not e.strip())
            raise MiniLlamaError(f"{where}: ending {empty} is empty; every ending needs text to be scored")
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        if type(label) is not int or label not in (0, 1, 2, 3):  # not bool: true is no label
            raise MiniLlamaError(f"{where}: label is {json.dumps(label)}; expected 0, 1, 2 or 3")
        examples.append(Example(context, tuple(endings), label, len(examples)))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise MiniLlamaError(f"{path} holds no HellaSwag examples")
    return examples


@dataclass
class Candidate:
    context: list[int]  # [BOS] + context tokens (cut from the left if the whole would not fit)
    ending: list[int]

    @property
    def tokens(self) -> list[int]:
        return self.context + self.ending

    @property
    def ending_start(self) -> int:
        return len(self.context)


def candidates(example: Example, tokenizer: Tokenizer, max_len: int) -> tuple[list[Candidate], bool]:
    """The 4 token sequences of an example; the context is cut from the left (after BOS) to fit max_len."""
    context = tokenizer.encode(example.context, bos=True)
    out, truncated = [], False
    for ending in example.endings:
        ending_ids = tokenizer.encode(ending, bos=False)
        if 1 + len(ending_ids) > max_len:
            raise MiniLlamaError(f"HellaSwag example {example.index}: an ending alone does not fit in max_seq_len {max_len}")
        overflow = len(context) + len(ending_ids) - max_len
        ctx = context
        if overflow > 0:
            truncated = True
            ctx = context[:1] + context[1 + overflow:]  # keep BOS, drop the oldest context tokens
        out.append(Candidate(ctx, ending_ids))
    return out, truncated


@torch.no_grad()
def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise MiniLlamaError(f"the batch size is {batch_size}; expected a positive integer")


def score(model: Transformer, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 32,
          progress: bool = False) -> tuple[list[Prediction], int]:
    """Predictions for `examples` (batch_size examples per pass), and how many had their context truncated.

    Work is done once where it can be: an example's context goes through the model once, into a KV cache that its
    4 endings then continue (they differ only after it); the output head, a vocabulary-wide matmul, runs only at
    the positions that predict an ending token. Examples are batched in order of length, so little is padding.
    """
    check_batch_size(batch_size)
    encoded = [candidates(example, tokenizer, model.config.max_seq_len) for example in examples]
    truncated = sum(was_truncated for _, was_truncated in encoded)
    order = sorted(range(len(examples)), key=lambda i: max(len(c.tokens) for c in encoded[i][0]))
    losses = torch.zeros(len(examples), 4, dtype=torch.float64)
    with evaluating(model):
        bar = tqdm(total=len(order), unit="example", desc="HellaSwag", disable=None if progress else True, dynamic_ncols=True)
        for first in range(0, len(order), batch_size):
            chunk = order[first : first + batch_size]
            losses[chunk] = _ending_losses(model, [encoded[i][0] for i in chunk]).cpu()
            bar.update(len(chunk))
        bar.close()
    predictions = []
    for example, loss_row, (cands, _) in zip(examples, losses.tolist(), encoded):
        counts = [len(c.ending) for c in cands]
        mean = [loss / count for loss, count in zip(loss_row, counts)]
        predictions.append(Prediction(
            example.index, example.label,
            pred_norm=min(range(4), key=mean.__getitem__), pred_sum=min(range(4), key=loss_row.__getitem__),
            losses=tuple(loss_row), ending_tokens=tuple(counts),
        ))
    return predictions, truncated


def _ending_losses(model: Transformer, batch: list[list[Candidate]]) -> torch.Tensor:
    """Summed cross-entropy of each ending (len(batch), 4): contexts right-padded through the model into a KV cache,
    then the endings, right-padded, as continuations of their context's row."""
    device = model.tok_embeddings.weight.device
    contexts: list[list[int]] = []  # one per example, or one per ending where truncation made them differ
    context_of: list[int] = []  # for each ending (row-major over batch x 4), its context's row
    for cands in batch:
        rows_of_example: dict[tuple[int, ...], int] = {}
        for cand in cands:
            if tuple(cand.context) not in rows_of_example:
                rows_of_example[tuple(cand.context)] = len(contexts)
                contexts.append(cand.context)
            context_of.append(rows_of_example[tuple(cand.context)])
    endings = [cand.ending for cands in batch for cand in cands]
    # On a GPU, widths rounded up to a multiple of 16: it pays for each new shape (kernel plans), and HellaSwag's
    # lengths would otherwise give nearly every batch one of its own. A CPU only pays for padding.
    multiple = 16 if device.type == "cuda" else 1
    width, ending_width = (-(-max(map(len, seqs)) // multiple) * multiple for seqs in (contexts, endings))

    cache = KVCache(model.config, len(contexts), width, device, compute_dtype(model))
    context_states = model.hidden_states(right_padded(contexts, width).to(device),
                                         CachedPass.starting_at(cache, slice(0, len(contexts)), [0] * len(contexts), width))
    context_lengths = torch.tensor([len(c) for c in contexts], device=device)
    owners = torch.tensor(context_of, device=device)
    last_context_states = context_states[owners, context_lengths[owners] - 1]

    # An ending's padding sits past its own tokens; its positions are clamped to the rotary table, out of sight.
    positions = (context_lengths[owners, None] + torch.arange(ending_width, device=device)).clamp(max=model.config.max_seq_len - 1)
    continued = SharedPrefixes(cache, owners, context_lengths[owners], width, positions)
    ending_states = model.hidden_states(right_padded(endings, ending_width).to(device), continued)
    rows = [row for row, ending in enumerate(endings) for _ in ending[1:]]
    columns = [column for ending in endings for column in range(len(ending) - 1)]  # ending token t predicts token t + 1
    # The context's last position predicts each ending's first token; the ending's own positions the rest.
    states = torch.cat([last_context_states, ending_states[torch.tensor(rows, device=device), torch.tensor(columns, device=device)]])
    scored_by = torch.cat([torch.arange(len(endings), device=device), torch.tensor(rows, dtype=torch.long, device=device)])
    targets = torch.tensor([ending[0] for ending in endings] + [t for ending in endings for t in ending[1:]], device=device)
    log_probs = score_targets(model, states, targets).log_probs
    summed = torch.zeros(len(endings), dtype=torch.float64, device=device).index_add_(0, scored_by, -log_probs.double())
    return summed.view(len(batch), 4)


def evaluate_hellaswag(model: Transformer, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 32,
                       rank: int = 0, world_size: int = 1, progress: bool = False) -> dict[str, Any]:
    """acc_norm and acc over `examples`, and this rank's predictions. With several ranks each scores every
    world_size-th example and the counts are summed across ranks (all ranks must call this)."""
    predictions, truncated = score(model, tokenizer, examples[rank::world_size], batch_size, progress and rank == 0)
    counts = torch.tensor(
        [sum(p.pred_norm == p.label for p in predictions), sum(p.pred_sum == p.label for p in predictions), len(predictions), truncated],
        dtype=torch.long, device=model.tok_embeddings.weight.device,
    )
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    correct_norm, correct_sum, n, n_truncated = counts.tolist()
    return {"acc_norm": correct_norm / n, "acc_norm_stderr": standard_error(correct_norm, n), "acc": correct_sum / n,
            "acc_stderr": standard_error(correct_sum, n), "examples": n, "truncated": n_truncated, "predictions": predictions}


def standard_error(correct: int, n: int) -> float:
    """The standard error of an accuracy over `n` examples: the sample standard deviation of the 0/1 outcomes over
    sqrt(n), as lm-evaluation-harness reports it (0 for a single example)."""
    if n < 2:
        return 0.0
    p = correct / n
    return math.sqrt(p * (1 - p) / (n - 1))
