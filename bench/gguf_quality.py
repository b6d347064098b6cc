"""What each GGUF dtype costs: llama.cpp's next-token choices and perplexity against Mini Llama's float32 forward.

usage: python bench/gguf_quality.py [--checkpoint CKPT_OR_RUN_DIR] [--text FILE] [--tokens 512]
Without --checkpoint: llama2.c's stories260K (imported with tok512) from $MINILLAMA_TEST_DATA. The text defaults
to the last part of tiny shakespeare. Prints one JSON line per dtype: top-1 agreement with Mini Llama over every
position, and both perplexities. Needs llama-cpp-python and gguf (the 'dev' extra).
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minillama.checkpoint import load_checkpoint, load_checkpoint_tokenizer
from minillama.layout import find_checkpoint
from minillama.interop.llama2c import import_llama2c
from minillama.interop.llamacpp import DTYPES, export_gguf


def main() -> None:
    shared = Path(os.environ.get("MINILLAMA_TEST_DATA", "../shared/data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--text", default=shared / "tinyshakespeare.txt")
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    import llama_cpp

    with tempfile.TemporaryDirectory() as folder:
        if args.checkpoint:
            checkpoint = find_checkpoint(Path(args.checkpoint))
        else:
            checkpoint = Path(folder) / "stories260K"
            import_llama2c(shared / "stories260K.bin", checkpoint, shared / "tok512.model")
        model, info = load_checkpoint(checkpoint)
        length = min(args.tokens, info.config.max_seq_len)
        ids = load_checkpoint_tokenizer(info).encode(Path(args.text).read_text()[-20 * length:])[:length]
        targets = torch.tensor(ids[1:])
        with torch.no_grad():
            ours = model.eval()(torch.tensor([ids]))[0][0, :-1]
        for dtype in DTYPES:
            path, fell_back = export_gguf(checkpoint, Path(folder) / f"{dtype}.gguf", dtype)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=length, n_batch=length, logits_all=True, verbose=False,
                                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
            llm.eval(ids)
            theirs = torch.tensor(np.array(llm.scores[: len(ids) - 1]))
            print(json.dumps({
                "bench": "gguf quality", "checkpoint": str(args.checkpoint or "stories260K"), "dtype": dtype,
                "tokens": len(ids), "file_mb": round(path.stat().st_size / 1e6, 3),
                "top1_agreement": round((theirs.argmax(-1) == ours.argmax(-1)).float().mean().item(), 4),
                "perplexity_minillama_f32": round(F.cross_entropy(ours, targets).exp().item(), 4),
                "perplexity_llama_cpp": round(F.cross_entropy(theirs, targets).exp().item(), 4),
                "largest_logit_difference": round((theirs - ours).abs().max().item(), 5),
                "stored_as_f16_instead": fell_back,
            }))


if __name__ == "__main__":
    main()
