"""Helpers for tests that train: a fast tiny run's overrides, running the CLI in a process, reading its losses."""

import json
import os
import signal
import subprocess
import sys
import time

from minillama.train.config import config_to_toml, load_train_config


def tiny_run(tmp_path, data_dir, tokenizer, *extra):
    """--set overrides for a fast tiny run on the synthetic corpus: batches of 4 x 64 tokens, 2 micro-steps."""
    return [
        f"run_dir={tmp_path / 'run'}", f"data.dir={data_dir}", f"data.tokenizer={tokenizer.path}", "data.auto_prepare=false",
        "model.vocab_size=320", "model.max_seq_len=64", "batch.seq_len=64", "batch.micro_batch=4", "batch.total_tokens=512",
        "optim.max_steps=200", "optim.warmup_steps=10", "optim.lr=3e-3", "optim.min_lr=3e-4",
        "eval.interval=1000", "eval.val_tokens=1024", "eval.hellaswag=false", "eval.num_samples=0",
        "checkpoint.interval=4", "checkpoint.keep_last=2", "device=cpu", "compile=false", *extra,
    ]


def config_file(tmp_path, overrides):
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(load_train_config("configs/tiny.toml", overrides)))
    return path


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"], records


def run_cli(*args, env_extra=None, check=True):
    env = {**os.environ, **(env_extra or {})}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, f"{ended(result.returncode)}\n{result.stderr[-8000:]}"
    return result


def ended(returncode: int) -> str:
    """How a child process ended: its exit code, or the signal that killed it (a crash in native code)."""
    return f"killed by signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"


def uninterrupted_losses(tmp_path, overrides):
    """The losses of the run `overrides` describe, trained in this process from start to end."""
    from minillama.train.loop import train

    folder = tmp_path / "straight"
    folder.mkdir()
    train(load_train_config(config_file(folder, overrides), [f"run_dir={folder / 'run'}"]))
    return train_losses(folder / "run")[0]


def resume_in_this_process(folder):
    """`minillama train --resume` of the run `start_run_until_step` started in `folder`, called in this process."""
    from minillama.train.loop import train

    train(load_train_config(folder / "run.toml", [f"run_dir={folder / 'run'}"]), resume="always")


def torchrun(nproc, *args):
    """`python -m minillama ARGS` under torchrun with `nproc` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "minillama", *args]


def start_run_until_step(folder, overrides, step, nproc=None, env_extra=None, **popen):
    """A `minillama train` process (under torchrun with `nproc` processes), returned once it has logged `step`,
    with the command that resumes it."""
    folder.mkdir()
    args = ["train", "--config", str(config_file(folder, overrides)), "--set", f"run_dir={folder / 'run'}"]
    command = torchrun(nproc, *args) if nproc else [sys.executable, "-m", "minillama", *args]
    process = subprocess.Popen(command, env={**os.environ, **(env_extra or {})}, **popen)
    metrics, deadline = folder / "run" / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and f'"kind": "train", "step": {step},' in metrics.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run {'ended (exit ' + str(process.returncode) + ')' if process.returncode is not None else 'took over 300 s'} "
                                 f"before logging step {step}: {command}")
        time.sleep(0.05)
    return process, command
