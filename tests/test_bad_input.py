"""Mistakes a user makes, table-driven: each ends with exit code 2, one `minillama: error:` line that names the
problem, no traceback, and nothing in the working folder changed or removed."""

import json

import pytest
from conftest import write_examples
from safetensors.torch import load_file, save_file

from minillama.checkpoint import save_checkpoint
from minillama.cli import main
from minillama.data.loader import verify_shards
from minillama.data.prepare import prepare
from minillama.data.sources import LocalFiles
from minillama.model import Transformer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, corpus_file, tokenizer):
    """A checkpoint, a data folder, a finished run's metrics and HellaSwag files, good and bad."""
    root = tmp_path_factory.mktemp("workspace")
    from minillama.config import ModelConfig

    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16, max_seq_len=128)
    save_checkpoint(root / "ckpt", Transformer(config), tokenizer)
    prepare(LocalFiles([str(corpus_file)]), root / "data", tokenizer, shard_tokens=20_000, val_tokens=4_096, progress=False)
    verify_shards(root / "data", 320, progress=False)  # as a first training run would have
    write_examples(root / "hs.jsonl", 4)
    good = json.loads((root / "hs.jsonl").read_text().splitlines()[0])
    (root / "label_true.jsonl").write_text(json.dumps({**good, "label": True}) + "\n")
    (root / "ctx_number.jsonl").write_text(json.dumps({**good, "ctx": 5}) + "\n")
    (root / "latin1.jsonl").write_bytes(json.dumps(good).encode().replace(b"{", "{\"x\": \"caf\xe9\", ".encode("latin-1"), 1))
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text('{"kind": "train", "step": 0, "loss": 5.0}\n')
    (root / "plots").mkdir()
    save_checkpoint(root / "nan_ckpt", Transformer(config), tokenizer)
    weights = load_file(str(root / "nan_ckpt" / "model.safetensors"))
    weights["layers.1.attention.wq.weight"][0, 0] = float("nan")
    save_file(weights, str(root / "nan_ckpt" / "model.safetensors"))
    (root / "bad_tok_ckpt").mkdir()
    broken = json.loads((root / "ckpt" / "config.json").read_text())
    (root / "bad_tok_ckpt" / "config.json").write_text(json.dumps({**broken, "tokenizer": "tok.model"}))
    for name, manifest in {"list": [1, 2], "dtype": {"format": "minillama-shards", "dtype": "float64"}, "binary": None}.items():
        (root / f"manifest_{name}").mkdir()
        content = b"\x00\xff\xfe" if manifest is None else json.dumps(manifest).encode()
        (root / f"manifest_{name}" / "manifest.json").write_bytes(content)
    (root / "hf_no_size").mkdir()
    (root / "hf_no_size" / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4}))
    (root / "hf_list").mkdir()
    (root / "hf_list" / "config.json").write_text("[]")
    return root


CASES = [
    (["eval", "loss", "{w}/ckpt", "--data", "{w}/data", "--seq-len", "4096"], "the sequence length 4096 exceeds the model's max_seq_len of 128"),
    (["eval", "loss", "{w}/ckpt", "--data", "{w}/data", "--batch-size", "0"], "the batch size is 0; expected a positive integer"),
    (["eval", "loss", "{w}/ckpt", "--data", "{w}/data", "--tokens", "0"], "the tokens to score is 0; expected a positive integer"),
    (["eval", "loss", "{w}/ckpt", "--data", "{w}/data", "--tokens", "10"], "10 tokens to score are fewer than one sequence of 128"),
    (["eval", "hellaswag", "{w}/ckpt", "--data", "{w}/hs.jsonl", "--batch-size", "0"], "the batch size is 0; expected a positive integer"),
    (["eval", "hellaswag", "{w}/ckpt", "--data", "{w}/hs.jsonl", "--limit", "0"], "the example limit is 0; expected a positive integer"),
    (["eval", "hellaswag", "{w}/ckpt", "--data", "{w}/label_true.jsonl"], "label_true.jsonl:1: label is true; expected 0, 1, 2 or 3"),
    (["eval", "hellaswag", "{w}/ckpt", "--data", "{w}/ctx_number.jsonl"], "ctx_number.jsonl:1: 'ctx' is 5; expected a string"),
    (["eval", "hellaswag", "{w}/ckpt", "--data", "{w}/latin1.jsonl"], "latin1.jsonl is not UTF-8 text"),
    (["plot", "{w}/run", "--smoothing", "1.0", "-o", "{w}/plots/c.png"], "smoothing is 1.0; expected a number in [0, 1)"),
    (["plot", "{w}/run", "-o", "{w}/plots"], "plots is a directory; give the image's file name"),
    (["generate", "{w}/ckpt", "hi", "--temperature", "nan"], "temperature is nan; expected 0 (greedy) or a positive number"),
    (["generate", "{w}/ckpt", "hi", "--top-k", "-1"], "top_k is -1"),
    (["generate", "{w}/ckpt", "hi", "--max-new-tokens", "500"], "exceeds the model's max_seq_len of 128"),
    (["train", "--set", "seed=-1"], "run config field 'seed' is -1; expected an integer >= 0"),
    (["train", "--set", "optim.lr=NaN"], "run config field 'optim.lr' is nan; expected a number > 0"),
    (["train", "--set", "data.source=fineweb"], "run config field 'data.source' is \"fineweb\""),
    (["train", "--set", "eval.top_k=0"], "run config field 'eval.top_k' is 0; expected a positive integer"),
    (["train", "--set", "data.prepare_workers=-3"], "run config field 'data.prepare_workers' is -3"),
    (["train", "--set", "model=tiny"], "--set model=tiny: 'model' is a table"),
    (["train", "--set", "model.max_seq_len=1000000000000"], "model config field 'max_seq_len' is 1000000000000"),
    (["train", "--set", "optim.lrr=1"], "--set optim.lrr=1: the [optim] table has no field 'lrr'"),
    (["train", "--config", "{w}/plots"], "config file {w}/plots is a directory; pass a .toml file"),
    (["train", "--config", "{w}/latin1.jsonl"], "is not UTF-8 text; pass a .toml file"),
    (["prepare", "check", "{w}/plots"], "has no manifest.json"),
    (["inspect", "{w}/plots"], "plots is neither a checkpoint directory nor a run directory"),
    (["inspect", "{w}/missing"], "missing is neither a checkpoint directory nor a run directory"),
    (["generate", "{w}/nan_ckpt", "hi"], "nan_ckpt has NaN or infinite weights (first in 'layers.1.attention.wq.weight')"),
    (["eval", "hellaswag", "{w}/nan_ckpt", "--data", "{w}/hs.jsonl"], "has NaN or infinite weights"),
    (["generate", "{w}/bad_tok_ckpt", "hi"], "'tokenizer' and 'metadata' must be JSON objects"),
    (["generate", "{w}/ckpt", "hi", "--device", "cuda"], "use the cpu device (--device cpu, or --set device=cpu for train)"),
    (["prepare", "check", "{w}/manifest_list"], "manifest.json: 'format' is 'a JSON list'"),
    (["prepare", "check", "{w}/manifest_dtype"], "'dtype' is 'float64'; expected \"uint16\" or \"uint32\""),
    (["prepare", "check", "{w}/manifest_binary"], "manifest.json is not valid JSON (UnicodeDecodeError)"),
    (["import", "hf", "{w}/hf_no_size", "{w}/out"], "'hidden_size' is None; expected a positive integer"),
    (["import", "hf", "{w}/hf_list", "{w}/out"], "expected a JSON object of fields, got a list"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/hs.jsonl/out", "--text-field", "ctx", "--tokenizer", "{w}/ckpt/tokenizer.model"], "a part of the path is a file, not a directory"),
    (["train", "--set", "run_dir={w}/hs.jsonl", "--set", "data.dir={w}/data", "--set", "model.vocab_size=320",
      "--set", "data.tokenizer={w}/ckpt/tokenizer.model", "--set", "device=cpu", "--set", "eval.hellaswag=false"],
     "something already exists there; choose another path"),
]


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_a_mistake_is_one_line_and_changes_nothing(workspace, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    before = tree(workspace)
    assert main([a.format(w=workspace) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[-1].startswith("minillama: error: ") and message.format(w=workspace) in lines[-1], captured.err
    assert "Traceback" not in captured.err and len([l for l in lines if l.startswith("minillama: error")]) == 1
    assert tree(workspace) == before


def test_garbage_lines_in_metrics_are_skipped_not_fatal(tmp_path):
    from minillama.train.metrics import read_metrics, truncate_metrics

    run = tmp_path / "run"
    run.mkdir()
    good = [{"kind": "train", "step": 0, "loss": 5.0, "tokens_seen": 8}, {"kind": "train", "step": 1, "loss": 4.0, "tokens_seen": 16}]
    lines = [json.dumps(good[0]), "not json", "[1, 2]", '{"kind": "train"}', '{"step": "3", "kind": "x"}', json.dumps(good[1]), '{"kind": "tr']
    (run / "metrics.jsonl").write_text("\n".join(lines))
    assert read_metrics(run) == good
    truncate_metrics(run, 1)  # what a resume at step 1 does
    assert read_metrics(run) == good[:1]
    assert main(["plot", str(run), "-o", str(tmp_path / "c.png")]) == 0


def test_offline_tokenizer_download_is_one_line_in_the_commands_own_terms(tmp_path, monkeypatch, capsys):
    import logging

    import huggingface_hub

    def offline(**kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("'[Errno -2] Name or service not known' thrown; Retrying in 1s")
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.delenv("MINILLAMA_TOKENIZER", raising=False)
    assert main(["train", "--set", f"run_dir={tmp_path / 'run'}", "--set", f"data.dir={tmp_path / 'data'}"]) == 2
    err = capsys.readouterr().err
    assert err == ("minillama: error: could not download the Llama 2 tokenizer from the Hugging Face hub (ConnectionError); "
                   "pass --set data.tokenizer=PATH to a tokenizer.model, or set MINILLAMA_TOKENIZER=PATH\n")
    (tmp_path / "x.txt").write_text("some text")
    assert main(["prepare", "text", str(tmp_path / "x.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "pass --tokenizer PATH to a tokenizer.model" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
