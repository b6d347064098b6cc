"""The decode engine behind the server: requests that arrive while a batch runs wait, then go together in the
next batch (one KV-cached decode, each row with its own sampling settings, seed, length and stop sequences).

One thread owns the model; handlers talk to it through `Batcher.submit`, and get each row's text as it grows.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minillama.generate import document_end_ids, generate_tokens, sample_next
from minillama.inference.text import TextStream
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer


@dataclass
class Row:
    """One completion to produce: its prompt tokens, how to sample, and where its output goes."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]
    emit: Callable[[str, str | None], None]  # (text delta, finish reason or None); called on the engine's thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: TextStream | None = None  # the completion's text, released as it becomes final
    finish_reason: str | None = None


class Batcher:
    """Runs batches of up to `max_batch` rows on a background thread until `close`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.pending: queue.Queue[Row | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="minillama-batcher", daemon=True)
        self.thread.start()

    def submit(self, rows: list[Row]) -> None:
        for row in rows:
            self.pending.put(row)

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join()

    def _run(self) -> None:
        while True:
            first = self.pending.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:  # everything that is already waiting joins this batch
                try:
                    row = self.pending.get_nowait()
                except queue.Empty:
                    break
                if row is None:
                    self.pending.put(None)  # close after this batch
                    break
                batch.append(row)
            live = [row for row in batch if not row.cancelled.is_set()]
            if live:
                self._decode(live)

    def _decode(self, rows: list[Row]) -> None:
        device = self.model.tok_embeddings.weight.device
        generators = [None if row.seed is None else torch.Generator(device=device).manual_seed(row.seed) for row in rows]

        def choose(logits: torch.Tensor) -> torch.Tensor:  # each row its own settings and random stream
            return torch.cat([sample_next(logits[i : i + 1], row.temperature, row.top_k, row.top_p, generators[i])
                              for i, row in enumerate(rows)])

        for row in rows:
            row.text = TextStream(self.tokenizer, row.prompt_ids, row.stop)

        def on_token(i: int, token: int) -> bool:
            row = rows[i]
            row.tokens.append(token)
            delta = row.text.add(token)
            if row.text.stopped:
                self._finish(row, "stop", delta)
            elif len(row.tokens) >= row.max_tokens:
                delta += row.text.finish()  # finds a stop sequence that only held-back bytes completed, if any
                self._finish(row, "stop" if row.text.stopped else "length", delta)
            elif delta:
                row.emit(delta, None)
            return row.finish_reason is not None or row.cancelled.is_set()

        try:
            generate_tokens(self.model, [row.prompt_ids for row in rows], max(row.max_tokens for row in rows),
                            stop_ids=document_end_ids(self.tokenizer), on_token=on_token, choose=choose)
        except Exception as exc:  # a failed batch fails its requests, not the server
            for row in rows:
                if row.finish_reason is None:
                    row.finish_reason = "error"
                    row.emit(f"{type(exc).__name__}: {exc}", "error")
            return
        for row in rows:  # rows that ended at a document boundary (BOS/EOS)
            if row.finish_reason is None:
                self._finish(row, "stop", row.text.finish())

    @staticmethod
    def _finish(row: Row, reason: str, delta: str) -> None:
        row.finish_reason = reason
        row.emit(delta, reason)
