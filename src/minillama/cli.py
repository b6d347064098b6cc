"""The `minillama` command: parses arguments and calls the Python API; user errors become one line and exit 2."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from minillama.errors import ArgumentError, MiniLlamaError, TrainingStopped
from minillama.files import output_lock, require_folder_of
from minillama.inference.text import MAX_STOP_STRINGS

Handler = Callable[[argparse.Namespace], None]

# Errors of the user's files and disks, each with what to do; nothing is left half-written (writes are atomic).
OS_ERROR_FIXES = {
    errno.EACCES: "check the file's permissions, or choose another path",
    errno.EPERM: "check the file's permissions, or choose another path",
    errno.EROFS: "the file system is read-only; choose a writable path",
    errno.ENOSPC: "free some space and run the same command again (finished files, checkpoints included, are intact)",
    errno.EDQUOT: "the disk quota is used up; free some space and run the same command again",
    errno.EFBIG: "the file would pass the largest size this system (or `ulimit -f`) allows; write it elsewhere or raise the limit",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "this is a directory where a file is expected; give a file path",
    errno.EEXIST: "a file is where a folder is needed, or an earlier output is there; choose another path",
}


def cmd_inspect(args: argparse.Namespace) -> None:
    from minillama.config import PRESETS, preset
    from minillama.summary import describe, format_description

    training = None
    if args.target in PRESETS or not (Path(args.target).exists() or "/" in args.target):
        config = preset(args.target)  # arithmetic only: no torch import
    else:
        from minillama.checkpoint import read_checkpoint_info
        from minillama.layout import find_checkpoint
        from minillama.train.history import training_summary

        info = read_checkpoint_info(find_checkpoint(Path(args.target)))
        _say_which(info)
        config, training = info.config, training_summary(info)
    description = describe(config, training)
    print(json.dumps(description, indent=2) if args.json else format_description(description))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from minillama.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([Path(f) for f in args.files], args.vocab_size, Path(args.out), args.text_field, args.force)
    print(f"wrote {tokenizer.path} (vocab {tokenizer.vocab_size}, sha256 {tokenizer.fingerprint[:12]}…)")


def _prepare(args: argparse.Namespace, source) -> None:
    from minillama.data.prepare import prepare
    from minillama.tokenizer import load_tokenizer

    prepare(
        source, Path(args.out_dir), load_tokenizer(args.tokenizer), shard_tokens=args.shard_tokens, val_tokens=args.val_tokens,
        max_tokens=args.max_tokens, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet,
    )


def cmd_prepare_fineweb(args: argparse.Namespace) -> None:
    from minillama.data.sources import FineWebEdu

    _prepare(args, FineWebEdu(args.subset, args.snapshot))


def cmd_prepare_text(args: argparse.Namespace) -> None:
    from minillama.data.sources import LocalFiles

    _prepare(args, LocalFiles(args.files, args.text_field, args.split_paragraphs, args.skip_bad_records))


def cmd_prepare_check(args: argparse.Namespace) -> None:
    from minillama.data.loader import verify_shards
    from minillama.data.shards import read_manifest

    if args.vocab_size is not None and args.vocab_size < 1:
        raise MiniLlamaError(f"--vocab-size is {args.vocab_size}; expected the model's vocabulary size, a positive integer")
    manifest = read_manifest(Path(args.data_dir))
    if manifest is None:
        raise MiniLlamaError(f"{args.data_dir} has no manifest.json; is it a folder made by `minillama prepare`?")
    vocab_size = manifest["tokenizer"]["vocab_size"] if args.vocab_size is None else args.vocab_size
    manifest = verify_shards(Path(args.data_dir), vocab_size, progress=not args.quiet)
    print(f"{args.data_dir}: {len(manifest['shards'])} shards, {manifest['tokens']:,} tokens, every sha256 and token id checked")


def cmd_train(args: argparse.Namespace) -> None:
    from minillama.train.config import load_train_config

    if args.tokens_per_s is not None and not args.dry_run:
        raise MiniLlamaError("--tokens-per-s goes with --dry-run (it estimates the plan's time); training measures its speed")
    config = load_train_config(args.config, args.set)
    if args.dry_run:
        from minillama.train.plan import dry_run

        print(dry_run(config, args.tokens_per_s))
        return
    from minillama.train.loop import train

    train(config, resume=args.resume)


def _say_which(info) -> None:
    """Name the checkpoint a command uses (a run directory means its newest), on stderr so stdout stays data."""
    print(f"using {info.path}" + (f" (step {info.metadata['step']:,})" if "step" in info.metadata else ""), file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> None:
    from minillama.checkpoint import load_for_inference
    from minillama.generate import check_num_samples, generate, stream
    from minillama.inference.engine import check_length
    from minillama.inference.sampling import SamplingParams, nth_seed

    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # refused before the model loads
    check_num_samples(args.num_samples)
    if args.max_new_tokens < 1:
        raise MiniLlamaError(f"--max-new-tokens is {args.max_new_tokens}; expected at least 1")
    if not args.interactive:
        _check_prompt(args.prompt)
    stops = args.stop or []
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise MiniLlamaError(f"--stop takes up to {MAX_STOP_STRINGS} non-empty strings; got {stops!r}")
    model, tokenizer, info = load_for_inference(args.checkpoint, args.device, args.dtype, args.tokenizer)

    def run(prompt: str, seed: int | None) -> None:
        prompt_ids = tokenizer.encode(prompt, bos=True)
        check_length(model.config.max_seq_len, len(prompt_ids), args.max_new_tokens)  # before anything is printed
        options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=seed, stop_at_eos=not args.no_stop_at_eos, compile=args.compile, stop=stops)
        if args.num_samples == 1:  # stream: print the text as soon as it is final (one sample needs no label)
            print(prompt, end="", flush=True)
            for piece in stream(model, tokenizer, prompt, **options):
                print(piece, end="", flush=True)
            print()
        else:
            for i, completion in enumerate(generate(model, tokenizer, prompt, args.num_samples, **options)):
                print(f"Sample {i}: {prompt}{completion}")

    if not args.interactive:
        prompt = args.prompt or ""
        check_length(model.config.max_seq_len, len(tokenizer.encode(prompt, bos=True)), args.max_new_tokens)
        _say_which(info)  # once the command proceeds: a refusal stays one line
        run(prompt, args.seed)
        return
    _say_which(info)
    if sys.stdin.isatty():  # a person at a terminal; prompts piped in need no banner
        print("Type a prompt and press Enter (Ctrl-D to quit).", file=sys.stderr)
    sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused, not fatal
    answered = 0
    for line in sys.stdin:
        if not line.strip():
            continue  # a blank line asks nothing, and uses no seed
        try:
            run(_check_prompt(line.rstrip("\n")), nth_seed(args.seed, answered))  # each prompt its own seed
        except MiniLlamaError as exc:
            print(f"minillama: {exc}; type another prompt", file=sys.stderr)
        answered += 1


def _check_prompt(prompt: str) -> str:
    """A prompt from argv or stdin that was not UTF-8 holds surrogate escapes; SentencePiece cannot take it."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = prompt[exc.start].encode("utf-8", "surrogateescape")[0]
        raise MiniLlamaError(f"the prompt is not UTF-8 text (byte 0x{bad:02x} at character {exc.start}); "
                             "pass it in UTF-8 (check the terminal's locale)") from None
    return prompt


HELLASWAG_NOTE = ("completion-style scoring as in the reference recipe (loss over the ending tokens); "
                  "the lm-evaluation-harness normalises by bytes and reports a different number for the same model")


def cmd_eval_hellaswag(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from minillama.checkpoint import load_for_inference
    from minillama.eval.hellaswag import (
        HELLASWAG_VAL_EXAMPLES,
        check_batch_size,
        download_hellaswag,
        evaluate_hellaswag,
        load_examples,
    )
    from minillama.eval.plot import REFERENCE_HELLASWAG

    check_batch_size(args.batch_size)
    examples = load_examples(Path(args.data) if args.data else download_hellaswag(), args.limit)
    model, tokenizer, info = load_for_inference(args.checkpoint, args.device, args.dtype, args.tokenizer)
    _say_which(info)
    result = evaluate_hellaswag(model, tokenizer, examples, args.batch_size, progress=True)
    predictions = result.pop("predictions")
    if args.json:
        print(json.dumps({**result, "scoring": HELLASWAG_NOTE, "predictions": [asdict(p) for p in predictions]}, indent=2))
        return
    print(f"HellaSwag acc_norm {result['acc_norm']:.4f} ± {result['acc_norm_stderr']:.4f}  acc {result['acc']:.4f} ± "
          f"{result['acc_stderr']:.4f} (± one standard error)  over {result['examples']:,} examples"
          + (f" ({result['truncated']} with contexts cut to fit max_seq_len)" if result["truncated"] else ""))
    if result["examples"] < HELLASWAG_VAL_EXAMPLES:
        label, reference = REFERENCE_HELLASWAG[0]
        margin = 1.96 * max(result["acc_norm_stderr"], 1e-9)
        print(f"(a sample of {result['examples']:,} of the {HELLASWAG_VAL_EXAMPLES:,} validation examples: at 95% confidence it "
              f"tells a model apart from the {label}'s {reference:.2%} only {margin:.1%} or more away from it)")
    print(f"({HELLASWAG_NOTE})")


def cmd_eval_loss(args: argparse.Namespace) -> None:
    from minillama.checkpoint import load_for_inference
    from minillama.data.loader import check_data
    from minillama.eval.loss import check_loss_settings, evaluate_loss
    from minillama.train.history import data_dir_of

    model, tokenizer, info = load_for_inference(args.checkpoint, args.device, args.dtype, args.tokenizer)
    data = Path(args.data) if args.data else data_dir_of(info.path)
    if data is None:
        raise MiniLlamaError(f"{info.path} is not inside a training run, so it has no data of its own: pass --data DIR "
                             "(a folder made by `minillama prepare`)")
    if not args.data:
        print(f"scoring {data}, the run's data.dir", file=sys.stderr)
    check_data(data, info.config.vocab_size, tokenizer.fingerprint)
    seq_len = info.config.max_seq_len if args.seq_len is None else args.seq_len
    check_loss_settings(info.config.max_seq_len, args.batch_size, seq_len, args.tokens)
    _say_which(info)
    result = evaluate_loss(model, data, tokenizer, args.batch_size, seq_len, args.tokens, progress=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"val loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  bits per byte "
              f"{result['bits_per_byte']:.4f}  over {result['tokens']:,} tokens ({result['bytes']:,} bytes)")


def cmd_eval_harness(args: argparse.Namespace) -> None:
    from minillama.layout import find_checkpoint, harness_output

    try:
        from lm_eval.utils import make_table

        from minillama.eval.harness import run_harness
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("lm_eval"):
            raise
        raise MiniLlamaError("eval harness needs EleutherAI's lm-evaluation-harness: pip install 'minillama[harness]'") from None
    checkpoint = find_checkpoint(Path(args.checkpoint))
    if args.output:
        require_folder_of(Path(args.output), "harness results file")
    output = Path(args.output) if args.output else harness_output(checkpoint)
    results = run_harness(checkpoint, [t.strip() for t in args.tasks.split(",") if t.strip()], args.limit, args.batch_size,
                          args.device, args.dtype, Path(args.tokenizer) if args.tokenizer else None,
                          Path(args.include_path) if args.include_path else None, args.num_fewshot, output, args.log_samples,
                          args.force)
    if results is not None:  # rank 0
        print(f"using {checkpoint}", file=sys.stderr)
        print(make_table(results))
        if output:
            print(f"wrote {output}" + (" and samples_TASK_DATE.jsonl per task beside it" if args.log_samples else ""))


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from minillama.serve.app import serve
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise MiniLlamaError("serve needs FastAPI and uvicorn: pip install 'minillama[serve]'") from None
    allowed = None if args.allowed_hosts is None else [host.strip() for host in args.allowed_hosts.split(",") if host.strip()]
    if allowed == []:
        raise MiniLlamaError(f"--allowed-hosts {args.allowed_hosts!r} names no host; name at least one (e.g. "
                             "127.0.0.1,localhost), '*' for any, or leave the flag out for the loopback names")
    serve(args.checkpoint, args.host, args.port, args.max_batch, args.device, args.dtype, args.tokenizer, args.model_name,
          allowed, args.max_queue, args.threads)


def cmd_plot(args: argparse.Namespace) -> None:
    from minillama.eval.plot import plot_runs

    require_folder_of(Path(args.out), "plot")
    print(f"wrote {plot_runs([Path(r) for r in args.run_dirs], Path(args.out), args.smoothing)}")


def cmd_report(args: argparse.Namespace) -> None:
    from minillama.eval.report import curves_path, write_report

    if args.out:
        require_folder_of(Path(args.out), "report")
    report = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"wrote {report} and {curves_path(report).name} beside it")


def _checkpoint_to_export(args: argparse.Namespace) -> Path:
    """The checkpoint an export reads (a run directory means its newest); the export names it once written."""
    from minillama.layout import find_checkpoint

    return find_checkpoint(Path(args.checkpoint))


def cmd_export_hf(args: argparse.Namespace) -> None:
    from minillama.interop.hf import export_hf

    checkpoint = _checkpoint_to_export(args)
    print(f"wrote {export_hf(checkpoint, Path(args.out), args.dtype, force=args.force)} from {checkpoint}")


def cmd_export_llama2c(args: argparse.Namespace) -> None:
    from minillama.interop.llama2c import export_llama2c

    checkpoint = _checkpoint_to_export(args)
    print(f"wrote {export_llama2c(checkpoint, Path(args.out), args.version, force=args.force)} from {checkpoint}")


def cmd_export_llama2c_tokenizer(args: argparse.Namespace) -> None:
    from minillama.interop.llama2c import export_llama2c_tokenizer

    print(f"wrote {export_llama2c_tokenizer(Path(args.tokenizer), Path(args.out), force=args.force)}")


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from minillama.checkpoint import load_checkpoint_tokenizer, read_checkpoint_info
    from minillama.interop.llamacpp import collapses_whitespace, export_gguf
    from minillama.tokenizer import load_tokenizer

    checkpoint = _checkpoint_to_export(args)
    out, fell_back = export_gguf(checkpoint, Path(args.out), args.dtype, force=args.force,
                                 tokenizer_path=Path(args.tokenizer_path) if args.tokenizer_path else None)
    if fell_back:
        print(f"note: {len(fell_back)} matrices have rows that are not a multiple of 32, which q8_0 needs; they are "
              f"stored as f16: {', '.join(fell_back)}", file=sys.stderr)
    tokenizer = load_tokenizer(args.tokenizer_path) if args.tokenizer_path else load_checkpoint_tokenizer(read_checkpoint_info(checkpoint))
    if collapses_whitespace(tokenizer):
        print("note: this SentencePiece model folds runs of spaces into one (remove_extra_whitespaces); llama.cpp does not, "
              "so text with repeated spaces tokenizes differently there", file=sys.stderr)
    print(f"wrote {out} from {checkpoint}")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from minillama.interop.hf import import_hf

    print(f"wrote checkpoint {import_hf(Path(args.source), Path(args.out), Path(args.tokenizer_path) if args.tokenizer_path else None, force=args.force)}")


def cmd_import_llama2c(args: argparse.Namespace) -> None:
    from minillama.interop.llama2c import import_llama2c

    print(f"wrote checkpoint {import_llama2c(Path(args.source), Path(args.out), Path(args.tokenizer), force=args.force)}")


def _writing_out(handler: Handler) -> Handler:
    """An export or import command that holds a lock on its output path while it runs: a second command writing the
    same path at once is refused, rather than both finishing and one silently replacing the other."""

    def locked(args: argparse.Namespace) -> None:
        require_folder_of(Path(args.out), "output")
        with output_lock(Path(args.out), f"minillama {args.command} command"):
            handler(args)

    return locked


Subparsers = argparse._SubParsersAction


def _command(parent: Subparsers, name: str, help: str, handler: Handler, **kwargs) -> argparse.ArgumentParser:
    sub = parent.add_parser(name, help=help, description=help, **kwargs)
    sub.set_defaults(handler=handler, parser=sub)
    return sub


def _group(parent: Subparsers, name: str, help: str, metavar: str) -> Subparsers:
    """A command with subcommands of its own (`minillama prepare text`, `minillama eval loss`, ...)."""
    return parent.add_parser(name, help=help, description=help).add_subparsers(dest=f"{name}_command", required=True, metavar=metavar)


def _checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights precision (auto: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--tokenizer", help="tokenizer .model (default: the one stored in the checkpoint)")


def _shard_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", dest="out_dir", required=True, help="output directory for the shards and manifest.json")
    p.add_argument("--tokenizer", help="SentencePiece .model (default: $MINILLAMA_TOKENIZER, else Llama 2's from the hub)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default: 100,000,000)")
    p.add_argument("--val-tokens", type=int, help="tokens in the validation split, taken first (default: one shard)")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens in all")
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes, at most one per CPU core (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_tokenizer(commands: Subparsers) -> None:
    tokenizer = _group(commands, "tokenizer", "Train a SentencePiece tokenizer.", "COMMAND")
    p = _command(tokenizer, "train", "Train a Llama-style SentencePiece BPE tokenizer (byte fallback, split digits) on .txt/.jsonl files.",
                 cmd_tokenizer_train)
    p.add_argument("files", nargs="+", help="text files (.txt: one sentence per line; .jsonl: the --text-field of each record)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, e.g. 512 for the tiny preset")
    p.add_argument("--out", required=True, help="where to write the .model file")
    p.add_argument("--text-field", default="text", help="field of .jsonl records holding the text (default: text)")
    _force_option(p, "tokenizer model")


def _add_prepare(commands: Subparsers) -> None:
    prepare = _group(commands, "prepare", "Tokenize FineWeb-Edu or local text into token shards for training "
                     "(re-running an interrupted command continues it).", "SOURCE")
    p = _command(prepare, "fineweb-edu", "Stream HuggingFaceFW/fineweb-edu from the Hugging Face hub and tokenize it.", cmd_prepare_fineweb)
    p.add_argument("--subset", default="sample-10BT", help="dataset config, e.g. sample-10BT, sample-100BT (default: sample-10BT)")
    p.add_argument("--from", dest="snapshot", metavar="DIR",
                   help="read a local copy of the dataset repository instead of the hub (no internet needed): the folder "
                        "`hf download HuggingFaceFW/fineweb-edu --repo-type dataset --include \"sample/10BT/*\" "
                        "--local-dir DIR` fills; same rows, same order, same shards")
    _shard_options(p)
    p = _command(prepare, "text", "Tokenize local .txt, .jsonl or .parquet files (globs allowed).", cmd_prepare_text)
    p.add_argument("files", nargs="+", metavar="FILES_OR_GLOBS", help="files or quoted glob patterns, e.g. 'data/*.parquet'")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text (default: text)")
    p.add_argument("--split-paragraphs", action="store_true", help=".txt: each blank-line-separated paragraph is a document (default: each file)")
    p.add_argument("--skip-bad-records", action="store_true", help="skip (and count) malformed or non-UTF-8 records instead of stopping")
    _shard_options(p)
    p = _command(prepare, "check", "Verify a prepared folder: every shard's size and sha256 against the manifest, every token id "
                  "below the vocabulary size.", cmd_prepare_check)
    p.add_argument("data_dir", help="a folder made by `minillama prepare`")
    p.add_argument("--vocab-size", type=int, help="the model's vocabulary size (default: the tokenizer's, from the manifest)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_train(commands: Subparsers) -> None:
    from minillama.train.config import field_reference

    fields = "\n".join(f"  {key} = {default}\n      {note}" for key, default, note in field_reference())
    p = _command(commands, "train", "Train a model as a run config says (one process, or one per GPU under torchrun), resuming automatically.",
                 cmd_train, formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="Multi-GPU: torchrun --nproc_per_node=8 -m minillama train --config configs/mini-llama-109M.toml.\n"
                        "A model that does not fit: --set parallel=fsdp (shards weights, gradients and optimizer state over the\n"
                        "ranks) and --set activation_checkpointing=full (or selective).\n"
                        "On a CPU that other work keeps busy, --set threads=1 can be several times faster than PyTorch's default\n"
                        "(a thread per core, each spinning between operations while the others wait for a core).\n\n"
                        "Run config fields (TOML tables, or --set table.field=value), with their defaults:\n" + fields)
    p.add_argument("--config", help="run config TOML (see configs/); without it, the reference mini-llama-109M run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 --set model.dropout=0.1 (repeatable)")
    p.add_argument("--resume", nargs="?", const="always", default="auto", choices=["auto", "always", "never"],
                   help="auto (default): continue from the run directory's newest checkpoint if there is one; "
                   "--resume: require one; --resume never: refuse to reuse a run directory with checkpoints")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (memory per rank, micro-batch and accumulation, FLOPs per token, steps, tokens and "
                        "time) and exit, writing nothing")
    p.add_argument("--tokens-per-s", type=float, metavar="N", help="with --dry-run: the speed to time the run at "
                   "(default on a known GPU: 40%% of its peak bf16 FLOPs)")


def _add_generate(commands: Subparsers) -> None:
    p = _command(commands, "generate", "Sample text from a checkpoint (KV-cached; CUDA graphs on GPU).", cmd_generate)
    _checkpoint_options(p)
    p.add_argument("prompt", nargs="?", default="", help="text to continue (empty: start from BOS)")
    p.add_argument("--num-samples", type=int, default=4, help="samples to draw (default 4); with 1, tokens stream as they come")
    p.add_argument("--max-new-tokens", type=int, default=100, help="new tokens per sample (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding (default 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50; 0 turns the cut off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens with this much mass")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible on the same device; with --interactive, "
                   "the i-th prompt (from 0) uses seed + i")
    p.add_argument("--no-stop-at-eos", action="store_true", help="keep going past the end of a document (BOS, which training "
                   "puts between documents, or EOS)")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF (blank "
                   "lines are skipped)")
    p.add_argument("--stop", action="append", metavar="TEXT", help=f"end a sample before this text (repeat for up to "
                   f"{MAX_STOP_STRINGS}; e.g. --stop $'\\n\\n' ends at a blank line)")
    p.add_argument("--compile", action="store_true", help="decode with a torch.compile'd step of static shapes (a one-time "
                   "cost of seconds to a minute; on a CPU eager decoding is faster, see docs/benchmarks.md)")


def _add_eval(commands: Subparsers) -> None:
    evaluate = _group(commands, "eval", "Evaluate a checkpoint: HellaSwag accuracy, validation loss, or any "
                      "lm-evaluation-harness task.", "EVALUATION")
    p = _command(evaluate, "hellaswag", f"HellaSwag validation accuracy ({HELLASWAG_NOTE}).", cmd_eval_hellaswag)
    _checkpoint_options(p)
    p.add_argument("--data", help="HellaSwag jsonl (default: download the official validation file once into ~/.cache/minillama)")
    p.add_argument("--limit", type=int, help="score only the first N examples")
    p.add_argument("--batch-size", type=int, default=16, help="examples (4 sequences each) per forward pass (default 16)")
    p.add_argument("--json", action="store_true", help="print JSON, with every example's prediction")
    p = _command(evaluate, "loss", "Validation loss, perplexity and bits per byte on a prepared data directory's val split.", cmd_eval_loss)
    _checkpoint_options(p)
    p.add_argument("--data", help="directory made by `minillama prepare` (default for a run's checkpoint: the run's data.dir)")
    p.add_argument("--tokens", type=int, default=10_485_760, help="validation tokens to score (default 10,485,760)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _command(evaluate, "harness", "Run EleutherAI lm-evaluation-harness tasks on a checkpoint with Mini Llama's own "
                 "forward and tokenization matching the harness's Hugging Face model (needs the 'harness' extra; under "
                 "torchrun each rank takes a share).", cmd_eval_harness)
    _checkpoint_options(p)
    p.add_argument("--tasks", required=True, help="comma-separated harness task names, e.g. hellaswag,arc_easy,piqa")
    p.add_argument("--limit", type=float, help="at most this many documents per task (a fraction below 1: that share)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (default 16)")
    p.add_argument("--include-path", help="a folder of extra task YAMLs (e.g. tasks over local files)")
    p.add_argument("--output", help="results JSON (default for a run's checkpoint: RUN_DIR/harness/step_N.json); results "
                   "of other tasks already there with the same settings are kept")
    p.add_argument("--force", action="store_true", help="replace an earlier results file made with other settings (--limit, "
                   "--num-fewshot) instead of refusing")
    p.add_argument("--log-samples", action="store_true", help="also write every document's prompts, responses and "
                   "scores, as lm_eval --log_samples does: samples_TASK_DATE.jsonl beside the results JSON")


def _add_serve(commands: Subparsers) -> None:
    p = _command(commands, "serve", "Serve a checkpoint over an OpenAI-compatible completions API (streaming, "
                 "logprobs and echo, continuous batching, Prometheus metrics) with a playground page; needs the 'serve' "
                 "extra.", cmd_serve)
    _checkpoint_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--max-batch", type=int, default=8, help="completions decoded together at most (default 8)")
    p.add_argument("--max-queue", type=int, help="completions waiting or running at most; more are refused with 429 "
                   "(default 32 x --max-batch)")
    p.add_argument("--allowed-hosts", help="comma-separated Host header names to answer (default: 127.0.0.1,localhost,::1 "
                   "when --host is a loopback address, any otherwise); others get 400, which stops DNS rebinding")
    p.add_argument("--model-name", help="the model id the API reports (default: the preset, or the checkpoint's name)")
    p.add_argument("--threads", type=int, help="PyTorch's threads on a CPU (default: all cores but one, which the "
                   "server's event loop needs)")


def _add_results(commands: Subparsers) -> None:
    p = _command(commands, "plot", "Plot training curves of one or more runs (loss, val loss, HellaSwag) to a PNG.", cmd_plot)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run directories (with metrics.jsonl)")
    p.add_argument("-o", "--out", default="curves.png", help="output image (default curves.png)")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA weight for the smoothed train loss (default 0.9)")
    p = _command(commands, "report", "Write a Markdown report of a run (key numbers, samples) with its curves beside it.", cmd_report)
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("-o", "--out", help="output .md (default RUN_DIR/report.md; its curves go beside it as NAME_curves.png)")


def _force_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace OUT if it holds an earlier {what} (nothing else is ever replaced)")


def _add_interop(commands: Subparsers) -> None:
    export = _group(commands, "export", "Export a checkpoint to Hugging Face transformers, llama.cpp (GGUF) or llama2.c "
                    "(or a tokenizer to run.c's format).", "FORMAT")
    p = _command(export, "hf", "Write a directory that transformers' AutoModelForCausalLM and AutoTokenizer load as Llama.", _writing_out(cmd_export_hf))
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)")
    _force_option(p, "Hugging Face export")
    p = _command(export, "llama2c", "Write a llama2.c model file that run.c samples from.", _writing_out(cmd_export_llama2c))
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("out", help="output .bin file")
    p.add_argument("--version", type=int, default=0, choices=[0, 1], help="0: the legacy layout run.c reads (default); 1: the header-v1 layout")
    _force_option(p, "llama2.c model file")
    p = _command(export, "gguf", "Write a GGUF file that llama.cpp, llama-cpp-python, Ollama and LM Studio run (needs the "
                 "'gguf' extra).", _writing_out(cmd_export_gguf))
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("out", help="output .gguf file")
    p.add_argument("--dtype", default="f16", help="matrices' type (norms stay f32): "
                   "f16 (default), f32, bf16, or q8_0 (8-bit blocks of 32; a matrix whose rows are not a multiple of 32 "
                   "is stored as f16, and named)")
    p.add_argument("--tokenizer", dest="tokenizer_path", help="SentencePiece .model (default: the checkpoint's own)")
    _force_option(p, "GGUF file")
    p = _command(export, "llama2c-tokenizer", "Write a SentencePiece model as run.c's tokenizer file (its -z option).", _writing_out(cmd_export_llama2c_tokenizer))
    p.add_argument("tokenizer", help="a SentencePiece .model")
    p.add_argument("out", help="output .bin file")
    _force_option(p, "run.c tokenizer file")
    imports = _group(commands, "import", "Import a Hugging Face Llama directory or a llama2.c model file as a Mini Llama checkpoint.", "FORMAT")
    p = _command(imports, "hf", "Import a local transformers Llama directory (safetensors weights, config.json).", _writing_out(cmd_import_hf))
    p.add_argument("source", help="the model directory")
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument("--tokenizer", dest="tokenizer_path", help="SentencePiece .model (default: the directory's tokenizer.model, if any)")
    _force_option(p, "checkpoint")
    p = _command(imports, "llama2c", "Import a llama2.c model file (version 0 or 1).", _writing_out(cmd_import_llama2c))
    p.add_argument("source", help="the .bin model file")
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument("--tokenizer", required=True, help="the SentencePiece .model it was trained with (llama2.c files carry none)")
    _force_option(p, "checkpoint")


def _add_inspect(commands: Subparsers) -> None:
    p = _command(commands, "inspect", "Show a preset's or checkpoint's config, parameter counts and training FLOPs per token.", cmd_inspect)
    p.add_argument("target", help="a preset name (mini-llama-109M, tiny, ...) or a checkpoint/run directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


EXTRAS_HELP = """optional extras (pip install 'minillama[EXTRA,...]'; each command names the one it misses):
  data      datasets, pyarrow        prepare fineweb-edu (hub or --from a local copy), .parquet files for prepare text
  plot      matplotlib               plot, report
  hf        transformers, protobuf   export hf, import hf
  gguf      gguf                     export gguf
  harness   lm-eval                  eval harness
  serve     fastapi, uvicorn,        serve
            prometheus_client
  notebooks jupyter notebook         examples/*.ipynb
Offline: a checkpoint carries its tokenizer, so generate, eval loss, export and serve need no network; prepare
and train take --tokenizer / data.tokenizer (else Llama 2's is fetched once), prepare fineweb-edu takes --from DIR,
eval hellaswag --data FILE, and eval harness --include-path with task YAMLs over local files."""


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake in the flags reported as one line like every other mistake (the usage block is
    what --help shows). Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("minillama").strip()
        self.exit(2, f"minillama: error: {command + ': ' if command else ''}{message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minillama", description="Pretrain, sample, evaluate and export small Llama-architecture language models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXTRAS_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_tokenizer, _add_prepare, _add_train, _add_generate, _add_eval, _add_results, _add_interop, _add_serve,
                _add_inspect):
        add(commands)  # in pipeline order, as --help lists them
    return parser


STOPPED_BY_SIGTERM = {  # what SIGTERM (128 + 15 = exit code 143) meant for a command
    "serve": "the server stopped on SIGTERM, after the requests in flight had finished",
    None: "{command} stopped by SIGTERM before it finished; every file it wrote is whole (writes are atomic), and running "
          "the same command again continues or redoes it",
}


class Terminated(Exception):
    """SIGTERM arrived while a command worked (outside training, which has its own handler that saves a step)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(args)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{parameter: flag} for a command: the library's parameters carry the names of the flags' destinations."""
    return {action.dest: max(action.option_strings, key=len) for action in parser._actions if action.option_strings}


def _run(args: argparse.Namespace) -> int:
    try:
        args.handler(args)
        sys.stdout.flush()  # inside: a reader that went away is met here, not at exit
    except ArgumentError as exc:
        print(f"minillama: error: {exc.naming(_flags(args.parser))}", file=sys.stderr)
        return 2
    except MiniLlamaError as exc:
        print(f"minillama: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`minillama ... | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        if exc.errno not in OS_ERROR_FIXES:
            raise  # not the user's environment: a bug, with its traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"minillama: error: {where}{exc.strerror}; {OS_ERROR_FIXES[exc.errno]}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:
        print(f"minillama: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("minillama: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"minillama: {STOPPED_BY_SIGTERM.get(args.command, STOPPED_BY_SIGTERM[None]).format(command=args.command)}",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0
