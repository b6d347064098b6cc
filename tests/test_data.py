import contextlib
import hashlib
import json
import multiprocessing.resource_tracker
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import data_file, synthetic_corpus

from minillama.data import prepare as prepare_module
from minillama.data.loader import (
    TrainLoader,
    check_data,
    is_verified,
    validation_batches,
    verify_shards,
)
from minillama.data.prepare import prepare
from minillama.data.shards import read_manifest, write_manifest, write_shard
from minillama.data.sources import FineWebEdu, LocalFiles
from minillama.errors import MiniLlamaError
from minillama.files import DirectoryLock
from minillama.tokenizer import Tokenizer

FINEWEB_COLUMNS = ["text", "id", "dump", "url", "file_path", "language", "language_score", "token_count", "score", "int_score"]


def write_fineweb_parquet(path, texts):
    """A parquet file in FineWeb-Edu's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(texts)
    table = pa.table({
        "text": texts,
        "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)],
        "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": pa.array([0.95] * n, pa.float64()),
        "token_count": pa.array([len(t.split()) for t in texts], pa.int64()),
        "score": pa.array([3.1] * n, pa.float64()),
        "int_score": pa.array([3] * n, pa.int64()),
    })
    assert table.column_names == FINEWEB_COLUMNS
    pq.write_table(table, path)
    return path


def documents(n, seed=0):
    return [synthetic_corpus(3 + i % 5, seed=seed + i).strip() for i in range(n)]


@contextlib.contextmanager
def killed_at_shard(n):
    """prepare as if killed (KeyboardInterrupt) while writing its n-th shard."""
    real_write, calls = prepare_module.write_shard, []

    def write_or_die(path, tokens):
        calls.append(path)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_write(path, tokens)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare_module, "write_shard", write_or_die)
        yield


def read_stream(data_dir):
    manifest = read_manifest(data_dir)
    return np.concatenate([np.fromfile(data_dir / s["file"], dtype=manifest["dtype"]) for s in manifest["shards"]])


def test_round_trip_documents_in_order_with_bos(tmp_path, tokenizer):
    docs = documents(40)
    parquet = write_fineweb_parquet(tmp_path / "fw.parquet", docs)
    manifest = prepare(LocalFiles([str(parquet)]), tmp_path / "out", tokenizer, shard_tokens=500, val_tokens=300, progress=False)
    stream = read_stream(tmp_path / "out").tolist()
    starts = [i for i, t in enumerate(stream) if t == tokenizer.bos_id]
    decoded = [tokenizer.decode(stream[a + 1 : b]) for a, b in zip(starts, starts[1:] + [len(stream)])]
    assert decoded == docs
    assert manifest["shards"][0]["split"] == "val" and manifest["shards"][0]["tokens"] == 300
    assert all(s["split"] == "train" for s in manifest["shards"][1:])
    assert all(s["tokens"] == 500 for s in manifest["shards"][1:-1])
    assert manifest["documents"] == 40 and manifest["dtype"] == "uint16"
    check_data(tmp_path / "out", tokenizer.vocab_size, tokenizer.fingerprint)


def test_parallel_workers_write_identical_shards(tmp_path, tokenizer):
    parquet = write_fineweb_parquet(tmp_path / "fw.parquet", documents(700))
    one = prepare(LocalFiles([str(parquet)]), tmp_path / "one", tokenizer, shard_tokens=4000, workers=1, progress=False)
    two = prepare(LocalFiles([str(parquet)]), tmp_path / "two", tokenizer, shard_tokens=4000, workers=2, progress=False)
    assert one == two
    for shard in one["shards"]:
        assert (tmp_path / "one" / shard["file"]).read_bytes() == (tmp_path / "two" / shard["file"]).read_bytes()


def children() -> list[int]:
    """Live child processes of this one, as the OS sees them (not only those multiprocessing still tracks)."""
    mine = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0")) == os.getpid() and not fields.get("State", "").startswith("Z"):
            mine.append(int(status.parent.name))
    return mine


@pytest.mark.parametrize("tokenizer_name", ["llama2_tokenizer.model", "trained"])
def test_one_large_document_is_cut_for_the_workers_and_encodes_as_a_whole(tmp_path, tokenizer, tokenizer_name, request,
                                                                          monkeypatch):
    """A .txt file is one document; cut at spaces between words into tasks for 2 workers, its tokens must equal
    SentencePiece's encoding of the whole text, and no worker process may outlive the command."""
    if tokenizer_name != "trained":
        tokenizer = Tokenizer(data_file(request.getfixturevalue("test_data"), tokenizer_name))
    text = "".join(documents(400, seed=3)).replace(".", ".  \n\t") + " ünïcödé 日本語 and the end"
    (tmp_path / "book.txt").write_text(text)
    monkeypatch.setattr(prepare_module, "CHARS_PER_TASK", 2_000)
    multiprocessing.resource_tracker.ensure_running()  # Python's one helper process, shared and long-lived
    before = children()
    manifest = prepare(LocalFiles([str(tmp_path / "book.txt")]), tmp_path / "out", tokenizer, shard_tokens=3_000,
                       val_tokens=1_000, workers=2, progress=False)
    assert read_stream(tmp_path / "out").tolist() == [tokenizer.bos_id, *tokenizer.sp.encode(text)]
    assert manifest["documents"] == 1 and len(text) > 20 * 2_000
    assert children() == before


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tokenizer):
    parquet = write_fineweb_parquet(tmp_path / "fw.parquet", documents(300) + [""] * 3 + documents(100, seed=9))
    source = lambda: LocalFiles([str(parquet)])  # noqa: E731
    whole = prepare(source(), tmp_path / "whole", tokenizer, shard_tokens=1500, val_tokens=700, progress=False)

    with killed_at_shard(4), pytest.raises(KeyboardInterrupt):  # the temporary file must not survive
        prepare(source(), tmp_path / "resumed", tokenizer, shard_tokens=1500, val_tokens=700, progress=False)
    assert len(read_manifest(tmp_path / "resumed")["shards"]) == 3
    resumed = prepare(source(), tmp_path / "resumed", tokenizer, shard_tokens=1500, val_tokens=700, progress=False)
    assert resumed == whole and resumed["skipped_records"] == 3
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert np.array_equal(read_stream(tmp_path / "resumed"), read_stream(tmp_path / "whole"))


def test_full_disk_leaves_no_partial_shard(tmp_path, monkeypatch):
    import errno

    from minillama import files

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_shard(tmp_path / "train_000001.bin", np.arange(1000, dtype=np.uint16))
    assert list(tmp_path.iterdir()) == []


def test_max_tokens_stops_early(tmp_path, tokenizer):
    parquet = write_fineweb_parquet(tmp_path / "fw.parquet", documents(200))
    manifest = prepare(LocalFiles([str(parquet)]), tmp_path / "out", tokenizer, shard_tokens=1000, val_tokens=500, max_tokens=2345, progress=False)
    assert manifest["tokens"] == 2345


def test_fineweb_edu_streams_through_datasets(tmp_path, tokenizer, monkeypatch):
    """The hub is unreachable here: redirect load_dataset to the same rows as a local parquet, through the real
    datasets streaming machinery, and check the call FineWebEdu makes."""
    datasets = pytest.importorskip("datasets")
    docs = documents(50)
    parquet = write_fineweb_parquet(tmp_path / "fw.parquet", docs)
    calls = []
    real_load = datasets.load_dataset

    def local_load(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return real_load("parquet", data_files=str(parquet), split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", local_load)
    via_hub = prepare(FineWebEdu("sample-10BT"), tmp_path / "hub", tokenizer, shard_tokens=800, val_tokens=400, progress=False)
    via_file = prepare(LocalFiles([str(parquet)]), tmp_path / "file", tokenizer, shard_tokens=800, val_tokens=400, progress=False)
    assert calls[0] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
    assert np.array_equal(read_stream(tmp_path / "hub"), read_stream(tmp_path / "file"))
    assert via_hub["source"]["subset"] == "sample-10BT" and via_hub["tokens"] == via_file["tokens"]


FINEWEB_CARD = """---
license: odc-by
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
"""


def fineweb_snapshot(folder, files, with_card=True):
    """A miniature of the dataset repository as `hf download` leaves it: the card (its config YAML) and parquet
    files under sample/10BT/, plus a crawl under data/ that the sample must not read."""
    (folder / "sample" / "10BT").mkdir(parents=True)
    (folder / "data" / "CC-MAIN-2024-10").mkdir(parents=True)
    if with_card:
        (folder / "README.md").write_text(FINEWEB_CARD)
    write_fineweb_parquet(folder / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", ["not in the sample"])
    return [write_fineweb_parquet(folder / "sample" / "10BT" / f"{i:03d}_00000.parquet", docs) for i, docs in enumerate(files)]


@pytest.mark.parametrize("with_card", [True, False], ids=["card", "no card"])
def test_a_local_fineweb_snapshot_reads_as_the_sample_and_a_resume_seeks_to_its_file_and_row(tmp_path, tokenizer, monkeypatch,
                                                                                             with_card):
    pytest.importorskip("datasets")
    from minillama.data import sources

    monkeypatch.setattr(sources, "SEEK_EVERY", 25)
    files = [documents(90, seed=0), documents(90, seed=100), documents(90, seed=200)]
    parquets = fineweb_snapshot(tmp_path / "fw", files, with_card)
    source = lambda: FineWebEdu("sample-10BT", snapshot=tmp_path / "fw")  # noqa: E731
    reference = prepare(LocalFiles([str(p) for p in parquets]), tmp_path / "files", tokenizer, shard_tokens=1500, val_tokens=700,
                        progress=False)

    with killed_at_shard(15), pytest.raises(KeyboardInterrupt):
        prepare(source(), tmp_path / "out", tokenizer, shard_tokens=1500, val_tokens=700, progress=False)
    last = read_manifest(tmp_path / "out")["shards"][-1]
    position = last["source_position"]
    assert position["record"] <= last["end_record"] < position["record"] + 25 and position["record"] >= 90
    # The resume opens the stream at the file and row it records. The first file, read in full before, now holds
    # fewer rows: a resume that re-streamed from the start and skipped by count would land 80 records off.
    write_fineweb_parquet(parquets[0], files[0][:10])
    resumed = prepare(source(), tmp_path / "out", tokenizer, shard_tokens=1500, val_tokens=700, progress=False)
    assert np.array_equal(read_stream(tmp_path / "out"), read_stream(tmp_path / "files"))
    assert resumed["tokens"] == reference["tokens"] and resumed["source"] == FineWebEdu("sample-10BT").describe()


def test_a_missing_or_empty_fineweb_snapshot_is_one_line(tmp_path, tokenizer, capsys):
    from minillama.cli import main

    (tmp_path / "empty").mkdir()
    for folder, message in [(tmp_path / "nowhere", "--from nowhere is not a folder"),
                            (tmp_path / "empty", "--from empty holds no sample/10BT/* files; download them with: hf download")]:
        assert main(["prepare", "fineweb-edu", "--from", str(folder), "--out", str(tmp_path / "out"),
                     "--tokenizer", str(tokenizer.path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err.replace(str(tmp_path) + "/", ""), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_text_and_jsonl_sources(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n\n\n")
    (tmp_path / "b.jsonl").write_text('{"body": "Third."}\n\n{"body": "Fourth."}\n')
    whole = list(LocalFiles([str(tmp_path / "a.txt")]).records(0, prepare_module.SkipCounter()))
    assert whole == ["First paragraph.\n\nSecond paragraph.\n\n\n"]
    paragraphs = LocalFiles([str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")], text_field="body", split_paragraphs=True)
    assert [r for r in paragraphs.records(0, prepare_module.SkipCounter()) if r] == ["First paragraph.", "Second paragraph.", "Third.", "Fourth."]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_see_disjoint_windows_covering_the_split(tmp_path, world_size):
    data_dir = numbered_tokens(tmp_path, [50, 37, 80])  # token i has id i, so a window is named by its first token
    seq_len, batch = 4, 2
    seen = []
    for rank in range(world_size):
        loader = TrainLoader(data_dir, batch, seq_len, rank=rank, world_size=world_size, shuffle=False)
        for _ in range((167 - 1) // seq_len // (batch * world_size)):
            x, y = next(loader)
            assert np.array_equal(y[:, :-1].numpy(), x[:, 1:].numpy())
            assert np.array_equal(y.numpy(), x.numpy() + 1)  # consecutive tokens, also across shard boundaries
            seen += x[:, 0].tolist()
    assert len(seen) == len(set(seen))
    windows = (167 - 1) // seq_len
    assert sorted(seen) == [w * seq_len for w in range(windows - windows % (batch * world_size))]


def test_shuffled_epochs_differ_and_are_deterministic(tmp_path):
    data_dir = numbered_tokens(tmp_path, [300, 300])
    first = [next(TrainLoader(data_dir, 4, 8, seed=1))[0] for _ in range(1)][0]
    again = next(TrainLoader(data_dir, 4, 8, seed=1))[0]
    other = next(TrainLoader(data_dir, 4, 8, seed=2))[0]
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_loader_resume_gives_identical_batches(tmp_path):
    data_dir = numbered_tokens(tmp_path, [200, 150, 90])
    straight = TrainLoader(data_dir, 3, 8, seed=5)
    expected = [next(straight)[0] for _ in range(40)]  # spans several epochs
    resumed = TrainLoader(data_dir, 3, 8, seed=5)
    for _ in range(17):
        next(resumed)
    state = json.loads(json.dumps(resumed.state_dict()))
    fresh = TrainLoader(data_dir, 3, 8, seed=5)
    fresh.load_state_dict(state)
    assert all(np.array_equal(next(fresh)[0], e) for e in expected[17:])


def step_windows(data_dir, steps, world_size, batch, windows_per_step, state=None):
    """The set of windows (named by their first token) each optimizer step reads, over all ranks and micro-steps."""
    loaders = [TrainLoader(data_dir, batch, 8, rank, world_size, seed=5, windows_per_step=windows_per_step) for rank in range(world_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    micro_steps = windows_per_step // (batch * world_size)
    out = [sorted(w for loader in loaders for _ in range(micro_steps) for w in next(loader)[0][:, 0].tolist()) for _ in range(steps)]
    return out, loaders[0].state_dict()


def test_a_step_reads_the_same_windows_however_ranks_and_micro_batches_split_it(tmp_path):
    """So a run resumes on another number of ranks, or with another micro-batch, and reads what it would have read.
    Several epochs (of 54 windows, 12 per step): an epoch ends between steps, never inside one."""
    data_dir = numbered_tokens(tmp_path, [200, 150, 90])
    expected, _ = step_windows(data_dir, 12, world_size=1, batch=12, windows_per_step=12)
    assert all(len(set(step)) == 12 for step in expected)
    for world_size, batch in [(2, 3), (3, 2), (1, 4), (4, 3)]:
        assert step_windows(data_dir, 12, world_size, batch, windows_per_step=12)[0] == expected
        first, state = step_windows(data_dir, 7, world_size, batch, windows_per_step=12)  # then resume on another split
        assert first + step_windows(data_dir, 5, 2, 2, windows_per_step=12, state=json.loads(json.dumps(state)))[0] == expected


def test_growing_steps_take_the_next_windows_of_the_order_and_end_an_epoch_only_between_steps(tmp_path):
    """A batch-size schedule (batch.stages): steps of 6 windows read what a run of steps of 6 reads; a step of 12
    that no longer fits the epoch (54 windows) starts the next, as a run of steps of 12 does; a resume in between
    continues the same."""
    data_dir = numbered_tokens(tmp_path, [200, 150, 90])

    def step(loader, windows):
        loader.set_step_windows(windows)
        return sorted(w for _ in range(windows // 3) for w in next(loader)[0][:, 0].tolist())

    staged, steady = TrainLoader(data_dir, 3, 8, seed=5, windows_per_step=12), TrainLoader(data_dir, 3, 8, seed=5, windows_per_step=6)
    assert [step(staged, 6) for _ in range(8)] == [step(steady, 6) for _ in range(8)]  # 48 of the epoch's 54 windows
    resumed = TrainLoader(data_dir, 3, 8, seed=5, windows_per_step=12)
    resumed.load_state_dict(json.loads(json.dumps(staged.state_dict())))
    twelve, _ = step_windows(data_dir, 6, world_size=1, batch=3, windows_per_step=12)  # 4 steps per epoch of 54
    assert [step(staged, 12) for _ in range(2)] == [step(resumed, 12) for _ in range(2)] == twelve[4:6]


def test_validation_set_does_not_depend_on_world_size(tmp_path):
    data_dir = numbered_tokens(tmp_path, [100, 100], val=[90, 60])
    one = sorted(x[:, 0].tolist() for x, _ in validation_batches(data_dir, 4, 8, total_tokens=120))
    three = sorted(x[:, 0].tolist() for r in range(3) for x, _ in validation_batches(data_dir, 4, 8, 120, rank=r, world_size=3))
    assert sum(one, []) and sorted(sum(one, [])) == sorted(sum(three, [])) == [w * 8 for w in range(15)]


def numbered_tokens(tmp_path, train_sizes, val=(40,)):
    """Shards whose tokens are 0, 1, 2, ... across the val split, then again across the train split."""
    data_dir = tmp_path / "numbered"
    data_dir.mkdir()
    shards, index = [], 0
    for split, sizes in (("val", val), ("train", train_sizes)):
        start = 0
        for size in sizes:
            name = f"{split}_{index:06d}.bin"
            sha = write_shard(data_dir / name, np.arange(start, start + size, dtype=np.uint16))
            shards.append({"file": name, "split": split, "tokens": size, "documents": 1, "sha256": sha})
            start, index = start + size, index + 1
    write_manifest(data_dir, {"format": "minillama-shards", "format_version": 1, "dtype": "uint16", "complete": True,
                              "tokens": sum(s["tokens"] for s in shards), "tokenizer": {"fingerprint": "x", "vocab_size": 65536},
                              "shards": shards})
    return data_dir


# --- bad input ---------------------------------------------------------------------------------------------


def test_missing_files_and_empty_globs(tmp_path):
    with pytest.raises(MiniLlamaError, match="no such file"):
        LocalFiles([str(tmp_path / "nope.txt")])
    with pytest.raises(MiniLlamaError, match="matches no files"):
        LocalFiles([str(tmp_path / "*.jsonl")])


def test_bad_jsonl_line_names_file_and_line(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good one"}\n{"text": broken\n{"title": "no text"}\n{"text": "good two"}\n')
    with pytest.raises(MiniLlamaError, match=r"bad.jsonl:2: not valid JSON"):
        prepare(LocalFiles([str(bad)]), tmp_path / "out", tokenizer, val_tokens=2, progress=False)
    assert not any((tmp_path / "out").glob("*.bin"))
    manifest = prepare(LocalFiles([str(bad)], skip_bad_records=True), tmp_path / "out2", tokenizer, val_tokens=2, progress=False)
    assert manifest["skipped_records"] == 2 and manifest["documents"] == 2


def test_missing_text_field_and_non_utf8(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(MiniLlamaError, match=r"bad.jsonl:1: no string field 'text' \(name another with text_field"):
        prepare(LocalFiles([str(bad)]), tmp_path / "out", tokenizer, progress=False)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(MiniLlamaError, match=r"latin.txt: byte 3 is not valid UTF-8"):
        prepare(LocalFiles([str(latin)]), tmp_path / "out3", tokenizer, progress=False)


def test_empty_documents_are_skipped_and_counted(tmp_path, tokenizer):
    parquet = write_fineweb_parquet(tmp_path / "fw.parquet", ["one doc here", "", "   \n", "two doc here"])
    manifest = prepare(LocalFiles([str(parquet)]), tmp_path / "out", tokenizer, val_tokens=3, progress=False)
    assert manifest["documents"] == 2 and manifest["skipped_records"] == 2


def test_output_from_another_tokenizer_is_refused(tmp_path, tokenizer, corpus_file):
    from minillama.tokenizer import train_tokenizer

    other = train_tokenizer([corpus_file], 300, tmp_path / "other.model")
    prepare(LocalFiles([str(corpus_file)], split_paragraphs=True), tmp_path / "out", tokenizer, val_tokens=100, progress=False)
    with pytest.raises(MiniLlamaError, match="holds shards made with another tokenizer.*overwrite"):
        prepare(LocalFiles([str(corpus_file)], split_paragraphs=True), tmp_path / "out", other, val_tokens=100, progress=False)
    manifest = prepare(LocalFiles([str(corpus_file)], split_paragraphs=True), tmp_path / "out", other, val_tokens=100,
                       overwrite=True, progress=False)
    assert manifest["tokenizer"]["vocab_size"] == 300


def test_everything_in_validation_is_refused(tmp_path, tokenizer):
    (tmp_path / "small.txt").write_text("just a few words")
    with pytest.raises(MiniLlamaError, match="all .* tokens went to the validation split.*val_tokens"):
        prepare(LocalFiles([str(tmp_path / "small.txt")]), tmp_path / "out", tokenizer, progress=False)


def test_data_checks_before_training(tmp_path, tokenizer):
    parquet = write_fineweb_parquet(tmp_path / "fw.parquet", documents(100))
    out = tmp_path / "out"
    prepare(LocalFiles([str(parquet)]), out, tokenizer, shard_tokens=1000, val_tokens=500, progress=False)
    with pytest.raises(MiniLlamaError, match="tokenized with vocab 320, the model has vocab 32000"):
        check_data(out, 32000)
    with pytest.raises(MiniLlamaError, match="was tokenized with a different tokenizer"):
        check_data(out, 320, "0" * 64)
    with pytest.raises(MiniLlamaError, match="fewer than one optimizer step of 64 windows"):
        TrainLoader(out, 64, 1024)
    with pytest.raises(MiniLlamaError, match="fewer than one window"):
        next(validation_batches(out, 4, 1024, 10_000))
    shard = out / "train_000002.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(MiniLlamaError, match="train_000002.bin has 100 bytes, the manifest says 2,000"):
        check_data(out, 320)
    shard.unlink()
    with pytest.raises(MiniLlamaError, match="train_000002.bin is missing"):
        check_data(out, 320)


def test_cli_prepare_bad_input_exit_code(tmp_path, capsys):
    from minillama.cli import main

    assert main(["prepare", "text", str(tmp_path / "*.txt"), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "t.model")]) == 2
    err = capsys.readouterr().err
    assert "matches no files" in err and "Traceback" not in err


def test_overwrite_removes_only_shards_and_a_second_prepare_is_refused(tmp_path, corpus_file, tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"not a shard")  # a user's file that merely ends in .bin
    (out / "train_000001.bin").write_bytes(b"\0\0")
    source = LocalFiles([str(corpus_file)], split_paragraphs=True)
    with pytest.raises(MiniLlamaError, match=r"already holds 1 shard files \(train_000001.bin, ...\) but no manifest.json; .* overwrite"):
        prepare(source, out, tokenizer, shard_tokens=20_000, val_tokens=2_000, progress=False)
    # A shard-named file that no earlier manifest lists is not ours to replace, even with --overwrite.
    with pytest.raises(MiniLlamaError, match=r"holds shard-named files that no manifest of an earlier prepare lists "
                                             r"\(train_000001.bin\); overwrite replaces only what an earlier prepare made"):
        prepare(source, out, tokenizer, shard_tokens=20_000, val_tokens=2_000, overwrite=True, progress=False)
    assert (out / "train_000001.bin").read_bytes() == b"\0\0"
    (out / "train_000001.bin").rename(tmp_path / "moved.bin")
    with DirectoryLock(out, "prepare command"):
        with pytest.raises(MiniLlamaError, match=rf"{out} is in use by another prepare command \(process {os.getpid()}\)"):
            prepare(source, out, tokenizer, shard_tokens=20_000, val_tokens=2_000, overwrite=True, progress=False)
    manifest = prepare(source, out, tokenizer, shard_tokens=20_000, val_tokens=2_000, overwrite=True, progress=False)
    assert (out / "weights.bin").read_bytes() == b"not a shard"
    assert sorted(p.name for p in out.glob("*.bin")) == sorted([s["file"] for s in manifest["shards"]] + ["weights.bin"])


def test_overwrite_with_bad_input_leaves_the_earlier_data_whole(tmp_path, corpus_file, tokenizer):
    """The new data is built beside the old: an input that fails halfway (a bad record on line 51, a byte that is
    not UTF-8) changes nothing; a good one replaces exactly the files the earlier manifest listed."""
    out = tmp_path / "out"
    source = LocalFiles([str(corpus_file)], split_paragraphs=True)
    prepare(source, out, tokenizer, shard_tokens=20_000, val_tokens=2_000, progress=False)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(50)) + '{"txet": "typo"}\n')
    broken = tmp_path / "broken.txt"
    broken.write_bytes(b"good text\n" * 3000 + b"\xff bad byte\n")
    for bad in (LocalFiles([str(records)]), LocalFiles([str(broken)])):
        with pytest.raises(MiniLlamaError):
            prepare(bad, out, tokenizer, shard_tokens=20_000, val_tokens=2_000, overwrite=True, progress=False)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    manifest = prepare(LocalFiles([str(corpus_file)]), out, tokenizer, shard_tokens=30_000, val_tokens=3_000, overwrite=True,
                       progress=False)
    after = sorted(p.name for p in out.iterdir())
    assert after == sorted([s["file"] for s in manifest["shards"]] + ["manifest.json", "notes.txt"])
    assert (out / "notes.txt").read_text() == "mine" and manifest["shard_tokens"] == 30_000


@pytest.mark.slow
def test_written_files_follow_the_umask(tmp_path, corpus_file, tokenizer):
    """In a process started with umask 027 (the umask is read once per process), as a plain open() would give."""
    subprocess.run([sys.executable, "-m", "minillama", "prepare", "text", str(corpus_file), "--out", str(tmp_path / "out"),
                    "--tokenizer", str(tokenizer.path), "--shard-tokens", "20000", "--val-tokens", "2000", "--workers", "1"],
                   check=True, capture_output=True, preexec_fn=lambda: os.umask(0o027))
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")}
    assert modes and set(modes.values()) == {0o640}, modes


def test_shards_are_hashed_and_range_checked_before_they_are_trusted(tmp_path, corpus_file, tokenizer, capsys):
    from minillama.cli import main

    out = tmp_path / "out"
    manifest = prepare(LocalFiles([str(corpus_file)]), out, tokenizer, shard_tokens=20_000, val_tokens=2_000, progress=False)
    assert main(["prepare", "check", str(out), "--quiet"]) == 0
    assert "every sha256 and token id checked" in capsys.readouterr().out and is_verified(out)

    shard = out / manifest["shards"][-1]["file"]
    tokens = np.fromfile(shard, dtype=manifest["dtype"])
    tokens[100] = 5  # an altered shard of the same size
    tokens.tofile(shard)
    assert is_verified(out)  # the record is of the manifest, which did not change: only a full check sees the damage
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["prepare", "check", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == f"minillama: error: shard {shard} does not match its sha256 in manifest.json; it was altered or damaged: re-run `minillama prepare` with --overwrite\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    tokens[100] = tokenizer.vocab_size + 7  # foreign ids, with a manifest that agrees with them
    tokens.tofile(shard)
    manifest["shards"][-1]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert not is_verified(out)  # a changed manifest is checked again
    with pytest.raises(MiniLlamaError, match=rf"shard {shard} holds token id {tokenizer.vocab_size + 7} at position 100, beyond the vocabulary of {tokenizer.vocab_size}"):
        verify_shards(out, tokenizer.vocab_size, progress=False)


def test_leftovers_of_an_interrupted_write_are_removed_by_the_next_prepare(tmp_path, corpus_file, tokenizer):
    out = tmp_path / "out"
    source = LocalFiles([str(corpus_file)])
    prepare(source, out, tokenizer, shard_tokens=20_000, val_tokens=2_000, progress=False)
    (out / ".train_000002.bin.a1b2c3.tmp").write_bytes(b"half a shard")
    (out / ".manifest.json.x9y8.tmp").write_text("{")
    (out / ".notes").write_text("a user's hidden file")
    prepare(source, out, tokenizer, shard_tokens=20_000, val_tokens=2_000, progress=False)
    assert sorted(p.name for p in out.glob(".*")) == [".notes"]  # the .lock it made is gone too


def test_the_download_command_we_name_exists_in_the_installed_hub_cli(capsys):
    """README, `prepare fineweb-edu --help` and its errors name `hf download` with some flags: the hub's installed
    CLI (huggingface_hub 1.x ships `hf`; `huggingface-cli` is gone) must know the command and every flag."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    from minillama.cli import main

    if not shutil.which("hf"):
        pytest.skip("needs huggingface_hub's `hf` command on PATH")
    with pytest.raises(SystemExit):
        main(["prepare", "fineweb-edu", "--help"])
    named = [Path("README.md").read_text(), " ".join(capsys.readouterr().out.split())]  # --help wraps its lines
    commands = [line for text in named for line in re.findall(r"hf download [^`\n]*", text)]
    assert len(commands) == 2, commands
    usage = subprocess.run(["hf", "download", "--help"], capture_output=True, text=True)
    assert usage.returncode == 0, usage.stderr
    for command in commands:
        for flag in re.findall(r"--[a-z-]+", command):
            assert flag in usage.stdout, (flag, command)
