"""Where documents come from: FineWeb-Edu streamed from the Hugging Face hub, or local .txt/.jsonl/.parquet files.

A source yields one item per record, in a fixed order, so that a record's index identifies it across runs and
preparation can resume by skipping records. A record that is empty or bad (and skipped) is yielded as None.
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
# Rows per FineWeb-Edu sample, for the progress bar's ETA (from the dataset card).
FINEWEB_EDU_ROWS = {"sample-10BT": 9_672_101, "sample-100BT": 97_270_686, "sample-350BT": 339_347_842}
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class SkipCounter:
    """Records that were left out, by reason, for the summary and the manifest."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1


class FineWebEdu:
    """HuggingFaceFW/fineweb-edu in streaming mode: documents arrive as they download, nothing else is stored."""

    def __init__(self, subset: str = "sample-10BT"):
        self.subset = subset
        self.total_records = FINEWEB_EDU_ROWS.get(subset)

    def describe(self) -> dict[str, Any]:
        return {"kind": "fineweb-edu", "dataset": FINEWEB_EDU, "subset": self.subset}

    def records(self, skip: int, skipped: SkipCounter) -> Iterator[str | None]:
        try:
            import datasets
        except ImportError:
            raise MiniLlamaError("preparing FineWeb-Edu needs the 'datasets' package: pip install 'minillama[data]'") from None
        try:
            with quiet_hub():
                stream = datasets.load_dataset(FINEWEB_EDU, name=self.subset, split="train", streaming=True)
                stream = stream.select_columns(["text"])
                if skip:
                    stream = stream.skip(skip)
                for row in stream:
                    yield _nonempty(row["text"], skipped)
        except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as exc:
            raise MiniLlamaError(
                f"cannot stream {FINEWEB_EDU} ({self.subset}) from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                "check the network, or download its parquet files and run `minillama prepare text FILES.parquet`"
            ) from None


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

    def records(self, skip: int, skipped: SkipCounter) -> Iterator[str | None]:
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
