"""The checks a run config can fail without any computation: `train` makes them before it starts anything and
`train --dry-run` makes the same ones, so a dry run refuses what the run would refuse."""

from __future__ import annotations

from pathlib import Path

from minillama.data.shards import MANIFEST, read_manifest
from minillama.data.sources import LocalFiles
from minillama.errors import MiniLlamaError
from minillama.files import require_regular_file
from minillama.layout import CONFIG_FILE, is_run_dir
from minillama.tokenizer import Tokenizer, check_vocab
from minillama.train.config import TrainConfig


def check_run_paths(config: TrainConfig) -> None:
    """run_dir is a folder a run may write into, data.dir is not something else, and the tokenizer, when it is
    already there, is a SentencePiece model of the model's vocabulary."""
    _check_run_dir(Path(config.run_dir))
    _check_data_dir(Path(config.data.dir))
    tokenizer = config.data.tokenizer
    if tokenizer and (Path(tokenizer).exists() or not config.data.train_tokenizer):
        if not Path(tokenizer).exists():
            raise MiniLlamaError(f"data.tokenizer {tokenizer} does not exist and data.train_tokenizer is off; pass --set "
                                 "data.tokenizer=PATH to a tokenizer.model, or --set data.train_tokenizer=true to train one on data.files")
        require_regular_file(Path(tokenizer), "data.tokenizer")
        check_vocab(Tokenizer(tokenizer), config.model.vocab_size, "model.vocab_size",
                    "pass the matching --set data.tokenizer=PATH or --set model.vocab_size=N")
    elif tokenizer and config.data.train_tokenizer:
        _check_files_to_train_on(config)


def _check_files_to_train_on(config: TrainConfig) -> None:
    """A tokenizer to be trained needs data.files; when they are not here but data.dir is prepared, the tokenizer
    those shards were made with is what the run needs, and the message says which."""
    try:
        LocalFiles(list(config.data.files))
    except MiniLlamaError as exc:
        manifest = read_manifest(Path(config.data.dir))
        if manifest is None:
            raise
        made_with = manifest["tokenizer"]
        raise MiniLlamaError(f"data.tokenizer {config.data.tokenizer} does not exist, and data.files to train one on are not "
                             f"here ({exc}); {config.data.dir} was prepared with a tokenizer of vocab {made_with['vocab_size']} "
                             f"(sha256 {made_with['fingerprint'][:12]}…): pass it with --set data.tokenizer=PATH") from None


def _check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise MiniLlamaError(f"run_dir {run_dir} is a file; choose a folder for the run (--set run_dir=DIR)")
    if (run_dir / MANIFEST).is_file():
        raise MiniLlamaError(f"run_dir {run_dir} is a prepared data folder (it holds {MANIFEST}); a run writes checkpoints and "
                             "logs into its own folder: --set run_dir=DIR")
    if (run_dir / CONFIG_FILE).is_file() and not is_run_dir(run_dir):
        raise MiniLlamaError(f"run_dir {run_dir} is a checkpoint directory; a run writes into its own folder: --set run_dir=DIR")


def _check_data_dir(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise MiniLlamaError(f"data.dir {data_dir} is a file; name the folder made by `minillama prepare` (--set data.dir=DIR)")
    if (data_dir / CONFIG_FILE).is_file() and not (data_dir / MANIFEST).exists():
        raise MiniLlamaError(f"data.dir {data_dir} is a checkpoint directory, not prepared data; name the folder made by "
                             "`minillama prepare` (--set data.dir=DIR)")
