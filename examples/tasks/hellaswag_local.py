"""The data of hellaswag_local.yaml: HellaSwag's original validation file, read from disk, and lm-eval's own
preprocessing of it (imported, so that the local task scores exactly as the hub's does)."""

import os
from pathlib import Path

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401  (the YAML names it)

from minillama.errors import MiniLlamaError
from minillama.eval.hellaswag import default_cache_dir


def load(**_: object) -> datasets.DatasetDict:
    """hellaswag_val.jsonl from $MINILLAMA_HELLASWAG, else from where `minillama eval hellaswag` downloads it."""
    path = Path(os.environ.get("MINILLAMA_HELLASWAG") or default_cache_dir() / "hellaswag_val.jsonl")
    if not path.is_file():
        raise MiniLlamaError(f"hellaswag_local: {path} does not exist; set MINILLAMA_HELLASWAG=FILE.jsonl (rowanz/hellaswag's "
                             "hellaswag_val.jsonl), or run `minillama eval hellaswag` once where the internet is reachable")
    return datasets.load_dataset("json", data_files={"validation": str(path)})
