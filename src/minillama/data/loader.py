"""Batches of (inputs, targets) from memory-mapped token shards, split across data-parallel ranks, resumable.

A split's shards are read as one token stream. Each window is T+1 consecutive tokens (x = the first T, y = the
last T), and windows start every T tokens, so every token is a target exactly once per epoch. Windows cross
shard boundaries freely: a shard's tail simply continues into the next shard, nothing is dropped or repeated
there. What an epoch leaves out is its last partial window (< T tokens) and the windows that do not fill a whole
global batch; a random start offset per epoch (when shuffling) moves that tail around, so no token is
systematically excluded.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from minillama.data.shards import MANIFEST, VERIFIED, read_manifest, split_entries
from minillama.errors import MiniLlamaError
from minillama.files import write_file_atomically
from minillama.tokenizer import file_sha256


class TokenStream:
    """The shards of one split as a single random-access sequence of tokens, memory-mapped (never loaded whole)."""

    def __init__(self, data_dir: Path, manifest: dict[str, Any], split: str, shard_order: list[int] | None = None):
        entries = split_entries(manifest, split)
        order = shard_order if shard_order is not None else list(range(len(entries)))
        dtype = np.dtype(manifest["dtype"])
        self.shards = [np.memmap(Path(data_dir) / entries[i]["file"], dtype=dtype, mode="r") for i in order]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        self.length = self.starts[-1]

    def read(self, start: int, count: int, out: np.ndarray) -> None:
        """Copy tokens [start, start+count) into `out`, across shard boundaries if need be."""
        shard = bisect.bisect_right(self.starts, start) - 1
        filled = 0
        while filled < count:
            local = start + filled - self.starts[shard]
            take = min(count - filled, len(self.shards[shard]) - local)
            out[filled : filled + take] = self.shards[shard][local : local + take]
            filled += take
            shard += 1


class TrainLoader:
    """Endless (x, y) batches of `batch_size` x `seq_len` for rank `rank` of `world_size`.

    Every rank walks the same global window order and takes its own slice of each group of batch_size*world_size
    windows, so ranks see disjoint windows and their union is what one process would see with world_size times
    the batch. An optimizer step takes the next `windows_per_step` windows of the order (an epoch ends only between
    steps), so however the ranks and micro-steps split them, a step sees the same windows: a run may resume on
    another number of ranks or another micro-batch. A batch-size schedule changes `windows_per_step` between steps
    (`set_step_windows`). The state is the same on every rank: (epoch, windows consumed), plus the seed.
    """

    def __init__(self, data_dir: Path, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 1337, shuffle: bool = True, split: str = "train", windows_per_step: int | None = None):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        if self.manifest is None:
            raise MiniLlamaError(f"{self.data_dir} has no manifest.json; make it with `minillama prepare`")
        self.n_shards = len(split_entries(self.manifest, split))
        self.stream_fingerprint = split_fingerprint(self.manifest, split)
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.shuffle, self.split = seed, shuffle, split
        self.set_step_windows(windows_per_step or batch_size * world_size)  # the largest step: _begin_epoch checks it fits
        self.epoch, self.position, self.step_left = 0, 0, 0
        self._buffer = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        self._begin_epoch()

    def _begin_epoch(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n_shards).tolist() if self.shuffle else None
        self.stream = TokenStream(self.data_dir, self.manifest, self.split, order)
        self.offset = int(rng.integers(self.seq_len)) if self.shuffle else 0
        n_windows = (self.stream.length - self.offset - 1) // self.seq_len
        if n_windows < self.windows_per_step:
            raise MiniLlamaError(
                f"the {self.split} split of {self.data_dir} has {self.stream.length:,} tokens, fewer than one optimizer step of "
                f"{self.windows_per_step} windows of {self.seq_len + 1} tokens; prepare more data or shrink batch.total_tokens"
            )
        self.window_order = rng.permutation(n_windows).astype(np.int64) if self.shuffle else np.arange(n_windows)

    def set_step_windows(self, windows: int) -> None:
        """Windows in each optimizer step from the next one on."""
        if windows % (self.batch_size * self.world_size):
            raise ValueError(f"windows_per_step {windows} is not a multiple of {self.batch_size} x {self.world_size}")
        self.windows_per_step = windows

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.batch_size * self.world_size
        if self.step_left == 0:  # a step begins
            if self.position + self.windows_per_step > len(self.window_order):
                self.epoch, self.position = self.epoch + 1, 0
                self._begin_epoch()
            self.step_left = self.windows_per_step
        mine = self.window_order[self.position + self.rank * self.batch_size :][: self.batch_size]
        for row, window in enumerate(mine.tolist()):
            self.stream.read(self.offset + window * self.seq_len, self.seq_len + 1, self._buffer[row])
        self.position += group
        self.step_left -= group
        batch = torch.from_numpy(self._buffer.copy())
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "world_size": self.world_size, "windows_per_step": self.windows_per_step,
                "shards": split_fingerprint(self.manifest, self.split)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {k: getattr(self, k) for k in ("seed", "seq_len")}
        for key, value in expected.items():
            if state[key] != value:
                raise MiniLlamaError(f"the checkpoint's data position was saved with {key}={state[key]}, this run has {value}")
        if state.get("shards", self.stream_fingerprint) != self.stream_fingerprint:  # checkpoints before it was kept: trusted
            raise MiniLlamaError(f"the {self.split} shards of {self.data_dir} are not the ones this checkpoint's data position "
                                 "counts in (the data was prepared again since); resume on the data it was trained on, or "
                                 "start a new run_dir")
        # Checkpoints are taken between steps, and the batch schedule (total_tokens, stages, seq_len) is fixed on
        # resume, so the position is a step's start; the split into ranks and micro-batches may change.
        self.epoch, self.position, self.step_left = state["epoch"], state["position"], 0
        self._begin_epoch()


def split_fingerprint(manifest: dict[str, Any], split: str) -> str:
    """The identity of a split's shards (names, sizes, sha256 in order): a saved data position is valid only for it."""
    entries = [(e["file"], e["tokens"], e["sha256"]) for e in split_entries(manifest, split)]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def validation_batches(data_dir: Path, batch_size: int, seq_len: int, total_tokens: int,
                       rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: the first total_tokens/seq_len windows of the val split, in order.

    Rank r takes windows r, r+w, r+2w, ...; the set, and so the mean loss over it, does not depend on w.
    The last batch of a rank may be smaller than batch_size.
    """
    manifest = read_manifest(Path(data_dir))
    stream = TokenStream(Path(data_dir), manifest, "val")
    n_windows = min(total_tokens // seq_len, (stream.length - 1) // seq_len)
    if n_windows < 1:
        raise MiniLlamaError(
            f"the val split of {data_dir} has {stream.length:,} tokens, fewer than one window of {seq_len + 1}; "
            "prepare more validation tokens (--val-tokens) or shorten the sequence"
        )
    mine = list(range(rank, n_windows, world_size))
    for first in range(0, len(mine), batch_size):
        rows = mine[first : first + batch_size]
        buffer = np.empty((len(rows), seq_len + 1), dtype=np.int64)
        for row, window in enumerate(rows):
            stream.read(window * seq_len, seq_len + 1, buffer[row])
        batch = torch.from_numpy(buffer)
        yield batch[:, :-1], batch[:, 1:]


def check_data(data_dir: Path, vocab_size: int, tokenizer_fingerprint: str | None = None) -> dict[str, Any]:
    """Before training: the manifest matches the model and tokenizer, and every shard is there at full size."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise MiniLlamaError(f"{data_dir} has no manifest.json; make it with `minillama prepare`")
    if not manifest.get("complete"):
        raise MiniLlamaError(f"{data_dir} is only partly prepared; re-run the same `minillama prepare` command to finish it")
    data_vocab = manifest["tokenizer"]["vocab_size"]
    if data_vocab != vocab_size:
        raise MiniLlamaError(f"{data_dir} was tokenized with vocab {data_vocab}, the model has vocab {vocab_size}; use matching data and model")
    if tokenizer_fingerprint and manifest["tokenizer"]["fingerprint"] != tokenizer_fingerprint:
        raise MiniLlamaError(
            f"{data_dir} was tokenized with a different tokenizer (sha256 {manifest['tokenizer']['fingerprint'][:12]}…, "
            f"this run's is {tokenizer_fingerprint[:12]}…); pass the same --tokenizer or prepare the data again"
        )
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for entry in manifest["shards"]:
        path = data_dir / entry["file"]
        if not path.is_file():
            raise MiniLlamaError(f"shard {path} is missing; re-run `minillama prepare` with --overwrite to rebuild {data_dir}")
        if path.stat().st_size != entry["tokens"] * itemsize:
            raise MiniLlamaError(
                f"shard {path} has {path.stat().st_size:,} bytes, the manifest says {entry['tokens'] * itemsize:,}; "
                f"it is truncated or damaged: re-run `minillama prepare` with --overwrite"
            )
    for split in ("train", "val"):
        if not any(e["tokens"] for e in split_entries(manifest, split)):
            raise MiniLlamaError(f"{data_dir} has no {split} tokens; prepare it again with a different --val-tokens")
    return manifest


def verify_shards(data_dir: Path, vocab_size: int, progress: bool = True) -> dict[str, Any]:
    """Hash every shard against the manifest and check that every token id is below `vocab_size`, with a progress
    bar; record the result so that later runs on the same data need not hash it again. Returns the manifest."""
    data_dir = Path(data_dir)
    manifest = check_data(data_dir, vocab_size)
    dtype = np.dtype(manifest["dtype"])
    total = sum(entry["tokens"] for entry in manifest["shards"]) * dtype.itemsize
    with tqdm(total=total, unit="B", unit_scale=True, desc="verifying shards", disable=None if progress else True) as bar:
        for entry in manifest["shards"]:
            path, digest = data_dir / entry["file"], hashlib.sha256()
            with open(path, "rb") as f:
                position = 0
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    tokens = np.frombuffer(chunk, dtype=dtype)
                    if tokens.size and int(tokens.max()) >= vocab_size:
                        where = position + int(np.argmax(tokens >= vocab_size))
                        raise MiniLlamaError(f"shard {path} holds token id {int(tokens.max())} at position {where:,}, beyond the "
                                             f"vocabulary of {vocab_size}; it was not made for this model: prepare the data again")
                    position += tokens.size
                    bar.update(len(chunk))
            if digest.hexdigest() != entry["sha256"]:
                raise MiniLlamaError(f"shard {path} does not match its sha256 in {MANIFEST}; it was altered or damaged: re-run "
                                     "`minillama prepare` with --overwrite")
    write_file_atomically(data_dir / VERIFIED, json.dumps({"manifest_sha256": file_sha256(data_dir / MANIFEST)}).encode())
    return manifest


def is_verified(data_dir: Path) -> bool:
    """Whether `verify_shards` passed on this manifest (a changed manifest means a new check)."""
    try:
        record = json.loads((Path(data_dir) / VERIFIED).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("manifest_sha256") == file_sha256(Path(data_dir) / MANIFEST)
