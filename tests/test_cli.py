import json
import subprocess
import sys

import pytest

from minillama.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minillama", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_help_lists_every_subcommand():
    out = run_cli("--help").stdout
    for command in ("inspect", "tokenizer", "prepare", "train", "generate", "eval", "plot", "report", "export", "import"):
        assert f"    {command} " in out or f"    {command}\n" in out, command


def test_inspect_reference_preset(capsys):
    assert main(["inspect", "mini-llama-109M"]) == 0
    assert "109,529,856" in capsys.readouterr().out


def test_user_error_is_one_line_and_exit_code_2(capsys):
    assert main(["inspect", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown model preset 'no-such-preset'" in err and "Traceback" not in err


def test_tokenizer_train_command(tmp_path, corpus_file, capsys):
    assert main(["tokenizer", "train", str(corpus_file), "--vocab-size", "300", "--out", str(tmp_path / "t.model")]) == 0
    assert "vocab 300" in capsys.readouterr().out


def test_each_export_and_import_format_has_its_own_help(capsys):
    def help_of(*command):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        return capsys.readouterr().out

    assert "--dtype" in help_of("export", "hf") and "--version" not in help_of("export", "hf")
    assert "--version" in help_of("export", "llama2c") and "--dtype" not in help_of("export", "llama2c")
    assert "run.c's tokenizer file" in help_of("export", "llama2c-tokenizer")
    assert "--tokenizer TOKENIZER" in help_of("import", "llama2c")


@pytest.mark.slow
def test_sigterm_while_a_command_works_is_one_line_and_exit_143(tmp_path, tokenizer):
    """Outside training (which saves a step first), SIGTERM ends a command with a line saying so, not silently, and
    what it wrote is whole: no temporary file is left, and the manifest lists only finished shards."""
    import json
    import signal
    import time

    text = tmp_path / "big.txt"
    text.write_text("the cat sees the moon again and again in the quiet town at night.\n" * 400_000)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "minillama", "prepare", "text", str(text), "--out", str(out), "--tokenizer",
                                str(tokenizer.path), "--shard-tokens", "100000", "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / "manifest.json").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("minillama: prepare stopped by SIGTERM before it finished")
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    listed = [s["file"] for s in json.loads((out / "manifest.json").read_text())["shards"]]
    written = sorted(p.name for p in out.glob("*.bin"))
    # Every listed shard is there; at most the one being listed when the signal came is not yet (a resume rewrites it).
    assert set(listed) <= set(written) and len(written) - len(listed) <= 1


def test_library_errors_name_parameters_and_the_cli_names_its_flags(tmp_path, corpus_file, tokenizer, capsys):
    from minillama.data.prepare import prepare
    from minillama.data.sources import LocalFiles
    from minillama.errors import MiniLlamaError

    with pytest.raises(MiniLlamaError, match=r"^shard_tokens is 0; expected a positive integer$"):
        prepare(LocalFiles([str(corpus_file)]), tmp_path / "out", tokenizer, shard_tokens=0)
    assert main(["prepare", "text", str(corpus_file), "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer.path),
                 "--shard-tokens", "0"]) == 2
    assert capsys.readouterr().err == "minillama: error: --shard-tokens is 0; expected a positive integer\n"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train_000000.bin").write_bytes(b"")
    with pytest.raises(MiniLlamaError, match=r"choose another out_dir, or pass overwrite to replace them$"):
        prepare(LocalFiles([str(corpus_file)]), tmp_path / "data", tokenizer)
    assert main(["prepare", "text", str(corpus_file), "--out", str(tmp_path / "data"), "--tokenizer", str(tokenizer.path)]) == 2
    assert "choose another --out, or pass --overwrite to replace them" in capsys.readouterr().err


def test_help_names_every_optional_extra_and_what_needs_it(capsys):
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out.split("optional extras")[1].splitlines()
    named = {line.split()[0] for line in listed[1:] if line.startswith("  ") and not line.startswith("   ")}
    assert named == set(extras) - {"dev"}


@pytest.mark.slow
def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`minillama ... | head`: once the reader has gone, the command stops with SIGPIPE's code and no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "minillama", "inspect", "mini-llama-109M"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # gone before the first line is written
    assert process.wait(timeout=60) == 141 and process.stderr.read() == b""


def test_a_runs_checkpoints_folder_means_its_newest_and_a_hugging_face_folder_is_named(tmp_path, capsys):
    from minillama.checkpoint import save_checkpoint
    from minillama.config import ModelConfig
    from minillama.model import Transformer

    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16))
    run = tmp_path / "run"
    for step in (2, 4):
        save_checkpoint(run / "checkpoints" / f"step_{step:07d}", model, metadata={"step": step}, training_state={"step": step})
    (run / "metrics.jsonl").write_text("")
    assert main(["inspect", str(run / "checkpoints")]) == 0
    assert capsys.readouterr().err == f"using {run / 'checkpoints' / 'step_0000004'} (step 4)\n"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama", "hidden_size": 32}')
    assert main(["inspect", str(hf)]) == 2
    assert capsys.readouterr().err == (f"minillama: error: {hf} is a Hugging Face model folder, not a Mini Llama checkpoint; "
                                       f"convert it first: minillama import hf {hf} OUT\n")


def test_inspect_of_a_training_checkpoint_shows_how_far_it_trained_and_its_recipe(tiny, capsys):
    """The step, tokens seen and last val loss come from the run's own records (metadata and metrics.jsonl)."""
    records = [json.loads(line) for line in (tiny.parents[1] / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    tokens = [r for r in records if r["kind"] == "train"][-1]["tokens_seen"]
    assert main(["inspect", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert f"  steps done           40  ({tokens:,} tokens seen)" in out
    assert f"  last val loss        {last_eval['val_loss']:.4f}  (at step {last_eval['step']:,})" in out
    assert "recipe               optimizer adamw, schedule cosine" in out and "tokens_per_step 8,192" in out
    assert main(["inspect", str(tiny), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["step"] == 40
