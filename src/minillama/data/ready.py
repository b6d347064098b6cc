"""What a training run needs before its first step: its tokenizer and its prepared data, made first when the
[data] table says so (rank 0 makes them, every rank waits), then checked against the model."""

from __future__ import annotations

from pathlib import Path

import torch

from minillama.data.config import DataConfig, max_workers, prepare_command
from minillama.data.loader import check_data, is_verified, verify_shards
from minillama.data.prepare import prepare
from minillama.data.shards import read_manifest
from minillama.data.sources import FineWebEdu, LocalFiles
from minillama.distributed import Distributed, any_rank, barrier
from minillama.errors import MiniLlamaError
from minillama.tokenizer import Tokenizer, check_vocab, load_tokenizer, train_tokenizer


def ready_tokenizer(data: DataConfig, vocab_size: int, ctx: Distributed) -> Tokenizer:
    """The run's tokenizer; trained first (by rank 0) when the config asks for one that does not exist yet."""
    if data.tokenizer and data.train_tokenizer and not Path(data.tokenizer).is_file():
        if not data.files:
            raise MiniLlamaError("data.train_tokenizer is on but data.files is empty; name the text to train it on")
        if ctx.is_main:
            files = LocalFiles(list(data.files)).files
            Path(data.tokenizer).parent.mkdir(parents=True, exist_ok=True)  # the run's own data folder, made as it names it
            trained = train_tokenizer(files, vocab_size, Path(data.tokenizer))
            print(f"trained a {trained.vocab_size}-token tokenizer on {', '.join(map(str, files))}: {trained.path}")
        barrier(ctx)
    tokenizer = load_tokenizer(data.tokenizer, how_to_pass="--set data.tokenizer=PATH")
    check_vocab(tokenizer, vocab_size, "model.vocab_size", "pass the matching --set data.tokenizer=PATH or --set model.vocab_size=N")
    return tokenizer


def ready_data(data: DataConfig, tokenizer: Tokenizer, vocab_size: int, ctx: Distributed, device: torch.device) -> Path:
    """The prepared data directory, checked against model and tokenizer; prepared first when the config says so."""
    data_dir = Path(data.dir)
    manifest = read_manifest(data_dir)
    complete = manifest is not None and manifest.get("complete")
    source = None
    if data.auto_prepare:
        try:
            source = FineWebEdu(data.subset) if data.source == "fineweb-edu" else LocalFiles(list(data.files), split_paragraphs=data.split_paragraphs)
        except MiniLlamaError:
            if not complete:
                raise
            # The files it was prepared from are not here; the prepared data is all a run needs (checked below).
            if ctx.is_main:
                print(f"using the prepared data in {data_dir} (data.files are not here, and not needed)")
    if source is not None:
        if manifest is not None and manifest["source"] != source.describe():
            raise MiniLlamaError(f"{data_dir} was prepared from {manifest['source']}, but the config names {source.describe()}; "
                                 "set another data.dir or delete this one")
        if not complete:
            if ctx.is_main:
                prepare(source, data_dir, tokenizer, data.shard_tokens, data.val_tokens,
                        workers=min(data.prepare_workers, max_workers()))  # the config's is an upper bound
            barrier(ctx)
    elif not complete:
        raise MiniLlamaError(f"{data_dir} holds no prepared data; make it with: {prepare_command(data)}  "
                             "(or --set data.auto_prepare=true)")
    check_data(data_dir, vocab_size, tokenizer.fingerprint)
    # Hash every shard once per data directory, not on every resume. The ranks decide together (collectively,
    # before rank 0 writes the record), so that all of them meet at the barrier or none does.
    if any_rank(not is_verified(data_dir), ctx, device):
        if ctx.is_main:
            verify_shards(data_dir, vocab_size)
        barrier(ctx)
    return data_dir
