"""Documents -> token shards, tokenized in parallel worker processes, resumable after any interruption.

The token stream is every document as [BOS] + tokens, in source order. It is cut into shards of `shard_tokens`
tokens; the first `val_tokens` of it form the validation split. After each shard is written, the manifest records
where in the stream it ended (record index and token offset within that record), so a re-run skips what is done
and produces the same bytes an uninterrupted run would.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from minillama.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    VERIFIED,
    read_manifest,
    resume_problem,
    token_dtype,
    write_manifest,
    write_shard,
)
from minillama.data.config import max_workers
from minillama.data.sources import SkipCounter
from minillama.errors import ArgumentError, MiniLlamaError
from minillama.files import DirectoryLock, remove_leftovers, temporary_directory
from minillama.tokenizer import Tokenizer

MAX_SHARD_TOKENS = 1 << 31  # 4 GiB of uint16 tokens in memory at once
SHARD_NAME = re.compile(r"(train|val)_\d{6}\.bin")  # the names `ShardStream` gives its shards

# Text sent to a worker at once, by size (documents range from a line to a whole book): large enough to amortise
# the inter-process hop, small enough that one large file still spreads over every worker.
CHARS_PER_TASK = 1 << 19
RECORDS_PER_TASK = 4096  # and at most this many records, so that a task of many empty ones stays small too


class Source(Protocol):
    total_records: int | None

    def describe(self) -> dict[str, Any]: ...

    def position(self, record: int) -> dict[str, Any] | None: ...

    def records(self, skip: int, skipped: SkipCounter, position: dict[str, Any] | None = None) -> Iterator[str | None]: ...


@dataclass
class StreamPosition:
    """A point in the token stream: the next token is token `offset` of record `record` ([BOS] is token 0)."""

    record: int = 0
    offset: int = 0


# --- tokenization in worker processes -------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None

Task = list[tuple[str | None, bool]]  # (text of a record or of a piece of one, whether it continues the previous)


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_path)


def tasks(records: Iterator[str | None], tokenizer: Tokenizer) -> Iterator[Task]:
    """Records grouped into tasks of about CHARS_PER_TASK characters; a longer record is cut into pieces (see
    `Tokenizer.cut`), which may land in different tasks."""
    task: Task = []
    size = 0
    for record in records:
        pieces = [record] if record is None else tokenizer.cut(record, CHARS_PER_TASK)
        for k, piece in enumerate(pieces):
            task.append((piece, k > 0))
            size += len(piece or "")
            if size >= CHARS_PER_TASK or len(task) >= RECORDS_PER_TASK:
                yield task
                task, size = [], 0
    if task:
        yield task


def encode_task(task: Task, tokenizer: Tokenizer | None = None) -> list[np.ndarray]:
    """Tokens of each item of a task: [BOS] + tokens for a record's start, tokens alone for a continuation,
    nothing for a skipped record."""
    tokenizer = tokenizer or _worker_tokenizer
    starts = [text for text, continues in task if text is not None and not continues]
    continuations = [text for text, continues in task if text is not None and continues]
    started = iter(tokenizer.sp.encode(starts, num_threads=1) if starts else [])
    continued = iter(tokenizer.encode_continuations(continuations) if continuations else [])
    out = []
    for text, continues in task:
        if text is None:
            out.append(np.empty(0, dtype=np.int32))
        elif continues:
            out.append(np.array(next(continued), dtype=np.int32))
        else:
            out.append(np.array([tokenizer.bos_id, *next(started)], dtype=np.int32))
    return out


def encode_in_order(records: Iterator[str | None], tokenizer: Tokenizer, workers: int) -> Iterator[list[np.ndarray]]:
    """The tokens of each record, in input order, in lists (the records a task finished), encoded in `workers`
    processes.

    At most a few tasks per worker are in flight (unlike Pool.imap, which reads its whole input ahead), so
    memory stays flat however large the source is. The pool's processes are ended and reaped on the way out,
    also when the caller stops early.
    """
    if workers <= 1:
        yield from _join_pieces((task, encode_task(task, tokenizer)) for task in tasks(records, tokenizer))
        return
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),))
    try:
        yield from _join_pieces(_encode_in_pool(pool, tasks(records, tokenizer), workers))
    finally:
        pool.terminate()
        pool.join()


def _encode_in_pool(pool: Any, work: Iterator[Task], workers: int) -> Iterator[tuple[Task, list[np.ndarray]]]:
    pending: deque = deque()
    for task in work:
        pending.append((task, pool.apply_async(encode_task, (task,))))
        if len(pending) >= 4 * workers:
            task, result = pending.popleft()
            yield task, result.get()
    while pending:
        task, result = pending.popleft()
        yield task, result.get()


def _join_pieces(encoded: Iterator[tuple[Task, list[np.ndarray]]]) -> Iterator[list[np.ndarray]]:
    """Whole records from encoded tasks: a record's pieces, spread over tasks, are joined in order."""
    pieces: list[np.ndarray] = []
    for task, arrays in encoded:
        finished = []
        for (_, continues), tokens in zip(task, arrays):
            if not continues and pieces:
                finished.append(np.concatenate(pieces) if len(pieces) > 1 else pieces[0])
                pieces = []
            pieces.append(tokens)
        if finished:
            yield finished
    if pieces:
        yield [np.concatenate(pieces) if len(pieces) > 1 else pieces[0]]


# --- the shard stream ------------------------------------------------------------------------------------------


class ShardStream:
    """Cuts the token stream into shards, writes each one atomically and records it in the manifest."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], source: Source):
        self.out_dir = out_dir
        self.manifest = manifest
        self.source = source
        self.dtype = np.dtype(manifest["dtype"])
        self.tokens_done = sum(s["tokens"] for s in manifest["shards"])
        self.buffer = np.empty(self._capacity(), dtype=self.dtype)
        self.filled = 0
        self.documents = 0
        # Empty or bad records passed over so far, counted where the stream consumes them (not where they are
        # read, which runs ahead), so the count stored with each shard is exact and resumes correctly.
        self.skipped_records = manifest["shards"][-1]["skipped_records"] if manifest["shards"] else 0

    def _capacity(self) -> int:
        val_left = self.manifest["val_tokens"] - self.tokens_done
        return min(self.manifest["shard_tokens"], val_left) if val_left > 0 else self.manifest["shard_tokens"]

    def add(self, tokens: np.ndarray, position: StreamPosition, starts_document: bool) -> int:
        """Append a record's tokens (from `position.offset` on); returns how many were taken before a shard filled."""
        if starts_document:
            self.documents += 1
        take = min(len(tokens), len(self.buffer) - self.filled)
        self.buffer[self.filled : self.filled + take] = tokens[:take]
        self.filled += take
        if self.filled == len(self.buffer):
            self.flush(StreamPosition(position.record, position.offset + take))
        return take

    def flush(self, end: StreamPosition) -> None:
        if self.filled == 0:
            return
        index = len(self.manifest["shards"])
        split = "val" if self.tokens_done < self.manifest["val_tokens"] else "train"
        name = f"{split}_{index:06d}.bin"  # SHARD_NAME
        sha256 = write_shard(self.out_dir / name, self.buffer[: self.filled])
        self.manifest["shards"].append({
            "file": name, "split": split, "tokens": self.filled, "documents": self.documents, "sha256": sha256,
            "end_record": end.record, "end_offset": end.offset, "skipped_records": self.skipped_records,
        })
        position = self.source.position(end.record)
        if position is not None:  # where a resume can seek to: a file and a row of the source, at or before end_record
            self.manifest["shards"][-1]["source_position"] = position
        write_manifest(self.out_dir, self.manifest)
        self.tokens_done += self.filled
        self.filled, self.documents = 0, 0
        self.buffer = np.empty(self._capacity(), dtype=self.dtype)


def _settings(source: Source, tokenizer: Tokenizer, shard_tokens: int, val_tokens: int, max_tokens: int | None) -> dict[str, Any]:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "source": source.describe(),
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "shard_tokens": shard_tokens, "val_tokens": val_tokens, "max_tokens": max_tokens,
    }


def _resumable(out_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier prepare in `out_dir` to continue (made with the same settings), or None for a
    new start; anything else in the way is refused. Reads only."""
    existing = read_manifest(out_dir)
    if existing is not None:
        problem = resume_problem(existing)
        if problem:
            raise ArgumentError("{manifest}: {problem}; the manifest is damaged: re-run with {overwrite}", manifest=out_dir / MANIFEST, problem=problem)
        if existing["tokenizer"]["fingerprint"] != settings["tokenizer"]["fingerprint"]:
            raise ArgumentError("{folder} holds shards made with another tokenizer (sha256 {sha}…); choose another {out_dir} "
                                "or pass {overwrite} to replace them", folder=out_dir, sha=existing["tokenizer"]["fingerprint"][:12])
        for key, value in settings.items():
            if existing.get(key) != value:
                raise ArgumentError("{folder} holds shards made with different settings ({key}: {before!r}, now {now!r}); "
                                    "choose another {out_dir} or pass {overwrite} to replace them",
                                    folder=out_dir, key=key, before=existing.get(key), now=value)
        return existing
    shards = sorted(p for p in out_dir.glob("*.bin") if SHARD_NAME.fullmatch(p.name)) if out_dir.is_dir() else []
    if shards:
        raise ArgumentError("{folder} already holds {count} shard files ({first}, ...) but no {manifest}; choose another "
                            "{out_dir}, or pass {overwrite} to replace them", folder=out_dir, count=len(shards),
                            first=shards[0].name, manifest=MANIFEST)
    return None


def _replaceable(out_dir: Path) -> list[Path]:
    """What --overwrite may replace in `out_dir`: the files an earlier prepare made there, as its manifest lists
    them. A shard-named file it does not list was not made by it, and is refused rather than taken."""
    try:
        earlier = read_manifest(out_dir)
    except MiniLlamaError:
        earlier = None  # unreadable: it lists nothing
    listed = {entry.get("file") for entry in earlier.get("shards", []) if isinstance(entry, dict)} if isinstance(earlier, dict) else set()
    # A prepare killed between renaming a finished shard into place and listing it left that one shard unlisted.
    listed |= {f"{split}_{len(listed):06d}.bin" for split in ("train", "val")} if earlier is not None else set()
    foreign = sorted(p.name for p in out_dir.glob("*.bin") if SHARD_NAME.fullmatch(p.name) and p.name not in listed) if out_dir.is_dir() else []
    if foreign:
        raise ArgumentError("{folder} holds shard-named files that no manifest of an earlier prepare lists ({names}); "
                            "{overwrite} replaces only what an earlier prepare made: move them away, or choose another {out_dir}",
                            folder=out_dir, names=", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else ""))
    return [out_dir / name for name in sorted(listed) if (out_dir / name).is_file()] + \
        [out_dir / name for name in (MANIFEST, VERIFIED) if (out_dir / name).is_file()]


def _swap_in(stage: Path, out_dir: Path, replaced: list[Path]) -> None:
    """Replace the earlier data with the new, built complete in `stage`: the new manifest comes last, so that a
    crash in between leaves a folder that a re-run with --overwrite rebuilds, never a manifest over other data."""
    for path in [p for p in replaced if p.name == MANIFEST] + [p for p in replaced if p.name != MANIFEST]:
        path.unlink()
    for shard in sorted(stage.glob("*.bin")):
        os.replace(shard, out_dir / shard.name)
    os.replace(stage / MANIFEST, out_dir / MANIFEST)
    stage.rmdir()


def prepare(
    source: Source,
    out_dir: str | Path,
    tokenizer: Tokenizer,
    shard_tokens: int = 100_000_000,
    val_tokens: int | None = None,
    max_tokens: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `source` into shards in `out_dir` and return the manifest. `val_tokens` defaults to one shard."""
    out_dir = Path(out_dir)
    for name, value in (("shard_tokens", shard_tokens), ("val_tokens", val_tokens), ("max_tokens", max_tokens), ("workers", workers)):
        if value is not None and value < 1:
            raise ArgumentError(f"{{{name}}} is {{value}}; expected a positive integer", value=value)
    if workers > max_workers():
        raise ArgumentError("{workers} is {value}; expected at most {limit}, the CPU cores this process may use (more "
                            "processes than cores only wait for each other)", value=workers, limit=max_workers())
    if shard_tokens > MAX_SHARD_TOKENS:  # a shard fills in memory before it is written
        raise ArgumentError("{shard_tokens} is {value:,}; expected at most {limit:,} (a shard is held in memory while it fills)",
                            value=shard_tokens, limit=MAX_SHARD_TOKENS)
    val_tokens = shard_tokens if val_tokens is None else val_tokens
    settings = _settings(source, tokenizer, shard_tokens, val_tokens, max_tokens)
    # What can be refused from reading alone is refused before the lock, which leaves its .lock file in the folder.
    if overwrite:
        _replaceable(out_dir)
    else:
        _resumable(out_dir, settings)
    with DirectoryLock(out_dir, "prepare command"):  # one writer per folder
        remove_leftovers(out_dir)  # of a run killed mid-write
        if not overwrite:
            manifest = _resumable(out_dir, settings) or {**settings, "shards": [], "complete": False}
            if manifest["complete"]:
                print(f"{out_dir} is already complete: {manifest['tokens']:,} tokens in {len(manifest['shards'])} shards")
                return manifest
            return _tokenize(source, out_dir, out_dir, tokenizer, manifest, workers, max_tokens, progress)
        # The new data is built beside the old, which stays whole until the new is complete and good.
        replaced = _replaceable(out_dir)
        stage = temporary_directory(out_dir / "overwrite")
        try:
            manifest = _tokenize(source, stage, out_dir, tokenizer, {**settings, "shards": [], "complete": False}, workers,
                                 max_tokens, progress)
            _swap_in(stage, out_dir, replaced)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return manifest


def _tokenize(source: Source, work_dir: Path, out_dir: Path, tokenizer: Tokenizer, manifest: dict[str, Any], workers: int,
              max_tokens: int | None, progress: bool) -> dict[str, Any]:
    """Tokenize into shards in `work_dir` (where `out_dir`'s data is being built), continuing `manifest`."""
    last = manifest["shards"][-1] if manifest["shards"] else None
    start = StreamPosition(last["end_record"], last["end_offset"]) if last else StreamPosition()
    stream = ShardStream(work_dir, manifest, source)
    skipped = SkipCounter()
    budget = (max_tokens or float("inf")) - stream.tokens_done
    began, tokens_this_run = time.monotonic(), 0
    bar = tqdm(total=source.total_records, initial=start.record, unit="doc",
               disable=None if progress else True, dynamic_ncols=True)  # None: a bar on terminals only

    record, end = start.record, start
    records = source.records(start.record, skipped, last.get("source_position") if last else None)
    for finished in encode_in_order(records, tokenizer, workers):
        for tokens in finished:
            length = len(tokens)
            if length == 0:
                stream.skipped_records += 1
            offset = start.offset if record == start.record else 0
            while offset < length and budget > 0:
                piece = tokens[offset : offset + int(min(length - offset, budget))]
                taken = stream.add(piece, StreamPosition(record, offset), starts_document=offset == 0)
                offset += taken
                budget -= taken
                tokens_this_run += taken
            end = StreamPosition(record + 1, 0) if offset >= length else StreamPosition(record, offset)
            record += 1
            if budget <= 0:
                break
        bar.update(len(finished))
        bar.set_postfix(tokens=f"{stream.tokens_done + stream.filled:,}", tok_per_s=f"{tokens_this_run / max(time.monotonic() - began, 1e-9):,.0f}")
        if budget <= 0:
            break
    bar.close()
    stream.flush(end)

    manifest["complete"] = True
    manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
    manifest["documents"] = sum(s["documents"] for s in manifest["shards"])
    manifest["skipped_records"] = stream.skipped_records
    try:
        _check_splits(out_dir, manifest)
    except MiniLlamaError:  # the shards can never be trained on: take back what prepare wrote, and nothing else
        for shard in manifest["shards"]:
            (work_dir / shard["file"]).unlink(missing_ok=True)
        (work_dir / MANIFEST).unlink(missing_ok=True)
        raise
    write_manifest(work_dir, manifest)
    elapsed = time.monotonic() - began
    n_train = sum(s["split"] == "train" for s in manifest["shards"])
    print(
        f"prepared {manifest['tokens']:,} tokens from {manifest['documents']:,} documents into {len(manifest['shards'])} shards "
        f"({len(manifest['shards']) - n_train} val, {n_train} train) in {out_dir}; this run: {tokens_this_run:,} tokens in "
        f"{elapsed:.1f}s ({tokens_this_run / max(elapsed, 1e-9):,.0f} tokens/s); skipped {manifest['skipped_records']:,} records"
        + (f" (this run: {', '.join(f'{n:,} {reason}' for reason, n in skipped.counts.items())})" if skipped.counts else "")
    )
    return manifest


def _check_splits(out_dir: Path, manifest: dict[str, Any]) -> None:
    val = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "val")
    train = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
    if val == 0:
        raise ArgumentError("the input has no text to tokenize ({skipped:,} empty or skipped records); check the files (and "
                            "{text_field} for .jsonl and .parquet)", skipped=manifest["skipped_records"])
    if train == 0:
        raise ArgumentError("all {val:,} tokens went to the validation split of {folder}; re-run with a smaller {val_tokens} "
                            "(for example {smaller:,})", val=val, folder=out_dir, smaller=max(val // 10, 1))

