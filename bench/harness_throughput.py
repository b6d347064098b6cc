"""lm-evaluation-harness requests per second: Mini Llama's adapter vs the harness's own HF model on the same weights.

usage: python bench/harness_throughput.py [--examples 200] [--batch-size 16] [--repeats 2] [--preset NAME]
The harness's hellaswag task over a local file: the 10 real validation examples ($MINILLAMA_TEST_DATA) repeated,
each repeat with a few words cut from the front of its context so that lengths vary as in the real set; 4
requests per example. Random weights (speed does not depend on them) of a model with the Llama 2 vocabulary
(default: dim 256, 4 layers), saved once and exported with `minillama export hf`. The two sides run alternately,
--repeats times each; model loading is not timed. Needs the 'harness' extra and accelerate.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minillama.checkpoint import save_checkpoint
from minillama.config import ModelConfig, preset
from minillama.interop.hf import export_hf
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer

SMALL = ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=64, max_seq_len=256)


def main() -> None:
    shared = Path(os.environ.get("MINILLAMA_TEST_DATA", "../shared/data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--preset", help="a model preset instead of the small default (e.g. mini-llama-109M)")
    args = parser.parse_args()
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from minillama.eval.harness import MiniLlamaLM

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        real = [json.loads(line) for line in (shared / "hellaswag_val_head10.jsonl").read_text().splitlines()]
        with open(folder / "hs.jsonl", "w") as f:
            for i in range(args.examples):
                record = dict(real[i % len(real)])
                words = record["ctx_a"].split()
                record["ctx_a"] = " ".join(words[min(i // len(real) % 8, len(words) - 3):])
                f.write(json.dumps(record) + "\n")
        hellaswag_yaml = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
        (folder / "tasks").mkdir()
        (folder / "tasks" / "hs_bench.yaml").write_text(
            f"include: {hellaswag_yaml}\ntask: hs_bench\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {folder / 'hs.jsonl'}\ntraining_split: null\n")
        torch.manual_seed(0)
        config = preset(args.preset) if args.preset else SMALL
        save_checkpoint(folder / "ckpt", Transformer(config), Tokenizer(shared / "llama2_tokenizer.model"))
        export_hf(folder / "ckpt", folder / "hf")
        manager = TaskManager(include_path=str(folder / "tasks"))
        models = {"minillama": MiniLlamaLM(str(folder / "ckpt"), device="cpu", dtype="float32", batch_size=args.batch_size),
                  "harness hf": HFLM(pretrained=str(folder / "hf"), dtype="float32", device="cpu", batch_size=args.batch_size)}
        seconds = {name: [] for name in models}
        accuracy = {}
        for i in range(args.repeats):
            for name in (list(models) if i % 2 == 0 else list(models)[::-1]):
                start = time.perf_counter()
                results = simple_evaluate(model=models[name], tasks=["hs_bench"], task_manager=manager)
                seconds[name].append(time.perf_counter() - start)
                accuracy[name] = results["results"]["hs_bench"]["acc_norm,none"]
        requests = 4 * args.examples
        for name, times in seconds.items():
            print(json.dumps({"bench": "harness", "model": name, "requests": requests, "batch_size": args.batch_size,
                              "seconds_median": round(statistics.median(times), 2),
                              "requests_per_s": round(requests / statistics.median(times), 1), "acc_norm": accuracy[name],
                              "weights": args.preset or f"dim {config.dim}, {config.n_layers} layers, vocab {config.vocab_size}"}))


if __name__ == "__main__":
    main()
