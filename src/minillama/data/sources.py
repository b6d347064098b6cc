"""Where documents come from: FineWeb-Edu streamed from the Hugging Face hub (or read from a local snapshot of it),
or local .txt/.jsonl/.parquet files.

A source yields one item per record, in a fixed order, so that a record's index identifies it across runs and
preparation can resume by skipping records. A record that is empty or bad (and skipped) is yielded as None. A
source that can seek says, for a record, a `position` at or before it to resume reading from.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillama.errors import ArgumentError, MiniLlamaError
from minillama.hub import quiet_hub

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
# Rows per FineWeb-Edu sample, for the progress bar's ETA, and its files in the dataset repository (from the card).
FINEWEB_EDU_ROWS = {"sample-10BT": 9_672_101, "sample-100BT": 97_270_686, "sample-350BT": 339_347_842}
FINEWEB_EDU_FILES = {"sample-10BT": "sample/10BT/*", "sample-100BT": "sample/100BT/*", "sample-350BT": "sample/350BT/*"}
SEEK_EVERY = 10_000  # records between the stream positions a resume can seek to (it re-reads at most this many)
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class SkipCounter:
    """Records that were left out, by reason, for the summary and the manifest."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1


class FineWebEdu:
    """HuggingFaceFW/fineweb-edu in streaming mode: documents arrive as they download, nothing else is stored. With
    `snapshot`, a local copy of the dataset repository (what `hf download HuggingFaceFW/fineweb-edu
    --repo-type dataset --include "sample/10BT/*"` leaves) is read instead, through the same `datasets` streaming
    reader, in the same order: the same rows, the same shards."""

    def __init__(self, subset: str = "sample-10BT", snapshot: str | Path | None = None):
        self.subset = subset
        self.snapshot = Path(snapshot) if snapshot is not None else None
        self.total_records = FINEWEB_EDU_ROWS.get(subset)
        self.positions: dict[int, dict[str, Any]] = {}  # record index -> the stream's state just before reading it

    def describe(self) -> dict[str, Any]:
        return {"kind": "fineweb-edu", "dataset": FINEWEB_EDU, "subset": self.subset}  # the data, wherever it is read from

    def position(self, record: int) -> dict[str, Any] | None:
        """The latest stream position at or before `record`: the record's index and `datasets`' own resumable state
        (which parquet file, and which row in it), so that a resume seeks there instead of re-reading what it skips."""
        at = max((index for index in self.positions if index <= record), default=None)
        if at is None:
            return None
        for index in [index for index in self.positions if index < at]:  # shards close in order: older ones are done
            del self.positions[index]
        return {"record": at, "state": self.positions[at]}

    def records(self, skip: int, skipped: SkipCounter, position: dict[str, Any] | None = None) -> Iterator[str | None]:
        try:
            import datasets
        except ImportError:
            raise MiniLlamaError("preparing FineWeb-Edu needs the 'datasets' package: pip install 'minillama[data]'") from None
        where = f"{self.snapshot} (a local copy of {FINEWEB_EDU})" if self.snapshot else f"{FINEWEB_EDU} on the Hugging Face hub"
        try:
            with quiet_hub():
                stream = self._open(datasets).select_columns(["text"])
                index = 0
                if position is not None and position["record"] <= skip:
                    try:
                        stream.load_state_dict(position["state"])  # straight to the file and row
                    except (KeyError, TypeError, ValueError, IndexError):
                        raise MiniLlamaError(f"the manifest's source_position for record {position['record']:,} is not a "
                                             "position of this stream; prepare again with --overwrite") from None
                    index = position["record"]
                rows = iter(stream)
                while True:
                    if index % SEEK_EVERY == 0:
                        self.positions[index] = stream.state_dict()
                    row = next(rows, None)
                    if row is None:
                        return
                    if index >= skip:
                        yield _nonempty(_text_of(row, where), skipped)
                    index += 1
        except ValueError as exc:  # pyarrow's ArrowInvalid is one; so are `datasets`' refusals of a folder's layout
            raise self._unreadable(where, exc) from None
        except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as exc:
            fix = ("check that the folder holds the dataset's parquet files (and README.md)" if self.snapshot else
                   "check the network, or download the files with `hf download` and pass their folder as {snapshot}")
            raise ArgumentError("cannot read {subset} from {where} ({why}); " + fix, subset=self.subset, where=where,
                                why=f"{type(exc).__name__}: {exc}") from None

    def _unreadable(self, where: str, exc: ValueError) -> MiniLlamaError:
        """What a ValueError from `datasets` or pyarrow means for the user's files, in one line."""
        text = str(exc)
        if "not in the dataset" in text:
            return MiniLlamaError(f"{where} has no 'text' column ({text.split('Columns in the dataset: ')[-1].rstrip('.')}); "
                                  "FineWeb-Edu's parquet files hold each document in a string column named 'text'")
        if "BuilderConfig" in text and self.snapshot is not None:
            return MiniLlamaError(f"{self.snapshot / 'README.md'} is not FineWeb-Edu's dataset card (it names no config "
                                  f"{self.subset!r}); use the card the dataset comes with, or move it away to read the files "
                                  f"matching {FINEWEB_EDU_FILES.get(self.subset, 'the subset')}")
        return MiniLlamaError(f"cannot read {where} ({type(exc).__name__}: {text[:200]}); a parquet file is damaged or not "
                              "parquet: download it again")

    def _open(self, datasets: Any) -> Any:
        """The stream: from the hub, or from the snapshot by the dataset card's config (its README.md) when the snapshot
        holds it, else by the card's file pattern for the subset."""
        if self.snapshot is None:
            return datasets.load_dataset(FINEWEB_EDU, name=self.subset, split="train", streaming=True)
        if not self.snapshot.is_dir():
            raise ArgumentError("{snapshot} {folder} is not a folder; pass the folder `hf download` put the dataset into",
                                folder=self.snapshot)
        if (self.snapshot / "README.md").is_file():
            return datasets.load_dataset(str(self.snapshot), name=self.subset, split="train", streaming=True)
        if self.subset not in FINEWEB_EDU_FILES:
            raise ArgumentError("{snapshot} {folder} has no README.md to name the files of {name}; known subsets: {known}",
                                folder=self.snapshot, name=self.subset, known=", ".join(FINEWEB_EDU_FILES))
        pattern = FINEWEB_EDU_FILES[self.subset]
        if not list(self.snapshot.glob(pattern)):
            raise ArgumentError("{snapshot} {folder} holds no {pattern} files; download them with: hf download "
                                "HuggingFaceFW/fineweb-edu --repo-type dataset --include \"{pattern}\" --local-dir {folder}",
                                folder=self.snapshot, pattern=pattern)
        return datasets.load_dataset(str(self.snapshot), data_files={"train": pattern}, split="train", streaming=True)


def _text_of(row: dict[str, Any], where: str) -> str | None:
    text = row["text"]
    if text is not None and not isinstance(text, str):
        raise MiniLlamaError(f"{where}: column 'text' holds {type(text).__name__} values, not text; FineWeb-Edu's parquet files "
                             "hold each document in a string column named 'text'")
    return text


def _nonempty(text: str | None, skipped: SkipCounter) -> str | None:
    if text is None or not text.strip():
        skipped.add("empty")
        return None
    return text


class LocalFiles:
    """.txt (one document per file, or per blank-line-separated paragraph), .jsonl and .parquet (a text field)."""

    def __init__(self, patterns: list[str], text_field: str = "text", split_paragraphs: bool = False, skip_bad_records: bool = False):
        self.files = expand_patterns(patterns)
        self.text_field = text_field
        self.split_paragraphs = split_paragraphs
        self.skip_bad_records = skip_bad_records
        self.total_records = None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "text",
            "files": [str(f) for f in self.files],
            "text_field": self.text_field,
            "split_paragraphs": self.split_paragraphs,
        }

    def position(self, record: int) -> None:
        return None  # local files re-read what a resume skips: fast, and their order is fixed by their names

    def records(self, skip: int, skipped: SkipCounter, position: dict[str, Any] | None = None) -> Iterator[str | None]:
        index = 0
        for path in self.files:
            reader = {".txt": self._txt, ".jsonl": self._jsonl, ".parquet": self._parquet}[path.suffix]
            for record in reader(path, skipped):
                if index >= skip:
                    yield record
                index += 1

    def _bad(self, where: str, problem: str, skipped: SkipCounter, **values: object) -> None:
        """Refuse or count a bad record; `problem` is an ArgumentError template over `values`."""
        if not self.skip_bad_records:
            raise ArgumentError("{where}: " + problem + "; fix the record or pass {skip_bad_records} to skip such records",
                                where=where, **values)
        skipped.add("bad record")

    def _decode(self, raw: bytes, where: str, skipped: SkipCounter) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._bad(where, "byte {start} is not valid UTF-8 (re-encode the file as UTF-8)", skipped, start=exc.start)
            return None

    def _txt(self, path: Path, skipped: SkipCounter) -> Iterator[str | None]:
        raw = path.read_bytes()
        if not self.split_paragraphs:
            text = self._decode(raw, str(path), skipped)
            yield None if text is None else _nonempty(text, skipped)
            return
        line = 1
        for paragraph in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
            text = self._decode(paragraph, f"{path}:{line}", skipped)
            line += paragraph.count(b"\n") + 2
            yield None if text is None else _nonempty(text.strip("\n"), skipped)

    def _jsonl(self, path: Path, skipped: SkipCounter) -> Iterator[str | None]:
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                where = f"{path}:{line_number}"
                if not raw.strip():
                    continue  # blank lines are not records
                line = self._decode(raw, where, skipped)
                if line is None:
                    yield None
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    self._bad(where, "not valid JSON ({why})", skipped, why=exc.msg)
                    yield None
                    continue
                text = record.get(self.text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    self._bad(where, "no string field {field!r} (name another with {text_field})", skipped, field=self.text_field)
                    yield None
                    continue
                yield _nonempty(text, skipped)

    def _parquet(self, path: Path, skipped: SkipCounter) -> Iterator[str | None]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise MiniLlamaError(f"{path}: not a readable parquet file ({exc})") from None
        if self.text_field not in parquet.schema_arrow.names:
            raise ArgumentError("{path}: no column '{column}' (columns: {columns}); name another with {text_field}", path=path,
                                column=self.text_field, columns=", ".join(parquet.schema_arrow.names))
        column_type = parquet.schema_arrow.field(self.text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise ArgumentError("{path}: column '{column}' holds {column_type}, not text; name the text column with {text_field}",
                                path=path, column=self.text_field, column_type=column_type)
        for batch in parquet.iter_batches(columns=[self.text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                yield _nonempty(text, skipped)


def expand_patterns(patterns: list[str]) -> list[Path]:
    """Files named or matched by glob patterns (each pattern's matches sorted), in the order given."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise MiniLlamaError(f"'{pattern}' matches no files")
        for match in map(Path, matches):
            if not match.is_file():
                raise MiniLlamaError(f"{match}: no such file")
            if match.suffix not in TEXT_SUFFIXES:
                raise MiniLlamaError(f"{match}: unsupported file type '{match.suffix}'; expected one of {', '.join(TEXT_SUFFIXES)}")
            files.append(match)
    return files
