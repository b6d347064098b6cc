"""The `minillama` command: parses arguments and calls the Python API; user errors become one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from minillama.errors import MiniLlamaError

Handler = Callable[[argparse.Namespace], None]


def cmd_inspect(args: argparse.Namespace) -> None:
    from minillama.checkpoint import find_checkpoint, read_checkpoint_info
    from minillama.config import PRESETS, preset
    from minillama.summary import describe, format_description

    if args.target in PRESETS or not Path(args.target).exists():
        config = preset(args.target)
    else:
        config = read_checkpoint_info(find_checkpoint(Path(args.target))).config
    description = describe(config)
    print(json.dumps(description, indent=2) if args.json else format_description(description))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from minillama.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([Path(f) for f in args.files], args.vocab_size, Path(args.out), args.text_field)
    print(f"wrote {tokenizer.path} (vocab {tokenizer.vocab_size}, sha256 {tokenizer.fingerprint[:12]}…)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minillama",
        description="Pretrain, sample, evaluate and export small Llama-architecture language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, handler: Handler, parent=commands, **kwargs) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help, **kwargs)
        sub.set_defaults(handler=handler)
        return sub

    p = command("inspect", "Show a preset's or checkpoint's config, parameter counts and training FLOPs per token.", cmd_inspect)
    p.add_argument("target", help="a preset name (mini-llama-109M, tiny, ...) or a checkpoint/run directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    tokenizer = commands.add_parser("tokenizer", help="Train a SentencePiece tokenizer.", description="Tokenizer tools.")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    p = command(
        "train", "Train a Llama-style SentencePiece BPE tokenizer (byte fallback, split digits) on .txt/.jsonl files.",
        cmd_tokenizer_train, parent=tokenizer_commands,
    )
    p.add_argument("files", nargs="+", help="text files (.txt: one sentence per line; .jsonl: the --text-field of each record)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, e.g. 512 for the tiny preset")
    p.add_argument("--out", required=True, help="where to write the .model file")
    p.add_argument("--text-field", default="text", help="field of .jsonl records holding the text (default: text)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except MiniLlamaError as exc:
        print(f"minillama: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minillama: interrupted", file=sys.stderr)
        return 130
    return 0
