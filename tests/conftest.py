"""Shared fixtures: the optional real-data folder, a tokenizer trained on text the tests write, a tiny model;
and a helper that runs the server on a free localhost port."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from minillama.config import ModelConfig
from minillama.model import Transformer
from minillama.data.prepare import prepare
from minillama.data.sources import LocalFiles
from minillama.generate import document_end_ids, generate_tokens
from minillama.inference.text import completion_text
from minillama.tokenizer import Tokenizer, train_tokenizer

SUBJECTS = ["the cat", "a dog", "my sister", "the old king", "a small bird", "the farmer", "our teacher", "the river"]
VERBS = ["sees", "likes", "follows", "remembers", "carries", "finds", "watches", "calls"]
OBJECTS = ["the moon", "a red apple", "the green hill", "an open door", "the quiet town", "a warm bread", "the sea"]
ENDINGS = [".", " today.", " at night.", " in the morning.", " again and again."]


def synthetic_corpus(n_sentences: int, seed: int = 0) -> str:
    """Sentences from a small grammar: learnable structure, far below the entropy of uniform tokens."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_sentences):
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        lines.append(sentence[0].upper() + sentence[1:])
        if i % 7 == 6:
            lines.append("")  # blank lines separate paragraphs
    return "\n".join(lines) + "\n"


def write_examples(path, n, seed=0):
    """Examples in HellaSwag's schema and key order."""
    rng = np.random.default_rng(seed)
    words = "the cat dog sees a red apple on green hill and then runs away quickly to town".split()
    with open(path, "w") as f:
        for i in range(n):
            ctx_a, ctx_b = " ".join(rng.choice(words, 6)).capitalize(), " ".join(rng.choice(words, 3))
            endings = [" ".join(rng.choice(words, int(rng.integers(2, 7)))) + "." for _ in range(4)]
            f.write(json.dumps({"ind": i, "activity_label": "Testing", "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
                                "split": "val", "split_type": "indomain", "label": int(rng.integers(4)), "endings": endings,
                                "source_id": f"test~{i}"}) + "\n")
    return path


BESIDE_THE_CHECKOUT = Path(__file__).resolve().parents[2] / "shared" / "data"


def find_test_data() -> tuple[Path | None, str]:
    """The folder of real data files (real tokenizers, tiny shakespeare, HellaSwag head, stories260K) and where it
    was found: $MINILLAMA_TEST_DATA, else ../shared/data beside the checkout (where this workspace keeps it)."""
    if os.environ.get("MINILLAMA_TEST_DATA"):
        folder = Path(os.environ["MINILLAMA_TEST_DATA"])
        return (folder if folder.is_dir() else None), "MINILLAMA_TEST_DATA"
    return (BESIDE_THE_CHECKOUT if BESIDE_THE_CHECKOUT.is_dir() else None), "beside the checkout"


@pytest.fixture(scope="session")
def test_data() -> Path:
    folder, _ = find_test_data()
    if folder is None:
        pytest.skip("needs the real data files: run with MINILLAMA_TEST_DATA=DIR (see the README)")
    return folder


def pytest_collection_modifyitems(config, items):
    config.data_tests = sum("test_data" in item.fixturenames for item in items)


def pytest_terminal_summary(terminalreporter, config):
    """One line: whether the tests that need the real data files ran, and on which folder."""
    folder, source = find_test_data()
    count = getattr(config, "data_tests", 0)
    if folder is not None:
        terminalreporter.write_line(f"tests on the real data files: {count} selected, reading {folder} ({source})")
    elif count:
        terminalreporter.write_line(f"tests on the real data files: {count} selected and skipped; set MINILLAMA_TEST_DATA=DIR "
                                    f"(the files its SOURCES.md lists), or keep them at {BESIDE_THE_CHECKOUT}")


def data_file(test_data: Path, name: str) -> Path:
    path = test_data / name
    if not path.is_file():
        pytest.skip(f"{name} is not in MINILLAMA_TEST_DATA={test_data}")
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(synthetic_corpus(3000))
    return path


@pytest.fixture(scope="session")
def tokenizer(corpus_file, tmp_path_factory) -> Tokenizer:
    """A 320-token BPE tokenizer trained on the synthetic corpus (byte fallback needs 259 of them)."""
    return train_tokenizer([corpus_file], 320, tmp_path_factory.mktemp("tok") / "tok320.model")


@pytest.fixture
def small_config() -> ModelConfig:
    """GQA (4 query heads share 2 kv heads), long enough sequences for rotary positions to matter."""
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16, max_seq_len=128)


@pytest.fixture
def model(small_config):
    """A GQA model with sharpened weights, so that greedy choices are far from ties."""
    model = Transformer(small_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def stories(tmp_path_factory, test_data):
    """llama2.c's stories260K (tok512 vocabulary, 8 query / 4 kv heads, hidden 172), imported."""
    folder = tmp_path_factory.mktemp("stories")
    from minillama.interop.llama2c import import_llama2c

    import_llama2c(data_file(test_data, "stories260K.bin"), folder / "ckpt", data_file(test_data, "tok512.model"))
    return folder / "ckpt"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, test_data):
    """The `tiny` preset trained for 40 steps on tiny shakespeare with its own 512-token tokenizer."""
    from minillama.train.config import load_train_config
    from minillama.train.loop import train

    folder = tmp_path_factory.mktemp("tiny")
    config = load_train_config("configs/tiny.toml", [
        f"run_dir={folder / 'run'}", f"data.dir={folder / 'data'}", f"data.tokenizer={folder / 'data' / 'tok.model'}",
        f"data.files=[\"{data_file(test_data, 'tinyshakespeare.txt')}\"]", "optim.max_steps=40", "optim.warmup_steps=4",
        "eval.interval=1000", "eval.hellaswag=false", "checkpoint.interval=40", "device=cpu", "compile=false",
    ])
    train(config)
    return folder / "run" / "checkpoints" / "step_0000040"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_file, tokenizer):
    """Shards of the synthetic corpus for training runs."""
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare(LocalFiles([str(corpus_file)], split_paragraphs=True), out, tokenizer, shard_tokens=20_000, val_tokens=4_096, progress=False)
    return out


def byte_spelled_completions(model, tokenizer, prompt, seeds, max_tokens=48):
    """(seed, reference text) for the seeds whose sampled completion (temperature 1, no cut) spells a character in
    byte-fallback tokens, the text being SentencePiece's decode of prompt and completion together."""
    prompt_ids, found = tokenizer.encode(prompt), []
    for seed in seeds:
        new = generate_tokens(model, [prompt_ids], max_tokens, temperature=1.0, seed=seed, stop_ids=document_end_ids(tokenizer))[0]
        if any(tokenizer.is_byte(a) and tokenizer.is_byte(b) and tokenizer.byte_value(a) >= 0xC0 for a, b in zip(new, new[1:])):
            found.append((seed, completion_text(tokenizer, prompt_ids, new)))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
                if json.loads(response.read()) == {"status": "ok"}:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


@contextlib.contextmanager
def serving(app):
    """Serve an ASGI app with uvicorn on a thread of this process; its base URL inside the block."""
    import uvicorn

    from minillama.serve.app import uvicorn_config

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
