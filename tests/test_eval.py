import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_file, write_examples

from minillama.checkpoint import load_checkpoint, save_checkpoint
from minillama.cli import main
from minillama.config import ModelConfig
from minillama.data.prepare import prepare
from minillama.data.shards import read_manifest
from minillama.data.sources import FineWebEdu, LocalFiles
from minillama.errors import MiniLlamaError
from minillama.eval.hellaswag import (
    Candidate,
    Example,
    candidates,
    evaluate_hellaswag,
    load_examples,
    score,
)
from minillama.eval.loss import evaluate_loss
from minillama.eval.plot import curves_figure, load_run, plot_runs
from minillama.eval.report import write_report
from minillama.model import Transformer
from minillama.tokenizer import LLAMA2_TOKENIZER_SHA256, Tokenizer
from minillama.train.config import load_train_config
from minillama.train.loop import train


def reference_losses(model, tokenizer, example):
    """Summed loss of each ending, one candidate per forward pass, log-softmax in float64."""
    context = tokenizer.encode(example.context, bos=True)
    out = []
    with torch.no_grad():
        for ending in example.endings:
            ending_ids = tokenizer.encode(ending, bos=False)
            tokens = torch.tensor([context + ending_ids])
            log_probs = torch.log_softmax(model(tokens)[0][0].double(), dim=-1)
            out.append(-sum(log_probs[len(context) - 1 + i, t].item() for i, t in enumerate(ending_ids)))
    return out


@pytest.fixture
def llama_vocab_model():
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=256)).eval()


def test_real_hellaswag_examples_batched_equals_one_at_a_time(test_data, llama_vocab_model):
    tokenizer = Tokenizer(data_file(test_data, "llama2_tokenizer.model"))
    examples = load_examples(data_file(test_data, "hellaswag_val_head10.jsonl"))
    assert len(examples) == 10 and examples[0].label in range(4)
    batched, _ = score(llama_vocab_model, tokenizer, examples, batch_size=4)
    single, _ = score(llama_vocab_model, tokenizer, examples, batch_size=1)
    assert [(p.pred_norm, p.pred_sum) for p in batched] == [(p.pred_norm, p.pred_sum) for p in single]
    # Mean loss per ending token (what acc_norm ranks) within 1e-5; the float32 sums of ~30 tokens at ~10 nats
    # each agree to float32 precision (relative 1e-6), as other batch shapes round matmuls differently.
    mean = lambda p: [loss / n for loss, n in zip(p.losses, p.ending_tokens)]  # noqa: E731
    assert max(abs(a - b) for p, q in zip(batched, single) for a, b in zip(mean(p), mean(q))) < 1e-5
    assert max(abs(a - b) / b for p, q in zip(batched, single) for a, b in zip(p.losses, q.losses)) < 1e-6
    for prediction, example in zip(batched, examples):  # against a plain per-candidate loop with the full head
        reference = reference_losses(llama_vocab_model, tokenizer, example)
        assert max(abs(a - b / n) for a, b, n in zip(mean(prediction), reference, prediction.ending_tokens)) < 1e-5


def test_scores_match_reference_and_accuracies_follow(tmp_path, tokenizer, small_config):
    model = Transformer(small_config).eval()
    examples = load_examples(write_examples(tmp_path / "hs.jsonl", 12))
    predictions, truncated = score(model, tokenizer, examples, batch_size=5)
    assert truncated == 0
    for prediction, example in zip(predictions, examples):
        expected = reference_losses(model, tokenizer, example)
        assert np.allclose(prediction.losses, expected, atol=1e-4)
        lengths = [len(tokenizer.encode(e, bos=False)) for e in example.endings]
        assert prediction.pred_sum == int(np.argmin(expected))
        assert prediction.pred_norm == int(np.argmin(np.array(expected) / lengths))
    result = evaluate_hellaswag(model, tokenizer, examples, batch_size=3)
    assert result["acc_norm"] == sum(p.pred_norm == p.label for p in predictions) / 12
    assert result["acc"] == sum(p.pred_sum == p.label for p in predictions) / 12 and result["examples"] == 12


def test_truncation_keeps_bos_the_newest_context_tokens_and_the_whole_ending(tokenizer):
    example = Example("one two three four five six seven eight nine ten eleven twelve", ("a b c", "d", "e f", "g h i j"), 0, 0)
    context = tokenizer.encode(example.context, bos=True)
    for ending, candidate in zip(example.endings, candidates(example, tokenizer, max_len=12)[0]):
        ending_ids = tokenizer.encode(ending, bos=False)
        kept = 12 - 1 - len(ending_ids)
        assert candidate.tokens == [tokenizer.bos_id] + context[len(context) - kept:] + ending_ids
        assert candidate.ending_start == 1 + kept
    assert candidates(example, tokenizer, max_len=200) == ([Candidate(context, tokenizer.encode(e, bos=False)) for e in example.endings], False)


def test_long_contexts_are_cut_from_the_left_and_counted(tmp_path, tokenizer):
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=320, multiple_of=16, max_seq_len=40)).eval()
    examples = load_examples(write_examples(tmp_path / "hs.jsonl", 4))
    predictions, truncated = score(model, tokenizer, examples, batch_size=2)
    assert truncated == 4 and len(predictions) == 4
    # Endings of different lengths leave different contexts: each is scored against its own, as a whole sequence.
    assert any(len({tuple(c.context) for c in candidates(e, tokenizer, 40)[0]}) > 1 for e in examples)
    with torch.no_grad():
        for prediction, example in zip(predictions, examples):
            for loss, cand in zip(prediction.losses, candidates(example, tokenizer, 40)[0]):
                log_probs = torch.log_softmax(model(torch.tensor([cand.tokens]))[0][0].double(), dim=-1)
                expected = -sum(log_probs[cand.ending_start - 1 + i, t].item() for i, t in enumerate(cand.ending))
                assert abs(loss - expected) < 1e-4


def test_bad_hellaswag_files(tmp_path):
    good = json.loads(write_examples(tmp_path / "one.jsonl", 1).read_text())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(MiniLlamaError, match=r"bad.jsonl:2: not a HellaSwag record"):
        load_examples(bad)
    bad.write_text(json.dumps({**good, "label": 4}) + "\n")
    with pytest.raises(MiniLlamaError, match=r"bad.jsonl:1: label is 4; expected 0, 1, 2 or 3"):
        load_examples(bad)
    bad.write_text(json.dumps({**good, "endings": ["a", "b"]}) + "\n")
    with pytest.raises(MiniLlamaError, match="a list of 4 strings"):
        load_examples(bad)


def test_cli_hellaswag_json_and_exit_codes(tmp_path, tokenizer, small_config, capsys):
    model = Transformer(small_config)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    data = write_examples(tmp_path / "hs.jsonl", 6)
    assert main(["eval", "hellaswag", str(tmp_path / "ckpt"), "--data", str(data), "--json", "--batch-size", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 6 and len(report["predictions"]) == 6 and "completion-style" in report["scoring"]
    right = [float(p["pred_norm"] == p["label"]) for p in report["predictions"]]
    assert report["acc_norm_stderr"] == pytest.approx(np.std(right, ddof=1) / np.sqrt(6))  # as lm-eval's stderr
    assert main(["eval", "hellaswag", str(tmp_path / "ckpt"), "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert f"acc_norm {report['acc_norm']:.4f} ± {report['acc_norm_stderr']:.4f}" in text
    assert "(a sample of 6 of the 10,042 validation examples: at 95% confidence it tells a model apart from the reference" in text
    (tmp_path / "broken.jsonl").write_text("{\n")
    assert main(["eval", "hellaswag", str(tmp_path / "ckpt"), "--data", str(tmp_path / "broken.jsonl")]) == 2
    assert "broken.jsonl:1" in capsys.readouterr().err


def test_validation_loss_and_bits_per_byte_against_a_direct_computation(tmp_path, tokenizer, corpus_file, small_config):
    out = tmp_path / "data"
    prepare(LocalFiles([str(corpus_file)], split_paragraphs=True), out, tokenizer, shard_tokens=20_000, val_tokens=3000, progress=False)
    model = Transformer(small_config).eval()
    seq_len, windows = 64, 20
    result = evaluate_loss(model, out, tokenizer, batch_size=6, seq_len=seq_len, total_tokens=windows * seq_len)

    manifest = read_manifest(out)
    stream = np.fromfile(out / manifest["shards"][0]["file"], dtype=np.uint16).astype(np.int64)
    assert stream[0] == tokenizer.bos_id
    nats = 0.0
    with torch.no_grad():
        for w in range(windows):
            chunk = torch.from_numpy(stream[w * seq_len : w * seq_len + seq_len + 1])
            log_probs = torch.log_softmax(model(chunk[None, :-1])[0][0].double(), dim=-1)
            nats -= log_probs.gather(1, chunk[1:, None]).sum().item()
    targets = stream[1 : windows * seq_len + 1].tolist()
    documents, current = [], []
    for token in targets:  # the targets start right after the first BOS: split them into documents at each BOS
        if token == tokenizer.bos_id:
            documents.append(current)
            current = []
        else:
            current.append(token)
    documents.append(current)
    n_bytes = sum(len(tokenizer.decode(doc).encode("utf-8")) for doc in documents)
    assert result["tokens"] == windows * seq_len and result["bytes"] == n_bytes
    assert abs(result["loss"] - nats / (windows * seq_len)) < 1e-5
    assert abs(result["bits_per_byte"] - nats / np.log(2) / n_bytes) < 1e-5


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory, corpus_file, tokenizer):
    base = tmp_path_factory.mktemp("tinyrun")
    out = base / "data"
    prepare(LocalFiles([str(corpus_file)], split_paragraphs=True), out, tokenizer, shard_tokens=20_000, val_tokens=4096, progress=False)
    hellaswag = write_examples(base / "hs.jsonl", 8)
    config = load_train_config("configs/tiny.toml", [
        f"run_dir={base / 'run'}", f"data.dir={out}", f"data.tokenizer={tokenizer.path}", "model.vocab_size=320", "data.auto_prepare=false",
        "model.max_seq_len=64", "batch.seq_len=64", "batch.micro_batch=4", "batch.total_tokens=256", "optim.max_steps=30",
        "optim.warmup_steps=3", "eval.interval=10", "eval.val_tokens=1024", "eval.hellaswag=true",
        f"eval.hellaswag_file={hellaswag}", "eval.sample_tokens=8", "device=cpu", "compile=false", "checkpoint.interval=15",
    ])
    train(config)
    return base / "run"


@pytest.mark.slow
def test_training_logs_hellaswag_bits_per_byte_and_samples(tiny_run_dir):
    records = [json.loads(line) for line in (tiny_run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert all(r["hellaswag_examples"] == 8 and r["val_bits_per_byte"] > 0 for r in evals)
    # The last evaluation follows the last update, so the final checkpoint scores what was logged.
    model, _ = load_checkpoint(tiny_run_dir / "checkpoints" / "step_0000030")
    examples = load_examples(tiny_run_dir.parent / "hs.jsonl")
    fresh = evaluate_hellaswag(model, Tokenizer(tiny_run_dir / "checkpoints" / "step_0000030" / "tokenizer.model"), examples, 3)
    assert fresh["acc_norm"] == evals[-1]["hellaswag_acc_norm"]
    assert len([r for r in records if r["kind"] == "samples"][-1]["samples"]) == 2  # 2 prompts x 1 sample (tiny.toml)


@pytest.mark.slow
def test_plot_and_report(tiny_run_dir, tmp_path):
    image = plot_runs([tiny_run_dir, tiny_run_dir], tmp_path / "curves.png")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = write_report(tiny_run_dir, tmp_path / "report.md").read_text()
    records = [json.loads(line) for line in (tiny_run_dir / "metrics.jsonl").read_text().splitlines()]
    min_val = min(r["val_loss"] for r in records if r["kind"] == "eval")
    assert f"min val loss: {min_val:.4f}" in report and "![training curves](report_curves.png)" in report
    assert "completion-style" in report and "## Samples at step 30" in report and "(chance 25%)" in report
    samples = [r for r in records if r["kind"] == "samples"][-1]["samples"]
    assert f"Sample 0:\n\n```text\n{samples[0]}\n```" in report  # as written, not a Python repr
    assert (tmp_path / "report_curves.png").is_file() and (tmp_path / "curves.png").read_bytes() == image.read_bytes()
    write_report(tiny_run_dir, tmp_path / "report.md")  # again: its own image is replaced
    (tmp_path / "summary_curves.png").write_bytes(b"the user's")
    with pytest.raises(MiniLlamaError, match="summary_curves.png exists and no earlier report at .*summary.md made it"):
        write_report(tiny_run_dir, tmp_path / "summary.md")
    assert (tmp_path / "summary_curves.png").read_bytes() == b"the user's" and not (tmp_path / "summary.md").exists()


def test_curves_draw_the_reference_loss_only_for_runs_like_it(tiny_run_dir):
    import matplotlib

    matplotlib.use("Agg")
    run = load_run(tiny_run_dir)
    assert not run.like_reference  # its own 320-token tokenizer, synthetic text
    loss_ax, bpb_ax, hella_ax = curves_figure([run]).axes[:3]
    assert not any("reference" in line.get_label() for line in loss_ax.get_lines())
    assert [list(line.get_ydata()) for line in bpb_ax.get_lines()] == [[r["val_bits_per_byte"] for r in run.evals]]
    assert [line.get_label() for line in loss_ax.get_legend().get_lines()][:2] == [  # the raw line is named too
        f"{run.name} train, each step", f"{run.name} train, smoothed ({run.tokenizer})"]
    references = [line for line in hella_ax.get_lines() if "reference" in line.get_label() or "GPT" in line.get_label()]
    assert len({line.get_color() for line in references}) == len(references) == 4  # told apart by colour and by name
    assert sorted(text.get_text() for text in hella_ax.texts) == sorted(line.get_label().split(":")[0] for line in references)
    [chance] = [line for line in hella_ax.get_lines() if line.get_label().startswith("chance")]
    assert list(chance.get_ydata()) == [0.25, 0.25]
    # The two closest references (30.34% and 30.68%) are named at opposite ends of their lines.
    ends = {text.get_text(): text.get_horizontalalignment() for text in hella_ax.texts}
    assert ends["reference mini-llama-109M"] != ends["GPT-2 124M reproduction"]

    run.run.update(tokenizer_sha256=LLAMA2_TOKENIZER_SHA256, data_source=FineWebEdu("sample-10BT").describe())
    run.evals = [{k: v for k, v in r.items() if not k.startswith("hellaswag")} for r in run.evals]
    figure = curves_figure([run])
    loss_ax = figure.axes[0]
    assert any(line.get_label().startswith("reference mini-llama-109M: 2.7095") for line in loss_ax.get_lines())
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == [
        "Loss (per token; comparable only within a tokenizer)", "Validation bits per byte (comparable across tokenizers)"]
    assert figure.get_suptitle().startswith("No HellaSwag evaluations in these runs, so no HellaSwag panel")


@pytest.mark.slow
def test_plot_of_a_run_in_progress_and_of_no_run(tmp_path, tiny_run_dir, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (tiny_run_dir / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(l for l in lines if '"kind": "eval"' not in l)[:-20])  # cut mid-line
    assert plot_runs([partial], tmp_path / "p.png").is_file()
    assert main(["plot", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_notebooks_run_where_jupyter_starts_them(tiny_run_dir, tmp_path, monkeypatch):
    """As a user runs them: from examples/ of a checkout whose runs/tiny holds the README's run, no variables set.
    Outputs land in runs/, which git ignores, not beside the notebooks."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    checkout = tmp_path / "checkout"
    (checkout / "examples").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    (checkout / "runs").mkdir()
    (checkout / "runs" / "tiny").symlink_to(tiny_run_dir)
    for variable in ("MINILLAMA_CHECKPOINT", "MINILLAMA_RUN_DIRS"):
        monkeypatch.delenv(variable, raising=False)
    for name in ("infer.ipynb", "visualize.ipynb"):
        notebook = nbformat.read(f"examples/{name}", as_version=4)
        nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                resources={"metadata": {"path": str(checkout / "examples")}}).execute()
        errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
        assert not errors, errors
    assert (checkout / "runs" / "curves.png").is_file() and list((checkout / "examples").iterdir()) == []
    assert "/runs/" in Path(".gitignore").read_text().split()


@pytest.mark.slow
def test_eval_loss_command_reproduces_the_logged_val_loss(tiny_run_dir, capsys):
    """The final evaluation runs after the last update, on the weights the final checkpoint holds."""
    records = [json.loads(line) for line in (tiny_run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["kind"] == "eval"][-1]
    # without --data: the run's own data.dir (its config.toml names it)
    assert main(["eval", "loss", str(tiny_run_dir), "--tokens", "1024", "--seq-len", "64", "--batch-size", "4", "--json"]) == 0
    out, err = capsys.readouterr()
    assert f"scoring {tiny_run_dir.parent / 'data'}, the run's data.dir" in err
    measured = json.loads(out)
    assert abs(measured["loss"] - logged["val_loss"]) < 1e-5
    assert abs(measured["bits_per_byte"] - logged["val_bits_per_byte"]) < 1e-5


def test_report_text_blocks_fence_over_any_backticks_inside():
    from minillama.eval.report import text_block

    assert text_block("plain") == "```text\nplain\n```"
    assert text_block("a ```code``` and ````more````") == "`````text\na ```code``` and ````more````\n`````"


def test_eval_loss_of_a_run_finds_its_relative_data_dir_from_another_folder(tmp_path, corpus_file, tokenizer, monkeypatch, capsys):
    """A run trained with data.dir = "data" (relative to where training ran) is scored from any folder: the
    checkpoint records the data folder as training resolved it."""
    from training import tiny_run

    from minillama.data.sources import LocalFiles
    from minillama.train.config import load_train_config
    from minillama.train.loop import train

    work = tmp_path / "work"
    prepare(LocalFiles([str(corpus_file)], split_paragraphs=True), work / "data", tokenizer, shard_tokens=20_000,
            val_tokens=4_096, progress=False)
    monkeypatch.chdir(work)
    tiny_config = Path(__file__).parents[1] / "configs" / "tiny.toml"
    train(load_train_config(tiny_config, [*tiny_run(work, "data", tokenizer, "stop_at_step=4"), "run_dir=run"]))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "loss", str(work / "run"), "--tokens", "128", "--seq-len", "64"]) == 0
    captured = capsys.readouterr()
    assert f"scoring {work / 'data'}, the run's data.dir" in captured.err and captured.out.startswith("val loss ")


def test_a_report_of_an_interrupted_run_says_how_far_it_got_and_counts_only_the_time_it_ran(tmp_path):
    """Sessions of 20 s and 10 s, stopped for an hour between them, 3 of 10 planned steps: the report says so."""
    from minillama.eval.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    records = [{"kind": "session", "step": 0, "planned_steps": 10, "time": 1000.0},
               {"kind": "train", "step": 0, "loss": 5.0, "tokens_seen": 8, "step_time_s": 10.0, "tokens_per_s": 0.8, "time": 1010.0},
               {"kind": "train", "step": 1, "loss": 4.0, "tokens_seen": 16, "step_time_s": 10.0, "tokens_per_s": 0.8, "time": 1020.0},
               {"kind": "session", "step": 2, "planned_steps": 10, "time": 4620.0},
               {"kind": "train", "step": 2, "loss": 3.0, "tokens_seen": 24, "step_time_s": 10.0, "tokens_per_s": 0.8, "time": 4630.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report(run).read_text()
    assert "- steps: 3 of 10 planned, incomplete; tokens seen: 24" in text
    assert f"wall time {30 / 3600:.2f} h" in text  # 20 s + 10 s, not the 3,630 s from first to last record


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a person's is."""

    def isatty(self):
        return True


def test_eval_loss_and_hellaswag_show_progress_on_a_terminal_and_nothing_in_a_pipe(tmp_path, data_dir, tokenizer, monkeypatch, capsys):
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=320, multiple_of=16, max_seq_len=64))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    loss = ["eval", "loss", str(tmp_path / "ckpt"), "--data", str(data_dir), "--tokens", "512", "--seq-len", "64", "--batch-size", "2"]
    hellaswag = ["eval", "hellaswag", str(tmp_path / "ckpt"), "--data", str(write_examples(tmp_path / "hs.jsonl", 6)), "--batch-size", "2"]
    for argv, bar in ((loss, "scoring: 100%"), (hellaswag, "HellaSwag: 100%")):
        assert main(argv) == 0
        assert bar.split(":")[0] not in capsys.readouterr().err  # a pipe gets no bar
        terminal = Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        assert main(argv) == 0
        monkeypatch.undo()
        assert bar in terminal.getvalue() and "<00:00" in terminal.getvalue()  # done, and the time it had left


def test_the_reference_val_loss_is_drawn_only_beside_curves_it_compares_with():
    """2.7095 is a per-token loss of the Llama 2 tokenizer on FineWeb-Edu: drawn for such runs alone, never beside a
    512-token run's curve (which it would seem to lose to); legends name tokenizers by vocabulary and fingerprint."""
    from minillama.eval.plot import REFERENCE_DATA, RunCurves, curves_figure, tokenizer_label
    from minillama.tokenizer import LLAMA2_TOKENIZER_SHA256

    def run(name, sha, vocab, data):
        record = {"tokenizer_sha256": sha, "vocab_size": vocab, "data_source": data}
        train = [{"step": s, "loss": 4.0 - s / 10, "tokens_seen": 8 * (s + 1)} for s in range(5)]
        return RunCurves(name=name, tokenizer=tokenizer_label(record), tokens_per_step=8, train=train, run=record)

    reference_like = run("big", LLAMA2_TOKENIZER_SHA256, 32000, REFERENCE_DATA)
    small = run("tiny", "ab" * 32, 512, {"kind": "text"})

    def has_reference_line(runs):
        loss_ax = curves_figure(runs).axes[0]
        return any("2.7095" in label for label in loss_ax.get_legend_handles_labels()[1])

    assert has_reference_line([reference_like]) and not has_reference_line([reference_like, small])
    assert not has_reference_line([small])
    assert (reference_like.tokenizer, small.tokenizer) == ("Llama 2, vocab 32000", "vocab 512, sha256 abababab")
