"""New tokens per second of greedy generation: KV cache (eager, and on CUDA replayed from a CUDA graph) vs
re-running the sequence, and transformers' generate on the same weights.

usage: python bench/generate_throughput.py [--preset mini-llama-109M] [--checkpoint PATH] [--batch 1 4]
       [--new-tokens 200] [--device auto] [--dtype auto] [--skip-uncached] [--transformers-batch 1 4]
Random weights unless --checkpoint (speed does not depend on them). Each batch holds prompts of different
lengths. Prints one JSON line per measurement and one per agreement check: on CUDA, the graph's
greedy tokens must equal eager decoding's, for the timed prompts and for a second batch of other lengths that
reuses the captured graph. "first_call_s" includes capturing the graph; later calls of that batch size reuse it.
"""

import argparse
import json
import time
from functools import partial

import torch

from minillama.checkpoint import load_checkpoint, model_state_dict
from minillama.layout import find_checkpoint
from minillama.config import preset
from minillama.generate import generate_tokens
from minillama.interop.hf import hf_config, to_hf_state_dict
from minillama.inference.cache import right_padded
from minillama.model import Transformer
from minillama.device import inference_dtype, pick_device

PROMPT_LENGTHS = [8, 3, 13, 6, 10, 1, 7, 12]  # row i of a batch gets PROMPT_LENGTHS[i % 8] tokens
OTHER_LENGTHS = [5, 11, 2, 9, 4, 13, 8, 6]


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def random_prompts(batch: int, lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab_size, (lengths[i % len(lengths)] - 1,), generator=generator).tolist()
            for i in range(batch)]


def first_difference(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per row: the index of the first differing token, or None where the rows are equal."""
    return [None if x == y else next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))) for x, y in zip(a, b)]


@torch.no_grad()
def generate_uncached(model: Transformer, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy decoding that re-runs the whole right-padded sequences for every new token: what a KV cache saves."""
    device = model.tok_embeddings.weight.device
    rows = [list(p) for p in prompts]
    for _ in range(new_tokens):
        width = max(len(row) for row in rows)
        logits = model(right_padded(rows, width).to(device))[0]
        last = logits[torch.arange(len(rows), device=device), torch.tensor([len(row) - 1 for row in rows], device=device)]
        for row, token in zip(rows, last.argmax(dim=-1).tolist()):
            row.append(token)
    return [row[len(p):] for row, p in zip(rows, prompts)]


def transformers_model(model: Transformer, device: torch.device, dtype: torch.dtype):
    import transformers

    config = model.config
    fields = {k: v for k, v in hf_config(config).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).to(device=device, dtype=dtype).eval()
    hf_model.load_state_dict(to_hf_state_dict(config, model_state_dict(model)), strict=False)
    if config.tie_embeddings:
        hf_model.tie_weights()
    return hf_model


def transformers_generate(hf_model, prompts: list[list[int]], new_tokens: int, device: torch.device) -> list[list[int]]:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=0)
    return out[:, longest:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini-llama-109M")
    parser.add_argument("--checkpoint", help="a checkpoint or run directory instead of random weights")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--skip-uncached", action="store_true")
    parser.add_argument("--transformers-batch", type=int, nargs="*", help="batch sizes to time transformers at too "
                        "(default: every --batch; none: leave it out)")
    args = parser.parse_args()

    device = pick_device(args.device)
    dtype = inference_dtype(device, args.dtype)
    torch.manual_seed(0)
    if args.checkpoint:
        model = load_checkpoint(find_checkpoint(args.checkpoint), device)[0]
    else:
        model = Transformer(preset(args.preset)).to(device)
    model = model.to(dtype).eval()
    vocab = model.config.vocab_size
    print(json.dumps({"bench": "generate", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                      "threads": torch.get_num_threads(), "weights": args.checkpoint or f"random {args.preset}",
                      "dtype": str(dtype), "torch": torch.__version__, "prompt_lengths": PROMPT_LENGTHS}))
    hf_batches = args.batch if args.transformers_batch is None else args.transformers_batch
    hf_model = transformers_model(model, device, dtype) if hf_batches else None

    for batch in args.batch:
        prompts = random_prompts(batch, PROMPT_LENGTHS, vocab, seed=batch)
        variants = {"cached": partial(generate_tokens, temperature=0, cuda_graph=False)}
        if device.type == "cuda":
            variants["cached+graph"] = partial(generate_tokens, temperature=0, cuda_graph=True)
        if not args.skip_uncached:
            variants["uncached"] = generate_uncached
        results = {}
        for name, run in variants.items():
            first_s, _ = timed(lambda: run(model, prompts, 4), device)
            seconds, results[name] = timed(lambda: run(model, prompts, args.new_tokens), device)
            print(json.dumps({"bench": "generate", "impl": f"minillama {name}", "batch": batch, "new_tokens": args.new_tokens,
                              "first_call_s": round(first_s, 3), "seconds": round(seconds, 3),
                              "new_tokens_per_s": round(batch * args.new_tokens / seconds, 1)}))
        if batch in hf_batches:
            transformers_generate(hf_model, prompts, 4, device)
            seconds, tokens = timed(lambda: transformers_generate(hf_model, prompts, args.new_tokens, device), device)
            print(json.dumps({"bench": "generate", "impl": "transformers generate (cached)", "batch": batch,
                              "new_tokens": args.new_tokens, "seconds": round(seconds, 3),
                              "new_tokens_per_s": round(batch * args.new_tokens / seconds, 1),
                              "first_difference_from_minillama": first_difference(tokens, results["cached"])}))
        for name in ("cached+graph", "uncached"):
            if name in results:
                print(json.dumps({"check": f"{name} tokens equal cached (eager)", "batch": batch,
                                  "equal": results[name] == results["cached"],
                                  "first_difference": first_difference(results[name], results["cached"])}))
        if "cached+graph" in results:  # a second batch of other lengths replays the same captured graph
            others = random_prompts(batch, OTHER_LENGTHS, vocab, seed=100 + batch)
            graph = generate_tokens(model, others, args.new_tokens // 2, temperature=0, cuda_graph=True)
            eager = generate_tokens(model, others, args.new_tokens // 2, temperature=0, cuda_graph=False)
            print(json.dumps({"check": "reused graph tokens equal cached (eager)", "batch": batch, "equal": graph == eager,
                              "first_difference": first_difference(graph, eager)}))


if __name__ == "__main__":
    main()
