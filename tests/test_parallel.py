"""FSDP2 sharding, activation checkpointing and sharded checkpoints, on the CPU with gloo: each checked against a
plain one-process run of the same recipe, or against an uninterrupted run."""

import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import write_examples
from training import config_file, run_cli, start_run_until_step, tiny_run, torchrun, train_losses

from minillama.checkpoint import SHARDED_DIR, WEIGHTS_FILE, load_checkpoint, model_state_dict
from minillama.errors import MiniLlamaError
from minillama.cli import main
from minillama.train.config import load_train_config
from minillama.distributed import close_distributed, init_distributed
from minillama.train.loop import open_run, train

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo via torchrun is not set up on Windows runners")

STEPS = 20


def fsdp_run(tmp_path, data_dir, tokenizer, *extra):
    """The tiny run at 1,024 tokens per step (4 micro-steps on one process, 2 on each of two ranks), 20 steps,
    checkpoints every 4, and HellaSwag on 7 examples, so the two ranks score 4 and 3."""
    hellaswag = write_examples(tmp_path / "hellaswag.jsonl", 7)
    return tiny_run(tmp_path, data_dir, tokenizer, f"stop_at_step={STEPS}", "batch.total_tokens=1024", "eval.interval=8",
                    "eval.hellaswag=true", f"eval.hellaswag_file={hellaswag}", "eval.num_samples=1", "eval.sample_tokens=8",
                    "checkpoint.keep_last=10", *extra)


@pytest.fixture(scope="module")
def two_rank_fsdp(tmp_path_factory, data_dir, tokenizer):
    """An uninterrupted 2-rank fsdp run, with full activation checkpointing."""
    folder = tmp_path_factory.mktemp("fsdp")
    overrides = fsdp_run(folder, data_dir, tokenizer, "parallel=fsdp", "activation_checkpointing=full")
    run_cli(*torchrun(2, "train", "--config", str(config_file(folder, overrides)))[1:], env_extra={"OMP_NUM_THREADS": "1"})
    return folder, overrides


@pytest.mark.slow
def test_two_rank_fsdp_matches_one_process_with_double_accumulation(tmp_path, data_dir, tokenizer, two_rank_fsdp):
    folder, _ = two_rank_fsdp
    train(load_train_config("configs/tiny.toml", fsdp_run(tmp_path, data_dir, tokenizer)))
    single, single_records = train_losses(tmp_path / "run")
    sharded, sharded_records = train_losses(folder / "run")
    assert [r["accumulation"] for r in single_records if r["kind"] == "run"] == [4]
    assert [r["accumulation"] for r in sharded_records if r["kind"] == "run"] == [2]
    assert len(single) == len(sharded) == STEPS
    assert max(abs(a - b) for a, b in zip(single, sharded)) < 1e-5
    norms = [[r["grad_norm"] for r in records if r["kind"] == "train"] for records in (single_records, sharded_records)]
    assert max(abs(a - b) / a for a, b in zip(*norms)) < 1e-4  # the norm over both ranks' slices, not one rank's
    evals = [[r for r in records if r["kind"] == "eval"] for records in (single_records, sharded_records)]
    assert [r["step"] for r in evals[1]] == [0, 8, 16, 20]
    assert max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(*evals)) < 1e-5
    assert [(r["hellaswag_examples"], r["hellaswag_acc_norm"]) for r in evals[0]] == \
        [(r["hellaswag_examples"], r["hellaswag_acc_norm"]) for r in evals[1]]
    samples = [[r["samples"] for r in records if r["kind"] == "samples"] for records in (single_records, sharded_records)]
    assert len(samples[1]) == 4 and all(len(s) == 2 for s in samples[1])  # rank 0 samples alone, on gathered weights


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_losses(tmp_path, data_dir, tokenizer, mode):
    """Recomputed activations replay the forward's dropout masks, so the gradients are the same."""
    losses = {}
    for name in ("none", mode):
        overrides = tiny_run(tmp_path / name, data_dir, tokenizer, "stop_at_step=6", "model.dropout=0.1",
                             f"activation_checkpointing={name}")
        train(load_train_config("configs/tiny.toml", overrides))
        losses[name] = train_losses(tmp_path / name / "run")[0]
    assert len(losses[mode]) == 6
    assert max(abs(a - b) for a, b in zip(losses["none"], losses[mode])) < 1e-6


@pytest.mark.slow
def test_sharded_checkpoint_reads_as_a_whole_model(two_rank_fsdp, capsys):
    """generate, eval, export and inspect load any checkpoint through load_checkpoint: an fsdp run's reads whole."""
    folder, _ = two_rank_fsdp
    checkpoint = folder / "run" / "checkpoints" / f"step_{STEPS:07d}"
    assert (checkpoint / SHARDED_DIR).is_dir() and not (checkpoint / WEIGHTS_FILE).exists()
    shards = sorted(p.name for p in (checkpoint / SHARDED_DIR).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # every rank wrote its part
    model, info = load_checkpoint(checkpoint)
    assert info.metadata["step"] == STEPS
    weights = model_state_dict(model)
    assert "output.weight" not in weights and model.output.weight is model.tok_embeddings.weight
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert main(["inspect", str(folder / "run")]) == 0
    assert main(["generate", str(folder / "run"), "the cat", "--max-new-tokens", "4", "--device", "cpu", "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert f"step_{STEPS:07d}" in captured.err and "Sample 3: the cat" in captured.out
    assert main(["export", "hf", str(checkpoint), str(folder / "hf")]) == 0
    assert (folder / "hf" / "model.safetensors").is_file()


def kill_group(process):
    """kill -9 torchrun and its workers at once, as a crashed node would stop them."""
    import os

    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_fsdp_resume_after_kill_on_two_ranks_equals_uninterrupted_and_reshards_to_one_and_back(tmp_path, data_dir, tokenizer, two_rank_fsdp):
    straight_folder, overrides = two_rank_fsdp
    straight, _ = train_losses(straight_folder / "run")
    killed = tmp_path / "killed"
    # kill -9 once step 9 is logged: after the step-8 checkpoint, mid-interval
    process, command = start_run_until_step(killed, overrides, 9, nproc=2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True, env_extra={"OMP_NUM_THREADS": "1"})
    kill_group(process)
    step_8 = killed / "run" / "checkpoints" / "step_0000008"
    assert step_8.is_dir()
    one_rank = tmp_path / "one"
    shutil.copytree(killed, one_rank)

    run_cli(*command[1:], "--resume", env_extra={"OMP_NUM_THREADS": "1"})
    assert train_losses(killed / "run")[0] == straight  # bit for bit on the same two ranks

    # 2 -> 1: one process reads both ranks' shards into its own, whole, and continues from step 8.
    one_overrides = [*overrides, f"run_dir={one_rank / 'run'}", "stop_at_step=12"]  # 4 micro-steps of 4 where each rank did 2
    one_config = load_train_config("configs/tiny.toml", one_overrides)
    ctx = init_distributed(one_config.device, alone_as_group=True)
    try:
        with open_run(one_config, "always", ctx) as run:
            assert run.state.step == 8
            resumed = {key: value.full_tensor() for key, value in model_state_dict(run.model).items()}
    finally:
        close_distributed(ctx)
    consolidated = model_state_dict(load_checkpoint(step_8)[0])
    assert resumed.keys() == consolidated.keys()
    assert all(torch.equal(resumed[key], consolidated[key]) for key in consolidated)
    train(one_config, resume="always")
    one_losses = train_losses(one_rank / "run")[0]
    assert len(one_losses) == 12
    assert max(abs(a - b) for a, b in zip(one_losses[8:], straight[8:12])) < 1e-5

    # 1 -> 2: two ranks continue the one-process run's step-12 checkpoint.
    run_cli(*command[1:], "--set", f"run_dir={one_rank / 'run'}", "--set", "stop_at_step=16", "--resume",
            env_extra={"OMP_NUM_THREADS": "1"})
    both = train_losses(one_rank / "run")[0]
    assert len(both) == 16
    assert max(abs(a - b) for a, b in zip(both[12:], straight[12:16])) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_one_rank_fsdp_equals_the_plain_run_with_a_tied_or_untied_head(tmp_path, data_dir, tokenizer, tie):
    """A tied head is one parameter sharded once (the root holds both names); an untied one is its own parameter."""
    losses, weights = {}, {}
    for parallel in ("ddp", "fsdp"):
        overrides = tiny_run(tmp_path / parallel, data_dir, tokenizer, "stop_at_step=4", f"model.tie_embeddings={str(tie).lower()}",
                             f"parallel={parallel}")
        train(load_train_config("configs/tiny.toml", overrides))
        losses[parallel] = train_losses(tmp_path / parallel / "run")[0]
        model = load_checkpoint(tmp_path / parallel / "run" / "checkpoints" / "step_0000004")[0]
        weights[parallel] = model_state_dict(model)
        assert (model.output.weight is model.tok_embeddings.weight) == tie
    assert len(losses["fsdp"]) == 4 and max(abs(a - b) for a, b in zip(losses["ddp"], losses["fsdp"])) < 1e-6
    assert weights["ddp"].keys() == weights["fsdp"].keys()
    assert all(torch.allclose(weights["ddp"][k], weights["fsdp"][k], atol=1e-6) for k in weights["ddp"])


@pytest.mark.slow
def test_two_rank_fsdp_with_muon_and_samples_on_rank_0_alone_matches_one_process(tmp_path, data_dir, tokenizer):
    """Muon orthogonalises whole matrices; under FSDP each rank holds a slice of each, and the iteration (and the
    cautious decay's sign test) on those sharded tensors must still act on the whole matrix. Rank 0 samples while
    rank 1 goes straight on to the next step (no HellaSwag to keep them together): the sampling must not touch
    FSDP's state, or the next step's gathers differ across ranks (gloo aborts)."""
    overrides = tiny_run(tmp_path, data_dir, tokenizer, "stop_at_step=6", "batch.total_tokens=1024", "optim.name=muon",
                         "optim.schedule=wsd", "checkpoint.interval=1000", "optim.muon_orthogonalization=polar_express",
                         "optim.muon_weight_decay=0.1", "optim.muon_cautious_weight_decay=true", "eval.interval=2",
                         "eval.num_samples=2", "eval.sample_tokens=12")
    train(load_train_config("configs/tiny.toml", overrides))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    run_cli(*torchrun(2, "train", "--config", str(config_file(sharded, overrides)), "--set", f"run_dir={sharded / 'run'}",
                      "--set", "parallel=fsdp")[1:], env_extra={"OMP_NUM_THREADS": "1"})
    (single, single_records), (double, double_records) = train_losses(tmp_path / "run"), train_losses(sharded / "run")
    assert len(single) == len(double) == 6 and max(abs(a - b) for a, b in zip(single, double)) < 1e-5
    samples = [[r["samples"] for r in records if r["kind"] == "samples"] for records in (single_records, double_records)]
    assert len(samples[1]) == 4 and samples[0] == samples[1]  # steps 0, 2, 4, 6: the same text from gathered weights


@pytest.mark.slow
def test_fsdp_compiles_each_block_and_gives_the_eager_losses(tmp_path, data_dir, tokenizer):
    """torch.compile per block (inductor on the CPU), under FSDP and selective checkpointing; evaluation and
    sampling in between run the compiled blocks eagerly, at other shapes."""
    losses = {}
    for name, extra in [("eager", ["compile=false"]),
                        ("compiled", ["compile=true", "parallel=fsdp", "activation_checkpointing=selective"])]:
        overrides = tiny_run(tmp_path / name, data_dir, tokenizer, "stop_at_step=3", "eval.interval=2", "eval.num_samples=1",
                             "eval.sample_tokens=4", *extra)
        train(load_train_config("configs/tiny.toml", overrides))
        _, records = train_losses(tmp_path / name / "run")
        losses[name] = [r["loss"] for r in records if r["kind"] == "train"] + [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert len(losses["compiled"]) == 3 + 3
    assert max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])) < 1e-5


def test_resuming_from_a_checkpoint_that_lost_a_shard_is_one_line(tmp_path, data_dir, tokenizer):
    overrides = tiny_run(tmp_path, data_dir, tokenizer, "stop_at_step=4", "parallel=fsdp")
    train(load_train_config("configs/tiny.toml", overrides))
    shard = tmp_path / "run" / "checkpoints" / "step_0000004" / SHARDED_DIR / "__0_0.distcp"
    shard.unlink()
    with pytest.raises(MiniLlamaError, match=r"sharded cannot be read \(.*__0_0.distcp.*\); resume from an older checkpoint"):
        train(load_train_config("configs/tiny.toml", [*overrides, "stop_at_step=8"]))
