"""Mistakes a user makes, table-driven: each ends with exit code 2, one `minillama: error:` line that names the
problem, no traceback, and nothing in the working folder changed or removed."""

import json
import os

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
    hf_config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                 "intermediate_size": 176, "vocab_size": 320, "max_position_embeddings": 128}
    for name in ["hf_no_index", "hf_no_weights", "hf_bad_weights"]:
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(hf_config))
    (root / "hf_no_index" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    (root / "hf_bad_weights" / "model.safetensors").write_bytes(b"garbage")
    (root / "empty.txt").touch()
    (root / "bad.toml").write_text("x = = 1\n")
    (root / "notes").mkdir()
    # Where --force must not take what its command did not make (issue 25's data-loss cases).
    from minillama.interop.hf import export_hf

    export_hf(root / "ckpt", root / "hf_export")
    export_hf(root / "ckpt", root / "hf_plus")
    (root / "hf_plus" / "README.md").write_text("my notes on this model")
    (root / "hf_plus" / "my_eval_results.txt").write_text("acc 0.31")
    save_checkpoint(root / "train_run" / "checkpoints" / "step_0000004", Transformer(config), tokenizer, metadata={"step": 4},
                    training_state={"step": 4})
    (root / "train_run" / "checkpoints" / "step_0000004" / "my_eval.json").write_text("{}")
    (root / "link_out").symlink_to(root / "hf_export", target_is_directory=True)
    (root / "fake.gguf").write_text("GGUF is where I keep my notes\n")
    (root / "four.bin").write_bytes(b"abcd")
    (root / "zeros.bin").write_bytes(bytes(1024))
    (root / "notes" / "summary_curves.png").write_bytes(b"my own picture")
    # Shapes and values nobody listed before (issue 25's traceback categories).
    import numpy as np

    from minillama.data.shards import write_manifest, write_shard

    (root / "oov_target").mkdir()
    val = np.arange(1, 41, dtype=np.uint16)
    val[8] = 9999  # beyond the vocabulary, where the first 8-token window has only its target
    shards = [{"file": name, "split": split, "tokens": 40, "documents": 1, "sha256": write_shard(root / "oov_target" / name, tokens)}
              for name, split, tokens in (("val_000000.bin", "val", val), ("train_000001.bin", "train", np.arange(1, 41, dtype=np.uint16)))]
    write_manifest(root / "oov_target", {"format": "minillama-shards", "format_version": 1, "dtype": "uint16", "complete": True,
                                         "tokens": 80, "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": 320},
                                         "shards": shards})
    (root / "model_string.toml").write_text('model = "tiny"\n')
    (root / "model_number.toml").write_text("model = 5\n")
    (root / "preset_list.toml").write_text('[model]\npreset = ["tiny"]\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), root / "ints.parquet")
    pq.write_table(pa.table({"text": [["a"], ["b"]]}), root / "lists.parquet")
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    for name, change in {"no_tokens": lambda m: m.pop("tokens"), "no_sha": lambda m: m["shards"][0].pop("sha256"),
                         "no_end": lambda m: m["shards"][0].pop("end_record")}.items():
        broken_manifest = json.loads(json.dumps(manifest))
        change(broken_manifest)
        (root / f"manifest_{name}").mkdir()
        (root / f"manifest_{name}" / "manifest.json").write_text(json.dumps(broken_manifest))
    empty_ending = json.loads((root / "hs.jsonl").read_text().splitlines()[0])
    empty_ending["endings"][2] = " "
    (root / "empty_ending.jsonl").write_text(json.dumps(empty_ending) + "\n")
    (root / "partial_run").mkdir()
    (root / "partial_run" / "metrics.jsonl").write_text('{"kind": "train", "step": 0, "tokens_seen": 8}\n'
                                                        '{"kind": "eval", "step": 0, "val_loss": 3.0}\n')
    (root / "step_text_ckpt").mkdir()
    for name in ("model.safetensors", "tokenizer.model"):
        (root / "step_text_ckpt" / name).write_bytes((root / "ckpt" / name).read_bytes())
    step_text = json.loads((root / "ckpt" / "config.json").read_text())
    (root / "step_text_ckpt" / "config.json").write_text(json.dumps({**step_text, "metadata": {"step": "five"}}))
    hf_base = json.loads((root / "hf_export" / "config.json").read_text())
    for name, change in {"half_positions": {"max_position_embeddings": 2048.5}, "eps_text": {"rms_norm_eps": "tiny"},
                         "scaling_text": {"rope_scaling": "yes"}, "theta_text": {"rope_theta": "big"},
                         "kv_text": {"num_key_value_heads": "2"}}.items():
        (root / f"hf_{name}").mkdir()
        for file in (root / "hf_export").iterdir():
            (root / f"hf_{name}" / file.name).write_bytes(file.read_bytes())
        (root / f"hf_{name}" / "config.json").write_text(json.dumps({**hf_base, **change}))
    (root / "notes" / "todo.txt").write_text("the user's own notes")
    (root / "notes" / "photo.png").write_bytes(b"\x89PNG my holiday")
    (root / "notes" / "results.json").write_text('{"my": "numbers"}')
    (root / "run" / "config.toml").write_text("# the run's config\n")
    # Reliability III: a checkpoint's config.json not UTF-8, a FIFO for weights, a checkpoint without its tokenizer
    for name in ("latin1_ckpt", "fifo_ckpt", "no_tok_ckpt"):
        (root / name).mkdir()
    (root / "latin1_ckpt" / "config.json").write_bytes((root / "ckpt" / "config.json").read_bytes().replace(b"{", b"{\"x\": \"\xe9\", ", 1))
    (root / "fifo_ckpt" / "config.json").write_bytes((root / "ckpt" / "config.json").read_bytes())
    os.mkfifo(root / "fifo_ckpt" / "model.safetensors")
    for file in ("config.json", "model.safetensors"):
        (root / "no_tok_ckpt" / file).write_bytes((root / "ckpt" / file).read_bytes())
    (root / "escaping_manifest").mkdir()
    escaping = json.loads((root / "data" / "manifest.json").read_text())
    escaping["shards"][0]["file"] = "../four.bin"
    (root / "escaping_manifest" / "manifest.json").write_text(json.dumps(escaping))
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, table in {"fw_content": pa.table({"content": ["a text"] * 3}), "fw_ints": pa.table({"text": [1, 2, 3]})}.items():
        (root / name / "sample" / "10BT").mkdir(parents=True)
        pq.write_table(table, root / name / "sample" / "10BT" / "000_00000.parquet")
    (root / "fw_corrupt" / "sample" / "10BT").mkdir(parents=True)
    (root / "fw_corrupt" / "sample" / "10BT" / "000_00000.parquet").write_bytes(b"PAR1 not parquet at all PAR1")
    (root / "fw_card").mkdir()
    (root / "fw_card" / "README.md").write_text("# my notes on this download\n")
    (root / "fw_card" / "sample" / "10BT").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a text"] * 3}), root / "fw_card" / "sample" / "10BT" / "000_00000.parquet")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    write_sharded_checkpoints(root, config, tokenizer)
    return root


class RunsCode:
    """What a hostile pickle does: makes unpickling call a function of its choice."""

    def __reduce__(self):
        return (print, ("this ran",))


def write_sharded_checkpoints(root, config, tokenizer):
    """An fsdp run's checkpoint, written by a one-process group; then copies with one shard missing, with a hostile
    pickle as index, and without an index."""
    import pickle
    import shutil

    import torch

    from minillama.distributed import close_distributed, init_distributed
    from minillama.train.config import OptimConfig
    from minillama.train.optim import build_optimizer
    from minillama.train.parallel import parallelize
    from minillama.train.resume import save_sharded_checkpoint

    ctx = init_distributed("cpu", alone_as_group=True)
    try:
        model = Transformer(config)
        parallelize(model, "fsdp", "none", False, None, torch.device("cpu"), ctx)
        saved = root / "fsdp" / "checkpoints" / "step_0000001"
        save_sharded_checkpoint(saved, model, build_optimizer(model, OptimConfig(), torch.device("cpu")), tokenizer,
                                {"step": 1}, {"step": 1}, ctx)
    finally:
        close_distributed(ctx)
    for name in ("no_shard", "hostile_index", "no_index", "zero_shard", "bent_index", "bad_args_index"):
        shutil.copytree(saved, root / name)
    (root / "no_shard" / "sharded" / "__0_0.distcp").unlink()
    (root / "hostile_index" / "sharded" / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    (root / "no_index" / "sharded" / ".metadata").unlink()
    shard = root / "zero_shard" / "sharded" / "__0_0.distcp"
    shard.write_bytes(bytes(shard.stat().st_size))
    # Only allowed classes, with fields of the wrong kinds: no code runs, and nothing may trip over them.
    with open(saved / "sharded" / ".metadata", "rb") as f:
        index = pickle.load(f)
    entry = next(iter(index.state_dict_metadata.values()))
    entry.size = "not a size"
    (root / "bent_index" / "sharded" / ".metadata").write_bytes(pickle.dumps(index))
    index.state_dict_metadata = ["a", "list"]
    (root / "bad_args_index" / "sharded" / ".metadata").write_bytes(pickle.dumps(index))
    return saved


CASES = [
    (["eval", "loss", "{w}/ckpt", "--data", "{w}/oov_target", "--seq-len", "8", "--tokens", "8"],
     "the val split of {w}/oov_target holds token id 9999, beyond the vocabulary of 320"),
    (["train", "--config", "{w}/model_string.toml"], "model_string.toml: 'model' is \"tiny\"; expected a [model] table"),
    (["train", "--config", "{w}/model_number.toml"], "model_number.toml: 'model' is 5; expected a [model] table"),
    (["train", "--config", "{w}/preset_list.toml"], "field 'model.preset' is [\"tiny\"]; expected a preset name (one of: mini-llama-109M, tiny"),
    (["train", "--set", "seed=18446744073709551616"], "run config field 'seed' is 18446744073709551616; expected an integer in [0, 9,223,372,036,854,775,807]"),
    (["generate", "{w}/ckpt", "hi", "--seed", "18446744073709551616"], "--seed is 18446744073709551616; expected an integer from 0 to"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model", "--shard-tokens", "1000000000000000"],
     "--shard-tokens is 1,000,000,000,000,000; expected at most 2,147,483,648"),
    (["train", "--set", "model.dim=120000000", "--set", "model.n_heads=1", "--set", "model.n_kv_heads=1", "--set", "device=cpu",
      "--set", "data.dir={w}/data", "--set", "data.tokenizer={w}/ckpt/tokenizer.model", "--set", "model.vocab_size=320",
      "--set", "run_dir={w}/huge_run", "--set", "batch.seq_len=64", "--set", "model.max_seq_len=64", "--set", "eval.val_tokens=64",
      "--set", "batch.total_tokens=512", "--set", "batch.micro_batch=8"], "per rank for its float32 weights, gradients and AdamW moments alone"),
    (["train", "--set", "device=meta", "--set", "data.dir={w}/data", "--set", "data.tokenizer={w}/ckpt/tokenizer.model",
      "--set", "model.vocab_size=320", "--set", "run_dir={w}/meta_run"], "device 'meta' is not one Mini Llama runs on; use auto, cpu, cuda, cuda:N or mps"),
    (["generate", "{w}/ckpt", "hi", "--device", "xpu"], "device 'xpu' is not one Mini Llama runs on"),
    (["prepare", "text", "{w}/ints.parquet", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model"],
     "ints.parquet: column 'text' holds int64, not text; name the text column with --text-field"),
    (["prepare", "text", "{w}/lists.parquet", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model"], "lists.parquet: column 'text' holds list<"),
    (["prepare", "check", "{w}/manifest_no_tokens"], "a complete manifest needs its total of tokens"),
    (["prepare", "check", "{w}/manifest_no_sha"], "shard entry 0 needs a file name, a split (train or val), a token count and a sha256"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/manifest_no_end", "--tokenizer", "{w}/ckpt/tokenizer.model"], "shard entry 0 needs whole numbers for end_record"),
    (["eval", "hellaswag", "{w}/ckpt", "--data", "{w}/empty_ending.jsonl"], "empty_ending.jsonl:1: ending 2 is empty; every ending needs text"),
    (["generate", "{w}/step_text_ckpt", "hi"], "'metadata.step' is \"five\"; expected a whole number of steps"),
    (["import", "hf", "{w}/hf_half_positions", "{w}/out"], "field 'max_seq_len' is 2048.5; expected an integer"),
    (["import", "hf", "{w}/hf_eps_text", "{w}/out"], "field 'norm_eps' is 'tiny'; expected a number"),
    (["import", "hf", "{w}/hf_scaling_text", "{w}/out"], "'rope_scaling' is \"yes\"; expected a JSON object (or null)"),
    (["import", "hf", "{w}/hf_theta_text", "{w}/out"], "'rope_theta' is \"big\"; expected a number"),
    (["import", "hf", "{w}/hf_kv_text", "{w}/out"], "field 'n_kv_heads' is '2'; expected an integer or null"),
    (["export", "hf", "{w}/ckpt", "{w}/hf_plus", "--force"],
     "hf_plus holds files that a Hugging Face export does not (README.md, my_eval_results.txt); --force replaces only"),
    (["import", "hf", "{w}/hf_export", "{w}/train_run/checkpoints/step_0000004", "--force"],
     "step_0000004 holds files that a checkpoint does not (my_eval.json, training_state.pt); --force replaces only"),
    (["export", "hf", "{w}/ckpt", "{w}/link_out", "--force"], "link_out is a symbolic link (to {w}/hf_export); give the path it points to"),
    (["export", "gguf", "{w}/ckpt", "{w}/fake.gguf", "--force"], "fake.gguf exists and is not a GGUF file (--force replaces only"),
    (["export", "llama2c-tokenizer", "{w}/ckpt/tokenizer.model", "{w}/four.bin", "--force"], "four.bin exists and is not a run.c tokenizer file"),
    (["export", "llama2c-tokenizer", "{w}/ckpt/tokenizer.model", "{w}/zeros.bin", "--force"], "zeros.bin exists and is not a run.c tokenizer file"),
    (["report", "{w}/run", "-o", "{w}/notes/summary.md"], "summary_curves.png exists and no earlier report at {w}/notes/summary.md made it"),
    (["generate", "{w}/no_shard", "hi"], "no_shard/sharded cannot be read"),
    (["generate", "{w}/zero_shard", "hi"], "zero_shard/sharded cannot be read ("),
    (["generate", "{w}/bent_index", "hi"], "bent_index/sharded/.metadata is not a checkpoint index (its entry"),
    (["generate", "{w}/bad_args_index", "hi"], "bad_args_index/sharded/.metadata is not a checkpoint index (its table of tensors is not a mapping"),
    (["generate", "{w}/hostile_index", "hi"], "hostile_index/sharded/.metadata is not a checkpoint index (builtins.print has no place in a checkpoint index)"),
    (["export", "hf", "{w}/no_index", "{w}/hf_out"], "no_index/sharded has no .metadata; the sharded checkpoint is incomplete"),
    (["train", "--set", "parallel=fsdp", "--set", "dtype=float16", "--set", "device=cpu", "--set", "run_dir={w}/fp16_run"],
     "parallel = fsdp trains in bfloat16 or float32, and dtype float16 is float16 on cpu; use --set dtype=float32"),
    (["train", "--set", "parallel=zero3"], "run config field 'parallel' is \"zero3\"; expected one of \"ddp\", \"fsdp\""),
    (["train", "--set", "activation_checkpointing=some"], "run config field 'activation_checkpointing' is \"some\"; expected one of"),
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
    (["generate", "{w}/ckpt", "hi", "--temperature", "nan"], "--temperature is nan; expected 0 (greedy) or a positive number"),
    (["generate", "{w}/ckpt", "hi", "--top-k", "-1"], "--top-k is -1"),
    (["generate", "{w}/ckpt", "hi", "--max-new-tokens", "500"], "exceeds the model's max_seq_len of 128"),
    (["train", "--set", "seed=-1"], "run config field 'seed' is -1; expected an integer in [0, 9,223,372,036,854,775,807]"),
    (["train", "--set", "optim.lr=NaN"], "run config field 'optim.lr' is nan; expected a number > 0"),
    (["train", "--set", "data.source=fineweb"], "run config field 'data.source' is \"fineweb\""),
    (["train", "--set", "eval.top_k=0"], "run config field 'eval.top_k' is 0; expected a positive integer"),
    (["train", "--set", "data.prepare_workers=-3"], "run config field 'data.prepare_workers' is -3"),
    (["train", "--set", "data.files=5"], "--set: field 'data': field 'files' is 5; expected a list"),
    (["train", "--set", "batch.micro_batch=big"], "--set: field 'batch': field 'micro_batch' is 'big'; expected an integer or \"auto\""),
    (["train", "--dry-run", "--tokens-per-s", "-5"], "--tokens-per-s is -5.0; expected a positive speed in tokens per second"),
    (["train", "--set", "run_dir={w}/train_run", "--resume", "never"], "train_run already holds checkpoints; use --resume to continue it"),
    (["train", "--set", "run_dir={w}/plots", "--resume"], "--resume: {w}/plots holds no complete checkpoint to resume from"),
    (["train", "--set", "model=tiny"], "--set model=tiny: 'model' is a table; set one of its fields, e.g. --set model.preset="),
    (["train", "--set", "model.max_seq_len=1000000000000"], "model config field 'max_seq_len' is 1000000000000"),
    (["train", "--set", "optim.lrr=1"], "--set optim.lrr=1: the [optim] table has no field 'lrr'"),
    (["train", "--config", "{w}/plots"], "config file {w}/plots is a directory; pass a .toml file"),
    (["train", "--config", "{w}/latin1.jsonl"], "is not UTF-8 text; pass a .toml file"),
    (["prepare", "check", "{w}/plots"], "has no manifest.json"),
    (["inspect", "{w}/plots"], "plots is neither a checkpoint directory (no config.json) nor a training run directory"),
    (["inspect", "{w}/missing"], "missing does not exist; pass a checkpoint directory or a training run directory"),
    (["generate", "{w}/nan_ckpt", "hi"], "nan_ckpt has NaN or infinite weights (first in 'layers.1.attention.wq.weight')"),
    (["eval", "hellaswag", "{w}/nan_ckpt", "--data", "{w}/hs.jsonl"], "has NaN or infinite weights"),
    (["generate", "{w}/bad_tok_ckpt", "hi"], "'tokenizer' and 'metadata' must be JSON objects"),
    (["generate", "{w}/ckpt", "hi", "--device", "cuda"], "use the cpu device (--device cpu, or --set device=cpu for train)"),
    (["prepare", "check", "{w}/manifest_list"], "manifest.json: 'format' is 'a JSON list'"),
    (["prepare", "check", "{w}/manifest_dtype"], "'dtype' is 'float64'; expected \"uint16\" or \"uint32\""),
    (["prepare", "check", "{w}/manifest_binary"], "manifest.json is not valid JSON (UnicodeDecodeError)"),
    (["import", "hf", "{w}/hf_no_size", "{w}/out"], "'hidden_size' is None; expected a positive integer"),
    (["import", "hf", "{w}/hf_list", "{w}/out"], "expected a JSON object of fields, got a list"),
    (["generate", "{w}/ckpt", "hi", "--top-p", "0"], "--top-p is 0.0; expected a number in (0, 1]"),
    (["generate", "{w}/ckpt", "hi", "--top-p", "1.5"], "--top-p is 1.5; expected a number in (0, 1]"),
    (["generate", "{w}/ckpt", "hi " * 200], "the prompt is 602 tokens: 475 too many for the model's max_seq_len of 128, which must also hold the new tokens"),
    (["generate", "{w}/ckpt", "hi", "--max-new-tokens", "0"], "--max-new-tokens is 0; expected at least 1"),
    (["generate", "{w}/ckpt", "hi", "--num-samples", "0"], "--num-samples is 0; expected from 1 to 1024"),
    (["generate", "{w}/ckpt", "hi", "--num-samples", "100000"], "--num-samples is 100000; expected from 1 to 1024"),
    (["prepare", "text", "{w}/notes/todo.txt", "--out", "{w}/ckpt", "--tokenizer", "{w}/ckpt/tokenizer.model"], "went to the validation split of {w}/ckpt; re-run with a smaller --val-tokens"),
    (["generate", "{w}/ckpt", "hi", "--temperature", "-1"], "--temperature is -1.0; expected 0 (greedy) or a positive number"),
    (["generate", "{w}/ckpt", "caf\udce9"], "the prompt is not UTF-8 text (byte 0xe9 at character 3)"),
    (["generate", "{w}/missing", "hi"], "missing does not exist; pass a checkpoint directory or a training run directory"),
    (["generate", "{w}/hs.jsonl", "hi"], "hs.jsonl is neither a checkpoint directory (no config.json) nor a training run directory"),
    (["generate", "{w}/run", "hi"], "run is a training run with no checkpoint yet: the first is written at the run's first checkpoint.interval step"),
    (["generate", "{w}/ckpt", "hi", "--tokenizer", "{w}/hs.jsonl"], "hs.jsonl is not a SentencePiece model"),
    (["eval", "loss", "{w}/ckpt", "--data", "{w}/missing"], "missing has no manifest.json; make it with `minillama prepare`"),
    (["eval", "loss", "{w}/ckpt", "--data", "{w}/plots"], "plots has no manifest.json"),
    (["eval", "loss", "{w}/ckpt", "--data", "{w}/data", "--seq-len", "-5"], "the sequence length is -5; expected a positive integer"),
    (["eval", "loss", "{w}/missing", "--data", "{w}/data"], "missing does not exist"),
    (["eval", "loss", "{w}/ckpt"], "ckpt is not inside a training run, so it has no data of its own: pass --data DIR"),
    (["eval", "hellaswag", "{w}/ckpt", "--data", "{w}/missing.jsonl"], "missing.jsonl: no such HellaSwag file"),
    (["eval", "hellaswag", "{w}/ckpt", "--data", "{w}/plots"], "plots: no such HellaSwag file"),
    (["eval", "hellaswag", "{w}/ckpt", "--data", "{w}/empty.txt"], "empty.txt holds no HellaSwag examples"),
    (["eval", "hellaswag", "{w}/ckpt", "--data", "{w}/run/metrics.jsonl"], "metrics.jsonl:1: not a HellaSwag record with ctx, endings and label"),
    (["eval", "hellaswag", "{w}/ckpt", "--data", "{w}/hs.jsonl", "--limit", "-2"], "the example limit is -2; expected a positive integer"),
    (["plot", "{w}/missing", "-o", "{w}/plots/c.png"], "missing has no metrics.jsonl; is it a training run directory?"),
    (["plot", "{w}/run", "-o", "{w}/plots/c.txt"], "not .txt; name the file .png, .svg or .pdf"),
    (["plot", "{w}/run", "--smoothing", "-0.5", "-o", "{w}/plots/c.png"], "smoothing is -0.5; expected a number in [0, 1)"),
    (["plot", "{w}/run", "-o", "{w}/hs.jsonl/c.png"], "a file is where a folder is needed"),
    (["report", "{w}/missing"], "missing has no metrics.jsonl; is it a training run directory?"),
    (["report", "{w}/ckpt"], "ckpt has no metrics.jsonl"),
    (["inspect", "nonpreset"], "unknown model preset 'nonpreset'; choose one of: mini-llama-109M, tiny"),
    (["inspect", "{w}/hs.jsonl"], "hs.jsonl is neither a checkpoint directory (no config.json) nor a training run directory"),
    (["export", "hf", "{w}/ckpt", "{w}/notes"], "notes already exists; choose a new path for the Hugging Face export, or pass --force"),
    (["export", "hf", "{w}/ckpt", "{w}/notes", "--force"], "notes exists and is not a Hugging Face export (--force replaces only an earlier"),
    (["export", "hf", "{w}/ckpt", "{w}/ckpt"], "ckpt is or holds the source {w}/ckpt; write the Hugging Face export somewhere else"),
    (["export", "hf", "{w}/ckpt", "{w}/ckpt/hf"], "is or holds the source {w}/ckpt"),
    (["export", "hf", "{w}/ckpt", "{w}/hs.jsonl"], "hs.jsonl is a file; give a new directory path for the Hugging Face export"),
    (["export", "hf", "{w}/missing", "{w}/out"], "missing does not exist"),
    (["export", "llama2c", "{w}/ckpt", "{w}/plots"], "plots is a directory; give a new file path for the llama2.c model file"),
    (["export", "llama2c", "{w}/ckpt", "{w}/hs.jsonl"], "hs.jsonl already exists; choose a new path for the llama2.c model file"),
    (["export", "llama2c", "{w}/ckpt", "{w}/hs.jsonl", "--force"], "hs.jsonl exists and is not a llama2.c model file"),
    (["export", "llama2c-tokenizer", "{w}/hs.jsonl", "{w}/tok.bin"], "hs.jsonl is not a SentencePiece model"),
    (["export", "llama2c-tokenizer", "{w}/ckpt/tokenizer.model", "{w}/hs.jsonl"], "hs.jsonl already exists; choose a new path for the run.c tokenizer file"),
    (["import", "hf", "{w}/missing", "{w}/out"], "missing/config.json cannot be read"),
    (["import", "hf", "{w}/ckpt", "{w}/out"], "ckpt is a Mini Llama checkpoint already"),
    (["import", "hf", "{w}/hf_no_index", "{w}/out"], "model.safetensors.index.json has no 'weight_map' from tensor names"),
    (["import", "hf", "{w}/hf_no_weights", "{w}/out"], "has no model.safetensors (or index); Mini Llama reads only safetensors"),
    (["import", "hf", "{w}/hf_bad_weights", "{w}/out"], "hf_bad_weights/model.safetensors cannot be read"),
    (["import", "hf", "{w}/hf_no_size", "{w}/hf_no_size"], "is or holds the source"),
    (["import", "hf", "{w}/hf_no_weights", "{w}/notes"], "notes already exists; choose a new path for the checkpoint"),
    (["import", "llama2c", "{w}/hs.jsonl", "{w}/out", "--tokenizer", "{w}/ckpt/tokenizer.model"], "hs.jsonl"),
    (["import", "llama2c", "{w}/empty.txt", "{w}/out", "--tokenizer", "{w}/ckpt/tokenizer.model"], "empty.txt"),
    (["tokenizer", "train", "{w}/missing.txt", "--vocab-size", "300", "--out", "{w}/t.model"], "missing.txt: no such file"),
    (["tokenizer", "train", "{w}/empty.txt", "--vocab-size", "300", "--out", "{w}/t.model"], "empty.txt holds no text to train on"),
    (["tokenizer", "train", "{w}/hs.jsonl", "--vocab-size", "300", "--out", "{w}/t.model"], "hs.jsonl:1: not a JSON object with a 'text' field"),
    (["tokenizer", "train", "{w}/notes/todo.txt", "--vocab-size", "300", "--out", "{w}/plots"], "plots is a directory; give a new file path for the tokenizer model"),
    (["tokenizer", "train", "{w}/notes/todo.txt", "--vocab-size", "300", "--out", "{w}/hs.jsonl"], "hs.jsonl already exists; choose a new path for the tokenizer model"),
    (["tokenizer", "train", "{w}/notes/todo.txt", "--vocab-size", "300", "--out", "{w}/hs.jsonl", "--force"], "hs.jsonl exists and is not a tokenizer model"),
    (["tokenizer", "train", "{w}/notes/todo.txt", "--vocab-size", "300", "--out", "{w}/notes/todo.txt"], "is or holds the source"),
    (["prepare", "text", "{w}/missing.txt", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model"], "missing.txt: no such file"),
    (["prepare", "text", "{w}/empty.txt", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model"], "the input has no text to tokenize"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/o", "--tokenizer", "{w}/missing.model"], "tokenizer file {w}/missing.model does not exist; pass --tokenizer PATH"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/o", "--tokenizer", "{w}/hs.jsonl"], "hs.jsonl is not a SentencePiece model"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/data", "--tokenizer", "{w}/ckpt/tokenizer.model"], "holds shards made with different settings"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model", "--text-field", "nope"], "hs.jsonl:1: no string field 'nope' (name another with --text-field)"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model", "--workers", "0"], "--workers is 0; expected a positive integer"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model", "--shard-tokens", "0"], "--shard-tokens is 0; expected a positive integer"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model", "--val-tokens", "-1"], "--val-tokens is -1; expected a positive integer"),
    (["prepare", "text", "{w}/latin1.jsonl", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model"], "latin1.jsonl:1: byte 10 is not valid UTF-8"),
    (["prepare", "check", "{w}/missing"], "missing has no manifest.json; is it a folder made by `minillama prepare`?"),
    (["train", "--config", "{w}/missing.toml"], "config file {w}/missing.toml does not exist; see configs/ for examples"),
    (["train", "--config", "{w}/bad.toml"], "bad.toml is not valid TOML (Invalid value (at line 1, column 5))"),
    (["train", "--set", "nokey"], "--set 'nokey': expected key=value, for example --set optim.lr=3e-4"),
    (["train", "--set", "optim.lr=abc"], "field 'lr' is 'abc'; expected a number"),
    (["train", "--set", "optim.lr=-0.1"], "run config field 'optim.lr' is -0.1; expected a number > 0"),
    (["train", "--set", "batch_size=0"], "--set batch_size=0: the run config has no field 'batch_size'"),
    (["train", "--set", "eval.val_tokens=10"], "run config field 'eval.val_tokens' is 10; expected at least one sequence of batch.seq_len=1024"),
    (["train", "--set", "model.dim=100", "--set", "model.n_heads=3"], "model config field 'dim' is 100; expected a multiple of n_heads=3"),
    (["train", "--set", "model.n_kv_heads=5"], "model config field 'n_kv_heads' is 5; expected a divisor of n_heads=12"),
    (["train", "--set", "dtype=float8"], "run config field 'dtype' is \"float8\"; expected one of \"auto\""),
    (["train", "--set", "device=tpu"], "device 'tpu' is not a torch device; use auto, cpu, cuda, cuda:N or mps"),
    (["train", "--set", "optim.warmup_steps=-1"], "run config field 'optim.warmup_steps' is -1; expected an integer >= 0"),
    (["train", "--set", "optim.warmup_steps=20000"], "run config field 'optim.warmup_steps' is 20000; expected 0 <= it < optim.max_steps"),
    (["train", "--set", "optim.muon_momentum_warmup_steps=15000", "--set", "optim.muon_momentum_cooldown_steps=5000"],
     "run config fields 'optim.muon_momentum_warmup_steps' + 'optim.muon_momentum_cooldown_steps' are 20000; expected at most optim.max_steps=19073"),
    (["train", "--set", "optim.muon_orthogonalization=svd"], "run config field 'optim.muon_orthogonalization' is \"svd\"; expected one of \"newton_schulz\", \"polar_express\""),
    (["train", "--set", "batch.stages=[[100, 262144], [50, 393216]]"],
     "run config field 'batch.stages' is [[100, 262144], [50, 393216]]; expected [[until_step, tokens], ...] with until_step and tokens rising"),
    (["train", "--set", "batch.stages=[[3, 1024]]", "--dry-run"],
     "batch.stages 1,024 is not a multiple of micro_batch 64 x seq_len 1024 x 1 ranks = 65,536; use micro_batch 1, or batch.stages 65,536"),
    (["train", "--set", "batch.stages=[[100, 1000]]"], "tokens multiples of batch.seq_len=1024 and below batch.total_tokens=524288, e.g. [[200, 131072]]"),
    (["train", "--set", "optim.weight_decay=-1"], "run config field 'optim.weight_decay' is -1.0; expected a number >= 0"),
    (["train", "--set", "checkpoint.interval=0"], "run config field 'checkpoint.interval' is 0; expected a positive integer"),
    (["train", "--set", "batch.seq_len=2048"], "run config field 'batch.seq_len' is 2048; expected at most model.max_seq_len=1024"),
    (["train", "--set", "data.dir={w}/hs.jsonl", "--set", "data.tokenizer={w}/ckpt/tokenizer.model", "--set", "model.vocab_size=320",
      "--set", "run_dir={w}/r", "--set", "device=cpu"], "hs.jsonl"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/hs.jsonl/out", "--text-field", "ctx", "--tokenizer", "{w}/ckpt/tokenizer.model"], "a part of the path is a file, not a directory"),
    (["train", "--set", "run_dir={w}/hs.jsonl", "--set", "data.dir={w}/data", "--set", "model.vocab_size=320",
      "--set", "data.tokenizer={w}/ckpt/tokenizer.model", "--set", "device=cpu", "--set", "eval.hellaswag=false",
      "--set", "batch.total_tokens=65536"],
     "run_dir {w}/hs.jsonl is a file; choose a folder for the run"),
    # Reliability III: outputs that never take a user's file
    (["report", "{w}/run", "-o", "{w}/run/metrics.jsonl"], "run/metrics.jsonl exists and is not a report Mini Llama wrote"),
    (["report", "{w}/run", "-o", "{w}/run/config.toml"], "run/config.toml exists and is not a report Mini Llama wrote"),
    (["report", "{w}/run", "-o", "{w}/notes/todo.txt"], "notes/todo.txt exists and is not a report Mini Llama wrote"),
    (["report", "{w}/run", "-o", "{w}/nowhere/r.md"], "{w}/nowhere does not exist; create it first (mkdir -p {w}/nowhere)"),
    (["plot", "{w}/run", "-o", "{w}/notes/photo.png"], "notes/photo.png exists and is not a plot Mini Llama wrote"),
    (["plot", "{w}/run", "-o", "{w}/nowhere/x.png"], "{w}/nowhere does not exist"),
    (["export", "gguf", "{w}/ckpt", "{w}/nowhere/m.gguf"], "{w}/nowhere does not exist"),
    (["export", "hf", "{w}/ckpt", "{w}/nowhere/deeper/hf"], "{w}/nowhere/deeper does not exist"),
    (["eval", "harness", "{w}/ckpt", "--tasks", "hellaswag", "--output", "{w}/notes/results.json"],
     "notes/results.json exists and is not a harness results file Mini Llama wrote"),
    (["eval", "harness", "{w}/ckpt", "--tasks", "hellaswag", "--output", "{w}/plots"], "plots is a directory; give a file name"),
    (["eval", "harness", "{w}/ckpt", "--tasks", "hellaswag", "--num-fewshot", "-1"], "--num-fewshot is -1; expected 0 or more"),
    (["eval", "harness", "{w}/ckpt", "--tasks", "hellaswag", "--include-path", "{w}/nope"], "--include-path {w}/nope does not exist"),
    (["tokenizer", "train", "{w}/notes/todo.txt", "--vocab-size", "300", "--out", "{w}/ckpt/tokenizer.model", "--force"],
     "ckpt/tokenizer.model belongs to the checkpoint {w}/ckpt, which needs it as it is"),
    (["tokenizer", "train", "{w}/notes/todo.txt", "--vocab-size", "0", "--out", "{w}/t.model"], "--vocab-size is 0; expected at least 260"),
    (["tokenizer", "train", "{w}/loop_a", "--vocab-size", "300", "--out", "{w}/t.model"], "loop_a cannot be resolved"),
    (["train", "--set", "run_dir={w}/data", "--set", "data.dir={w}/data", "--set", "data.tokenizer={w}/ckpt/tokenizer.model", "--set", "model.vocab_size=320"],
     "run_dir {w}/data is a prepared data folder (it holds manifest.json)"),
    (["train", "--set", "run_dir={w}/ckpt", "--set", "data.dir={w}/data", "--set", "data.tokenizer={w}/ckpt/tokenizer.model", "--set", "model.vocab_size=320"],
     "run_dir {w}/ckpt is a checkpoint directory"),
    # one line for every mistake
    (["generate", "{w}/latin1_ckpt", "hi"], "latin1_ckpt/config.json is not UTF-8 text (byte 0xe9"),
    (["inspect", "{w}/latin1_ckpt"], "latin1_ckpt/config.json is not UTF-8 text"),
    (["export", "gguf", "{w}/latin1_ckpt", "{w}/m.gguf"], "latin1_ckpt/config.json is not UTF-8 text"),
    (["generate", "{w}/fifo_ckpt", "hi"], "fifo_ckpt/model.safetensors is a FIFO, socket or device, not a regular file"),
    (["generate", "{w}/no_tok_ckpt", "hi"], "no_tok_ckpt has no tokenizer.model, and its model was trained with another tokenizer than Llama 2's (vocabulary 320); pass --tokenizer PATH"),
    (["prepare", "fineweb-edu", "--from", "{w}/fw_corrupt", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model"],
     "a parquet file is damaged or not parquet: download it again"),
    (["prepare", "fineweb-edu", "--from", "{w}/fw_content", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model"],
     "has no 'text' column (['content'])"),
    (["prepare", "fineweb-edu", "--from", "{w}/fw_ints", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model"],
     "column 'text' holds int values, not text"),
    (["prepare", "fineweb-edu", "--from", "{w}/fw_card", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model"],
     "fw_card/README.md is not FineWeb-Edu's dataset card"),
    (["prepare", "text", "{w}/hs.jsonl", "--out", "{w}/o", "--tokenizer", "{w}/ckpt/tokenizer.model", "--workers", "100000"],
     "--workers is 100000; expected at most"),
    (["prepare", "check", "{w}/escaping_manifest"], "shard entry 0's file '../four.bin' is not a plain file name in the data folder"),
    (["prepare", "check", "{w}/data", "--vocab-size", "0"], "--vocab-size is 0; expected the model's vocabulary size"),
    (["eval", "loss", "{w}/ckpt", "--data", "{w}/data", "--seq-len", "0"], "the sequence length is 0; expected a positive integer"),
    (["train", "--set", "optim.min_lr=0.01", "--set", "optim.lr=0.001"], "'optim.min_lr' is 0.01; expected at most optim.lr=0.001"),
    (["train", "--tokens-per-s", "1000"], "--tokens-per-s goes with --dry-run"),
    (["serve", "{w}/ckpt", "--port", "http"], "serve: argument --port: invalid int value: 'http'; see minillama serve --help"),
    (["train", "--dry-run", "--tokens-per-s", "fast"], "train: argument --tokens-per-s: invalid float value: 'fast'"),
    (["serve", "{w}/ckpt", "--allowed-hosts", ""], "--allowed-hosts '' names no host; name at least one"),
    (["serve", "{w}/ckpt", "--allowed-hosts", " , "], "--allowed-hosts ' , ' names no host"),
    # a dry run refuses what the run refuses
    (["train", "--dry-run", "--set", "data.dir={w}/data", "--set", "data.tokenizer={w}/ckpt/tokenizer.model", "--set", "model.vocab_size=100"],
     "tokenizer {w}/ckpt/tokenizer.model has vocab 320, model.vocab_size has 100"),
    (["train", "--dry-run", "--set", "run_dir={w}/hs.jsonl"], "run_dir {w}/hs.jsonl is a file; choose a folder for the run"),
    (["train", "--dry-run", "--set", "data.dir={w}/ckpt"], "data.dir {w}/ckpt is a checkpoint directory, not prepared data"),
    (["train", "--dry-run", "--set", "data.tokenizer={w}/fake.gguf"], "fake.gguf is not a SentencePiece model"),
    (["train", "--dry-run", "--set", "data.tokenizer={w}/missing.model"], "data.tokenizer {w}/missing.model does not exist and data.train_tokenizer is off"),
    (["train", "--dry-run", "--set", "batch.micro_batch=1000000000000"], "is not a multiple of micro_batch 1000000000000"),
    # found by a sweep of cases nobody listed: a FIFO where a file is read or replaced would block the command
    (["export", "gguf", "{w}/ckpt", "{w}/fifo_ckpt/model.safetensors", "--force"], "model.safetensors is a FIFO, socket or device; give a new path"),
    (["import", "llama2c", "{w}/fifo_ckpt/model.safetensors", "{w}/out", "--tokenizer", "{w}/ckpt/tokenizer.model"],
     "model.safetensors is a FIFO, socket or device, not a regular file; a llama2.c model must be a file"),
    (["generate", "{w}/ckpt", "hi", "--tokenizer", "{w}/fifo_ckpt/model.safetensors"], "is a FIFO, socket or device, not a regular file; a tokenizer"),
]


def exit_code(argv):
    """main's exit code, also where argparse itself refuses a flag (it exits through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_a_mistake_is_one_line_and_changes_nothing(workspace, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    before = tree(workspace)
    assert exit_code([a.format(w=workspace) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    if "holds token id" in message:  # found while scoring: the command had proceeded and named its checkpoint
        assert lines[0].startswith("using ") and lines.pop(0)
    assert len(lines) == 1 and lines[0].startswith("minillama: error: "), captured.err
    assert message.format(w=workspace) in lines[0], captured.err
    assert tree(workspace) == before


def test_garbage_lines_in_metrics_are_skipped_not_fatal(tmp_path):
    from minillama.metrics import read_metrics, truncate_metrics

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


def test_offline_fineweb_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys, tokenizer):
    import logging

    datasets = pytest.importorskip("datasets", reason="FineWeb-Edu streaming needs the 'datasets' extra")

    def offline(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("'[Errno -2] Name or service not known' thrown; Retrying in 1s")
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert main(["prepare", "fineweb-edu", "--out", str(tmp_path / "fw"), "--tokenizer", str(tokenizer.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minillama: error: cannot read sample-10BT from HuggingFaceFW/fineweb-edu on "
                                                    "the Hugging Face hub (ConnectionError"), err
    assert "download the files with `hf download` and pass their folder as --from" in err and list(tmp_path.iterdir()) == []


def test_interactive_generate_refuses_a_bad_line_and_answers_the_next(workspace, monkeypatch, capsys):
    import io

    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n" + b"x" * 400 + b"\nThe cat\n"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["generate", str(workspace / "ckpt"), "--interactive", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("minillama:")]
    assert errors[0] == "minillama: the prompt is not UTF-8 text (byte 0xe9 at character 3); pass it in UTF-8 (check the terminal's locale); type another prompt"
    assert "too many for the model's max_seq_len of 128" in errors[1] and len(errors) == 2
    assert captured.out.startswith("Sample 0: The cat") and captured.out.count("Sample 0:") == 1  # 4 samples of one prompt


@pytest.mark.parametrize("argv, missing, message", [
    (["eval", "harness", "{w}/ckpt", "--tasks", "hellaswag"], ["lm_eval"], "eval harness needs EleutherAI's lm-evaluation-harness: pip install 'minillama[harness]'"),
    (["serve", "{w}/ckpt"], ["fastapi"], "serve needs FastAPI and uvicorn: pip install 'minillama[serve]'"),
    (["export", "gguf", "{w}/ckpt", "{w}/m.gguf"], ["gguf"], "exporting GGUF needs the 'gguf' package: pip install 'minillama[gguf]'"),
], ids=["harness", "serve", "gguf"])
def test_a_missing_optional_package_is_one_line_naming_the_extra(workspace, argv, missing, message, capsys, monkeypatch):
    import sys

    for name in [n for n in list(sys.modules) if n.split(".")[0] in missing] + missing:  # as without that extra
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("minillama.serve.app", "minillama.eval.harness"):  # imported afresh, as a new process would
        monkeypatch.delitem(sys.modules, name, raising=False)
    before = tree(workspace)
    assert main([a.format(w=workspace) for a in argv]) == 2
    *used, error = capsys.readouterr().err.splitlines()  # an export names its checkpoint first
    assert error == f"minillama: error: {message}" and all(line.startswith("using ") for line in used)
    assert tree(workspace) == before


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export hf", "export gguf", "export llama2c", "prepare"])
def test_a_file_size_limit_or_full_disk_mid_write_is_one_line_and_leaves_nothing(workspace, tmp_path, command):
    """Under `ulimit -f` (EFBIG; a full disk takes the same paths as ENOSPC) each writer stops with one line, and
    neither a partial output nor a temporary file stays; libraries that report it their own way (safetensors'
    'os error N', numpy's short write under gguf) are understood too."""
    import resource
    import signal
    import subprocess
    import sys

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "out"
    argv = {"export hf": ["export", "hf", str(workspace / "ckpt"), str(out)],
            "export gguf": ["export", "gguf", str(workspace / "ckpt"), str(out), "--dtype", "f32"],
            "export llama2c": ["export", "llama2c", str(workspace / "ckpt"), str(out)],
            "prepare": ["prepare", "text", str(workspace / "notes" / "big.txt"), "--out", str(out), "--tokenizer",
                        str(workspace / "ckpt" / "tokenizer.model"), "--shard-tokens", "20000"]}[command]
    (workspace / "notes" / "big.txt").write_text("the cat sees the moon again and again.\n" * 3000)
    result = subprocess.run([sys.executable, "-m", "minillama", *argv], capture_output=True, text=True, preexec_fn=limited)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("minillama: error: ") and "File too large" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_records_without_the_fields_a_curve_needs_are_passed_over(workspace, tmp_path, capsys):
    """plot and report read what a run wrote; a record without its numbers (hand-written, another tool) is skipped."""
    assert main(["plot", str(workspace / "partial_run"), "-o", str(tmp_path / "c.png")]) == 0
    assert main(["report", str(workspace / "partial_run"), "-o", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "c.png").is_file() and "Run report" in (tmp_path / "r.md").read_text()


def test_two_exports_to_the_same_path_at_once_are_refused_not_raced(workspace, tmp_path, capsys):
    """While one export writes OUT (its lock held, as by a running command), a second to the same OUT is refused in
    one line, and nothing is written; once the first ends, the path is free again."""
    from minillama.files import output_lock

    out = tmp_path / "m.gguf"
    with output_lock(out, "minillama export command"):
        assert main(["export", "gguf", str(workspace / "ckpt"), str(out)]) == 2
        assert capsys.readouterr().err == (f"minillama: error: {out} is being written by another minillama export command "
                                           f"(process {os.getpid()}); wait for it to end, or choose another path\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".m.gguf.lock"]
    assert main(["export", "gguf", str(workspace / "ckpt"), str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
