"""SentencePiece tokenizers: loading, finding the Llama 2 default, and training a Llama-style vocabulary."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from minillama.errors import ArgumentError, MiniLlamaError
from minillama.files import claim_output, require_regular_file, write_file_atomically
from minillama.hub import quiet_hub

# A public, ungated copy of Meta's Llama 2 tokenizer.model on the Hugging Face hub, and its sha256.
LLAMA2_TOKENIZER_REPO = "hf-internal-testing/llama-tokenizer"
LLAMA2_TOKENIZER_FILE = "tokenizer.model"
LLAMA2_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
TOKENIZER_ENV = "MINILLAMA_TOKENIZER"
SPECIAL_IDS = 3  # unk, bos, eos


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_WORD_SPACE = re.compile(r"(?<=\S) (?=\S)")  # a single space between two words
_SPACE_AFTER_CHARACTER = re.compile("[^\u2581]\u2581")  # a piece that would join a word to the space after it
_SENTINEL = "x"


class Tokenizer:
    """A SentencePiece model with Llama's conventions: BOS prepended by default, EOS on request."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.path = Path(model_path)
        require_regular_file(self.path, "a tokenizer")  # it is read twice (hashed, loaded): a FIFO would hang
        if not self.path.is_file():
            raise ArgumentError("tokenizer file {path} does not exist; pass {tokenizer} PATH to a SentencePiece .model", path=self.path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as exc:
            raise MiniLlamaError(f"{self.path} is not a SentencePiece model ({exc}); pass a .model file") from None
        self.fingerprint = file_sha256(self.path)  # stored beside data and checkpoints to catch mix-ups

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def cut(self, text: str, size: int) -> list[str]:
        """`text` in pieces of about `size` characters that encode, the first with `encode` and the others with
        `encode_continuations`, to exactly the tokens of the whole: each cut falls just before a single space
        between two words, where a tokenizer whose pieces never hold a space after another character always
        starts a new token. Other tokenizers get the text whole."""
        if len(text) <= size or not self.cuts_exactly:
            return [text]
        pieces, start = [], 0
        while len(text) - start > size and (cut := _WORD_SPACE.search(text, start + size)):
            pieces.append(text[start : cut.start()])
            start = cut.start()
        return [*pieces, text[start:]]

    def encode_continuations(self, pieces: list[str]) -> list[list[int]]:
        """Tokens of each piece as it reads after a word (so without the space SentencePiece puts before a text):
        encoded behind a one-letter word whose own tokens are dropped."""
        skip = len(self.sp.encode(_SENTINEL))
        return [ids[skip:] for ids in self.sp.encode([_SENTINEL + piece for piece in pieces], num_threads=1)]

    @functools.cached_property
    def cuts_exactly(self) -> bool:
        pieces = [self.id_to_piece(i) for i in range(self.vocab_size)]
        if any(_SPACE_AFTER_CHARACTER.search(piece) for piece in pieces):
            return False
        probe = "Some text,  with\tmixed   whitespace\n\n and 1234 digits; ünïcödé and 日本語 too. The end"
        whole = self.sp.encode(probe)
        cuts = [m.start() for m in _WORD_SPACE.finditer(probe)]
        return all(self.sp.encode(probe[:c]) + self.encode_continuations([probe[c:]])[0] == whole for c in cuts)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def is_byte(self, token_id: int) -> bool:
        """A byte-fallback token ('<0xE6>'), which spells one UTF-8 byte of a character outside the vocabulary."""
        return self.sp.is_byte(int(token_id))

    def byte_value(self, token_id: int) -> int:
        return int(self.id_to_piece(token_id)[3:5], 16)


def resolve_tokenizer_path(path: str | Path | None = None, how_to_pass: str = "{tokenizer} PATH") -> Path:
    """Where the tokenizer comes from, in order: `path`, $MINILLAMA_TOKENIZER, the Llama 2 model from the hub.
    `how_to_pass` says how to name a tokenizer when the hub cannot be reached (an ArgumentError template: the
    {tokenizer} argument, or a caller's own terms)."""
    if path:
        return Path(path)
    if os.environ.get(TOKENIZER_ENV):
        return Path(os.environ[TOKENIZER_ENV])
    return download_llama2_tokenizer(how_to_pass)


def check_vocab(tokenizer: Tokenizer, vocab_size: int, model: str, fix: str) -> None:
    """Refuse a tokenizer whose vocabulary size differs from a model's: its ids would name other tokens. `fix` is
    an ArgumentError template (it may name an argument as {parameter})."""
    if tokenizer.vocab_size != vocab_size:
        raise ArgumentError("tokenizer {path} has vocab {got}, {model} has {want}; " + fix, path=tokenizer.path,
                            got=tokenizer.vocab_size, model=model, want=vocab_size)


def load_tokenizer(path: str | Path | None = None, how_to_pass: str = "{tokenizer} PATH") -> Tokenizer:
    return Tokenizer(resolve_tokenizer_path(path, how_to_pass))


def download_llama2_tokenizer(how_to_pass: str = "{tokenizer} PATH") -> Path:
    """Fetch Llama 2's tokenizer.model into the Hugging Face cache (once) and check its sha256. Offline, the
    hub's retry messages are kept back: the user gets one line."""
    try:
        from huggingface_hub import hf_hub_download

        with quiet_hub():
            local = Path(hf_hub_download(repo_id=LLAMA2_TOKENIZER_REPO, filename=LLAMA2_TOKENIZER_FILE))
    except Exception as exc:  # network, auth, or hub errors all mean the same thing to the user
        raise ArgumentError("could not download the Llama 2 tokenizer from the Hugging Face hub ({why}); pass " + how_to_pass
                            + " to a tokenizer.model, or set {env}=PATH", why=type(exc).__name__, env=TOKENIZER_ENV) from None
    if file_sha256(local) != LLAMA2_TOKENIZER_SHA256:
        raise MiniLlamaError(f"downloaded {local} does not match Llama 2's tokenizer sha256; delete it and retry")
    return local


def read_training_text(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Lines of .txt files and the `text_field` of .jsonl records, for tokenizer training."""
    for path in files:
        if not path.is_file():
            raise MiniLlamaError(f"{path}: no such file")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, 1):
                if path.suffix == ".jsonl":
                    try:
                        line = json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise MiniLlamaError(f"{path}:{line_number}: not a JSON object with a '{text_field}' field") from None
                if line.strip():
                    yield line.rstrip("\n")


def is_sentencepiece_model(path: Path) -> bool:
    try:
        Tokenizer(path)
    except MiniLlamaError:
        return False
    return True


def _refuse_a_tokenizer_in_use(out: Path) -> None:
    """A checkpoint's tokenizer, or the one a prepared data folder was tokenized with, is part of what it belongs to:
    a new one there (even with --force) would make the checkpoint or the shards unreadable."""
    folder = out.absolute().parent
    owner = ("checkpoint" if (folder / "config.json").is_file() and any((folder / n).exists() for n in ("model.safetensors", "sharded")) else
             "prepared data folder" if out.exists() and (folder / "manifest.json").is_file() else None)
    if owner:
        raise ArgumentError("{path} belongs to the {owner} {folder}, which needs it as it is; write the tokenizer "
                            "somewhere else", path=out, owner=owner, folder=folder)


def train_tokenizer(files: list[Path], vocab_size: int, out: Path, text_field: str = "text", force: bool = False) -> Tokenizer:
    """Train a Llama-style SentencePiece BPE model: byte fallback (no unknown characters), digits split one by one,
    no Unicode normalisation, whitespace kept as is; ids 0/1/2 are unk/bos/eos as in Llama 2."""
    import sentencepiece as spm

    out = Path(out)
    if vocab_size < SPECIAL_IDS:  # SentencePiece fails on these with its internal check; larger ones it explains
        raise ArgumentError("{vocab_size} is {value}; expected at least 260: 3 special ids, 256 byte pieces and the "
                            "text's own characters", value=vocab_size)
    _refuse_a_tokenizer_in_use(out)
    claim_output(out, [Path(f) for f in files], "tokenizer model", force, is_sentencepiece_model, directory=False)
    model = io.BytesIO()
    input_errors: list[MiniLlamaError] = []

    def sentences() -> Iterator[str]:
        # SentencePiece would wrap our exception in an opaque RuntimeError; keep it and raise it after.
        try:
            lines = 0
            for lines, line in enumerate(read_training_text([Path(f) for f in files], text_field), 1):
                yield line
            if not lines:
                jsonl = any(str(f).endswith(".jsonl") for f in files)
                raise ArgumentError("{files} holds no text to train on; check the files" + (" (and {text_field}, now {field!r})" if jsonl else ""),
                                    files=", ".join(map(str, files)), field=text_field)
        except MiniLlamaError as exc:
            input_errors.append(exc)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=True,
            character_coverage=0.99995,
            max_sentence_length=16384,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        if input_errors:
            raise input_errors[0] from None
        too_small = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(exc))
        if too_small:
            raise MiniLlamaError(
                f"vocab size {vocab_size} is too small for this text: its characters and the 256 byte-fallback pieces "
                f"need at least {too_small.group(1)}; choose a vocab size of {too_small.group(1)} or more"
            ) from None
        raise MiniLlamaError(f"tokenizer training failed: {str(exc).strip().splitlines()[-1]}") from None
    if input_errors:
        raise input_errors[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out, model.getvalue())
    return Tokenizer(out)
