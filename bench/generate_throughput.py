"""New tokens per second of greedy generation: KV cache vs re-running the sequence, and transformers' generate.

usage: python bench/generate_throughput.py [--preset mini-llama-109M] [--batch 1 4] [--new-tokens 256]
       [--prompt-tokens 8] [--device auto] [--dtype auto] [--skip-uncached] [--skip-transformers]
Random weights (speed does not depend on them); the same weights go to transformers' LlamaForCausalLM.
Prints one JSON line per measurement. On CUDA the cached path replays a CUDA graph per decode step
("cached+graph") and is also timed without it ("cached").
"""

import argparse
import json
import time

import torch

from minillama.checkpoint import model_state_dict
from minillama.config import preset
from minillama.generate import generate_tokens
from minillama.interop.hf import hf_config, to_hf_state_dict
from minillama.model import Transformer
from minillama.train.device import pick_device


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini-llama-109M")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--skip-uncached", action="store_true")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    device = pick_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    config = preset(args.preset)
    model = Transformer(config).to(device=device, dtype=dtype).eval()
    print(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                      "threads": torch.get_num_threads(), "preset": args.preset, "dtype": str(dtype), "torch": torch.__version__}))

    hf_model = None
    if not args.skip_transformers:
        import transformers

        fields = {k: v for k, v in hf_config(config).items() if k not in ("architectures", "model_type", "torch_dtype")}
        hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).to(device=device, dtype=dtype).eval()
        hf_model.load_state_dict(to_hf_state_dict(config, model_state_dict(model)), strict=False)
        if config.tie_embeddings:
            hf_model.tie_weights()

    for batch in args.batch:
        prompts = torch.randint(3, config.vocab_size, (batch, args.prompt_tokens)).tolist()
        variants = {"cached": dict(cuda_graph=False)}
        if device.type == "cuda":
            variants["cached+graph"] = dict(cuda_graph=True)
        if not args.skip_uncached:
            variants["uncached"] = dict(use_cache=False)
        results = {}
        for name, options in variants.items():
            generate_tokens(model, prompts, 4, temperature=0, **options)  # warm up
            outputs = []
            seconds = timed(lambda: outputs.append(generate_tokens(model, prompts, args.new_tokens, temperature=0, **options)), device)
            results[name] = outputs[0]
            print(json.dumps({"impl": f"minillama {name}", "batch": batch, "new_tokens": args.new_tokens,
                              "seconds": round(seconds, 3), "new_tokens_per_s": round(batch * args.new_tokens / seconds, 1)}))
        if hf_model is not None:
            ids = torch.tensor(prompts, device=device)
            kwargs = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
            with torch.no_grad():
                hf_model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
                outputs = []
                seconds = timed(lambda: outputs.append(hf_model.generate(ids, **kwargs)), device)
            same = outputs[0][:, args.prompt_tokens:].tolist() == results["cached"]
            print(json.dumps({"impl": "transformers generate (cached)", "batch": batch, "new_tokens": args.new_tokens,
                              "seconds": round(seconds, 3), "new_tokens_per_s": round(batch * args.new_tokens / seconds, 1),
                              "same_tokens_as_minillama": same}))
        if "cached+graph" in results:
            print(json.dumps({"batch": batch, "cuda_graph_tokens_equal_plain": results["cached+graph"] == results["cached"]}))


if __name__ == "__main__":
    main()
