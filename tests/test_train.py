import json
import math
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_corpus, write_examples
from training import config_file, resume_in_this_process, run_cli, start_run_until_step, tiny_run, train_losses, uninterrupted_losses

from minillama.checkpoint import read_checkpoint_info
from minillama.data.shards import read_manifest
from minillama.errors import MiniLlamaError
from minillama.files import DirectoryLock
from minillama.config import ModelConfig, to_dict
from minillama.data.prepare import prepare
from minillama.data.sources import LocalFiles
from minillama.model import Transformer
from minillama.train.config import OptimConfig, load_train_config
from minillama.train.loop import train
from minillama.train.memory import gradient_accumulation_steps
from minillama.train.optim import build_optimizer, learning_rate


def unigram_entropy(data_dir):
    manifest = read_manifest(data_dir)
    tokens = np.concatenate([np.fromfile(data_dir / s["file"], dtype=manifest["dtype"]) for s in manifest["shards"] if s["split"] == "train"])
    p = np.bincount(tokens) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_loss_falls_well_below_unigram_entropy(tmp_path, data_dir, tokenizer):
    """A model that learned nothing beyond token frequencies scores the unigram entropy; the grammar of the
    corpus makes much lower loss reachable, and 40 steps of the tiny model must get a good part of the way (they
    reach about a quarter of it; 90 steps, a ninth)."""
    config = load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, "stop_at_step=40", "checkpoint.interval=1000"))
    train(config)
    losses, records = train_losses(tmp_path / "run")
    final_val = [r for r in records if r["kind"] == "eval"][-1]
    entropy = unigram_entropy(data_dir)
    assert losses[0] > math.log(320) - 0.5  # starts near uniform over the vocabulary
    assert final_val["val_loss"] < 0.6 * entropy, (final_val["val_loss"], entropy)


# Every training-only option of the speedrun recipe; max_steps=16 puts the momentum cooldown inside the tested steps.
SPEEDRUN_OPTIONS = ["optim.muon_momentum_warmup_steps=10", "optim.muon_momentum_cooldown_steps=6", "optim.max_steps=16",
                    "zero_init_projections=true", "optim.embedding_lr_multiplier=2", "optim.norm_lr_multiplier=0.5",
                    "optim.muon_orthogonalization=polar_express", "optim.muon_weight_decay=0.1", "optim.muon_cautious_weight_decay=true"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [[], ["optim.name=muon", "optim.schedule=wsd", "optim.decay_fraction=0.5", *SPEEDRUN_OPTIONS,
                                         "batch.stages=[[12, 256]]"]],  # resumed at step 8, inside the stage
                         ids=["adamw", "muon"])
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, data_dir, tokenizer, recipe):
    overrides = tiny_run(tmp_path, data_dir, tokenizer, "stop_at_step=14", "model.dropout=0.1", *recipe)
    expected = uninterrupted_losses(tmp_path, overrides)
    killed = tmp_path / "killed"
    # kill -9 once step 9 is logged: after the step-8 checkpoint, mid-interval
    process, _ = start_run_until_step(killed, overrides, 9, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert sorted(p.name for p in (killed / "run" / "checkpoints").iterdir() if p.name.startswith("step_"))[-1] <= "step_0000012"
    resume_in_this_process(killed)
    resumed, _ = train_losses(killed / "run")
    assert len(resumed) == len(expected) == 14
    assert resumed == expected  # bit for bit: same weights, optimizer, data position and dropout RNG
    kept = sorted(p.name for p in (killed / "run" / "checkpoints").iterdir())
    assert kept == ["step_0000012", "step_0000014"]  # keep_last=2, the final step always saved
    saved = json.loads((killed / "run" / "checkpoints" / "step_0000014" / "config.json").read_text())["metadata"]["run_config"]
    assert saved == json.loads(json.dumps(to_dict(load_train_config(killed / "run" / "config.toml"))))  # every option, in the checkpoint


@pytest.mark.slow
def test_sigterm_saves_the_last_finished_step_and_the_resume_equals_an_uninterrupted_run(tmp_path, data_dir, tokenizer):
    """What SLURM preemption sends: the run stops after the step in flight with a checkpoint of it (not the last
    interval's), says so in one line, exits 143, and resuming loses nothing."""
    overrides = tiny_run(tmp_path, data_dir, tokenizer, "stop_at_step=14", "checkpoint.interval=100")
    expected = uninterrupted_losses(tmp_path, overrides)
    stopped = tmp_path / "stopped"
    process, _ = start_run_until_step(stopped, overrides, 5, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143, stderr
    steps_done = len(train_losses(stopped / "run")[0])
    checkpoint = stopped / "run" / "checkpoints" / f"step_{steps_done:07d}"
    last_logged = [r["step"] for r in train_losses(stopped / "run")[1] if r["kind"] == "train"][-1]
    assert last_logged == steps_done - 1  # the log counts from step 0; the checkpoint counts the steps done
    assert stderr.strip().splitlines()[-1] == (f"minillama: stopped by SIGTERM after {steps_done} steps (steps 0 to {last_logged}, "
                                               f"as the log numbers them); saved {checkpoint}; run the same command to resume")
    assert 6 <= steps_done < 14 and checkpoint.is_dir()
    resume_in_this_process(stopped)
    assert train_losses(stopped / "run")[0] == expected


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="gloo via torchrun is not set up on Windows runners")
@pytest.mark.parametrize("recipe", [[], ["optim.name=muon", "optim.schedule=wsd", *SPEEDRUN_OPTIONS, "batch.stages=[[3, 512]]"]],
                         ids=["adamw", "muon"])
def test_two_process_ddp_matches_one_process_with_double_accumulation(tmp_path, data_dir, tokenizer, recipe):
    hellaswag = write_examples(tmp_path / "hellaswag.jsonl", 7)  # odd: the two ranks score 4 and 3 examples
    common = tiny_run(tmp_path, data_dir, tokenizer, "stop_at_step=5", "batch.total_tokens=1024", "checkpoint.interval=1000",
                      "eval.hellaswag=true", f"eval.hellaswag_file={hellaswag}", *recipe)
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
    train(load_train_config(config_file(one, common), [f"run_dir={one / 'run'}"]))
    run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minillama", "train",
            "--config", str(config_file(two, common)), "--set", f"run_dir={two / 'run'}",
            env_extra={"OMP_NUM_THREADS": "1"})
    single, single_records = train_losses(one / "run")
    double, double_records = train_losses(two / "run")
    assert [r["accumulation"] for r in single_records if r["kind"] == "run"] == [4]
    assert [r["accumulation"] for r in double_records if r["kind"] == "run"] == [2]
    expected_tokens = [512, 512, 512, 1024, 1024] if recipe else [1024] * 5  # batch.stages: 512 before step 3
    assert [r["tokens"] for r in double_records if r["kind"] == "train"] == expected_tokens
    assert len(single) == len(double) == 5
    tolerance = 1e-5
    assert max(abs(a - b) for a, b in zip(single, double)) < tolerance
    evals_single = [r for r in single_records if r["kind"] == "eval"]
    evals_double = [r for r in double_records if r["kind"] == "eval"]
    assert max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(evals_single, evals_double)) < tolerance
    assert [(r["hellaswag_examples"], r["hellaswag_acc_norm"]) for r in evals_single] == \
        [(r["hellaswag_examples"], r["hellaswag_acc_norm"]) for r in evals_double]
    assert evals_double[0]["hellaswag_examples"] == 7


def test_batch_stages_give_each_step_its_tokens_and_the_plan_counts_them():
    from minillama.train.config import BatchConfig
    from minillama.train.plan import plan_line

    batch = BatchConfig(total_tokens=1024, seq_len=64, stages=[(3, 256), (5, 512)])
    assert [batch.tokens_at(step) for step in range(7)] == [256, 256, 256, 512, 512, 1024, 1024]
    assert batch.tokens_between(0, 7) == 3 * 256 + 2 * 512 + 2 * 1024
    assert batch.tokens_between(4, 6) == 512 + 1024 and batch.tokens_between(6, 6) == 0
    config = load_train_config("configs/tiny.toml", ["batch.total_tokens=1024", "batch.seq_len=64", "batch.micro_batch=4",
                                                     "batch.stages=[[3, 256], [5, 512]]", "optim.max_steps=7", "optim.warmup_steps=1"])
    assert plan_line(config, 4) == "plan: 2.6k tokens in 3 steps of 1,024 (512 before step 5) (steps 4 to 6 of 7)"
    assert load_train_config(None, ["batch.stages=[[200, 131072]]"]).batch.stages == [(200, 131_072)]


def test_batch_arithmetic_error_proposes_valid_values():
    assert gradient_accumulation_steps(524_288, 64, 1024, 8) == 1
    assert gradient_accumulation_steps(524_288, 16, 1024, 1) == 32
    with pytest.raises(MiniLlamaError, match=r"524,288 is not a multiple of micro_batch 48 x seq_len 1024 x 1 ranks = 49,152; use micro_batch .*64.*batch.total_tokens 540,672"):
        gradient_accumulation_steps(524_288, 48, 1024, 1)


def test_missing_data_names_the_prepare_command(tmp_path, tokenizer):
    config = load_train_config("configs/mini-llama-109M.toml", [f"data.dir={tmp_path / 'nothing'}", f"data.tokenizer={tokenizer.path}",
                                                                  "model.vocab_size=320", "device=cpu"])
    with pytest.raises(MiniLlamaError, match=r"holds no prepared data; make it with: minillama prepare fineweb-edu --subset sample-10BT --out .*nothing"):
        train(config)


def test_tokenizer_vocab_must_match_model(tmp_path, data_dir, tokenizer):
    config = load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, "model.vocab_size=512"))
    with pytest.raises(MiniLlamaError, match="has vocab 320, model.vocab_size has 512"):
        train(config)


@pytest.mark.slow
def test_nonfinite_loss_stops_with_step_or_is_skipped(tmp_path, data_dir, tokenizer):
    explode = tiny_run(tmp_path, data_dir, tokenizer, "optim.lr=1e30", "optim.warmup_steps=0", "stop_at_step=6", "checkpoint.interval=1")
    with pytest.raises(MiniLlamaError, match=r"step \d+: loss .* is not finite; stopped \(the last good checkpoint is .*step_"):
        train(load_train_config("configs/tiny.toml", explode))
    skipped = load_train_config("configs/tiny.toml", explode + [f"run_dir={tmp_path / 'skip'}", "on_nonfinite=skip"])
    train(skipped)
    assert len(train_losses(tmp_path / "skip")[0]) == 6


def test_reference_config_is_the_reference_recipe():
    config = load_train_config("configs/mini-llama-109M.toml")
    assert (config.batch.total_tokens, config.batch.micro_batch, config.batch.seq_len) == (524_288, 64, 1024)
    assert (config.optim.lr, config.optim.min_lr, config.optim.warmup_steps, config.optim.max_steps) == (6e-4, 6e-5, 715, 19_073)
    assert config.model.dim == 768 and config.seed == 1337
    assert learning_rate(0, config.optim) == pytest.approx(6e-4 / 715)
    assert learning_rate(714, config.optim) == pytest.approx(6e-4)
    assert learning_rate(19_073, config.optim) == pytest.approx(6e-5)
    midpoint = 715 + (19_073 - 715) // 2
    assert learning_rate(midpoint, config.optim) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)


def test_bad_config_fields(tmp_path):
    with pytest.raises(MiniLlamaError, match=r"^--set optim.lrate=1: the \[optim\] table has no field 'lrate'; its fields are name, schedule, lr, "):
        load_train_config("configs/tiny.toml", ["optim.lrate=1"])
    with pytest.raises(MiniLlamaError, match=r"^--set model.width=1: the \[model\] table has no field 'width'"):
        load_train_config("configs/tiny.toml", ["model.width=1"])
    (tmp_path / "typo.toml").write_text("[optim]\nlrate = 1\n")
    with pytest.raises(MiniLlamaError, match=r"typo.toml: field 'optim': unknown field 'lrate'"):
        load_train_config(tmp_path / "typo.toml")
    with pytest.raises(MiniLlamaError, match="'batch.seq_len' is 512; expected at most model.max_seq_len=256"):
        load_train_config("configs/tiny.toml", ["batch.seq_len=512"])
    with pytest.raises(MiniLlamaError, match="does not exist"):
        load_train_config(tmp_path / "none.toml")


def test_auto_prepare_refuses_data_made_from_other_files(tmp_path, corpus_file, tokenizer):
    other = tmp_path / "other.txt"
    other.write_text(corpus_file.read_text()[:50_000])
    common = [f"data.dir={tmp_path / 'data'}", f"data.tokenizer={tokenizer.path}", "model.vocab_size=320", "data.val_tokens=2048",
              f"run_dir={tmp_path / 'run'}", "device=cpu", "compile=false", "stop_at_step=1", "eval.num_samples=0",
              "batch.seq_len=64", "batch.micro_batch=4", "batch.total_tokens=256", "eval.val_tokens=256"]
    train(load_train_config("configs/tiny.toml", common + [f'data.files=["{corpus_file}"]']))
    with pytest.raises(MiniLlamaError, match="was prepared from .*corpus.txt.*but the config names .*other.txt"):
        train(load_train_config("configs/tiny.toml", common + [f'data.files=["{other}"]', f"run_dir={tmp_path / 'run2'}"]))


def test_optimizer_decays_matrices_once_each_and_never_norm_gains(small_config):
    model = Transformer(small_config)  # tied: the head is the embedding matrix
    embedding, matrices, norms = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu")).param_groups
    assert embedding["weight_decay"] == matrices["weight_decay"] == 0.1 and norms["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # named_parameters lists a shared tensor once
    assert [names[id(p)] for p in embedding["params"]] == ["tok_embeddings.weight"]
    assert sorted(names[id(p)] for p in matrices["params"]) == sorted(n for n, p in model.named_parameters()
                                                                       if p.dim() == 2 and n.startswith("layers."))
    assert sorted(names[id(p)] for p in norms["params"]) == sorted(n for n in names.values() if n.endswith("norm.weight"))
    assert sum(len(g["params"]) for g in (embedding, matrices, norms)) == len(names) and "output.weight" not in names.values()


@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(small_config, tie):
    import dataclasses

    model = Transformer(dataclasses.replace(small_config, tie_embeddings=tie))
    optimizer = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]]
    adamw = [names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]]
    assert sorted(muon) == sorted(n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    expected_adamw = ["tok_embeddings.weight", "norm.weight"] + ([] if tie else ["output.weight"])
    assert sorted(adamw) == sorted(expected_adamw + [n for n in names.values() if n.startswith("layers.") and n.endswith("norm.weight")])
    assert len(muon) + len(adamw) == len(names)


def newton_schulz_numpy(matrix, steps=5, coefficients=(3.4445, -4.775, 2.0315)):
    """Reference: the quintic Newton-Schulz iteration of Muon, in float64, on the wide orientation."""
    a, b, c = coefficients
    x = matrix.T if matrix.shape[0] > matrix.shape[1] else matrix
    x = x / np.linalg.norm(x)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if matrix.shape[0] > matrix.shape[1] else x


def test_muon_update_is_the_orthogonalised_nesterov_momentum_scaled_by_shape():
    """One step from zero momentum: the update is NS5(g + mu * g), times muon_lr * sqrt(max(1, rows/cols))."""
    torch.manual_seed(0)
    layer = torch.nn.Module()
    layer.layers = torch.nn.ModuleList([torch.nn.Linear(8, 24, bias=False)])  # 24 x 8: taller than wide
    before = layer.layers[0].weight.detach().clone()
    gradient = torch.randn(24, 8)
    layer.layers[0].weight.grad = gradient.clone()
    config = OptimConfig(name="muon", muon_lr=0.02, muon_momentum=0.95)
    build_optimizer(layer, config, torch.device("cpu")).step()
    update = (before - layer.layers[0].weight.detach()).double().numpy()
    expected = 0.02 * math.sqrt(24 / 8) * newton_schulz_numpy((1 - 0.95 + 0.95 * (1 - 0.95)) * gradient.double().numpy())
    # On a CPU the iteration runs in float32: agreement to float32 rounding, where a wrong scale, transpose or
    # momentum term is off by tens of percent.
    assert np.abs(update - expected).max() < 1e-5 * np.abs(expected).max()
    singular = np.linalg.svd(update / (0.02 * math.sqrt(3)), compute_uv=False)
    assert 0.5 < singular.min() and singular.max() < 1.5  # near-orthogonal, as the quintic aims for


@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
def test_muon_in_bfloat16_takes_torch_optim_muons_steps(shape):
    """With the quintic Newton-Schulz in bfloat16 (what CUDA gets), three steps with weight decay and a changing
    rate equal torch.optim.Muon's bit for bit: the reference implementation."""
    from minillama.train.muon import Muon

    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape))
    theirs.data.copy_(ours.data)
    mine = Muon([ours], lr=0.02, momentum=0.95, weight_decay=0.1, dtype=torch.bfloat16)
    reference = torch.optim.Muon([theirs], lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True, adjust_lr_fn="original")
    for step in range(3):
        gradient = torch.randn(shape)
        for param, optimizer in ((ours, mine), (theirs, reference)):
            param.grad = gradient.clone()
            optimizer.param_groups[0]["lr"] = 0.02 / (step + 1)
            optimizer.step()
    assert torch.equal(ours, theirs)
    assert torch.equal(mine.state[ours]["momentum_buffer"], reference.state[theirs]["momentum_buffer"])


@pytest.mark.parametrize("shape", [(48, 128), (128, 48), (64, 64)])
def test_polar_express_lands_closer_to_the_polar_factor_than_newton_schulz(shape):
    """Reference: U V^T from NumPy's SVD in float64. Both take five quintic iterations; Polar Express's
    per-iteration coefficients end nearer to it."""
    from minillama.train.muon import orthogonalized

    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    u, _, vt = np.linalg.svd(matrix.double().numpy(), full_matrices=False)
    distance = {method: np.linalg.norm(orthogonalized(matrix, method, torch.float32).double().numpy() - u @ vt)
                for method in ("newton_schulz", "polar_express")}
    assert distance["polar_express"] < 0.7 * distance["newton_schulz"], distance
    singular = np.linalg.svd(orthogonalized(matrix, "polar_express", torch.float32).numpy(), compute_uv=False)
    assert singular.max() < 1.16  # the safety margin keeps every singular value from overshooting far past 1


def test_cautious_weight_decay_decays_only_where_the_update_shrinks_the_weight():
    """One Muon step with and without caution from the same state: they differ exactly by the decay of the
    entries whose update has the weight's sign is kept, the rest undecayed."""
    from minillama.train.muon import Muon, orthogonalized

    torch.manual_seed(0)
    weight, gradient = torch.randn(16, 8), torch.randn(16, 8)
    after = {}
    for cautious in (False, True):
        param = torch.nn.Parameter(weight.clone())
        param.grad = gradient.clone()
        Muon([param], lr=0.1, momentum=0.9, weight_decay=0.5, cautious_weight_decay=cautious).step()
        after[cautious] = param.detach()
    update = orthogonalized(gradient * (1 - 0.9 + 0.9 * (1 - 0.9)), "newton_schulz", torch.float32)
    same_sign = update * weight > 0
    assert 0 < same_sign.sum() < same_sign.numel()
    step = -0.1 * math.sqrt(2) * update
    assert torch.allclose(after[False], weight * (1 - 0.05) + step, atol=1e-6)
    assert torch.allclose(after[True], torch.where(same_sign, weight * (1 - 0.05), weight) + step, atol=1e-6)


def test_wsd_schedule_at_its_boundaries():
    config = OptimConfig(schedule="wsd", lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, decay_fraction=0.2)
    assert learning_rate(0, config) == pytest.approx(1e-4) and learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(10, config) == learning_rate(79, config) == pytest.approx(1e-3)  # stable until step 80
    assert learning_rate(80, config) == pytest.approx(1e-3)  # the decay starts from the peak
    assert learning_rate(90, config) == pytest.approx((1e-3 + 1e-4) / 2)
    assert learning_rate(100, config) == learning_rate(500, config) == pytest.approx(1e-4)
    extended = OptimConfig(schedule="wsd", lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=200, decay_fraction=0.2)
    assert all(learning_rate(s, extended) == learning_rate(s, config) for s in range(80))  # extending changes no past step
    from minillama.train.optim import set_learning_rates

    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16))
    muon = OptimConfig(name="muon", schedule="wsd", muon_lr=0.05, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    optimizer = build_optimizer(model, muon, torch.device("cpu"))
    # Muon's group first, then AdamW's two; Muon's rate follows the same schedule, scaled to muon_lr.
    assert set_learning_rates(optimizer, 4, muon) == pytest.approx(5e-4)  # warmup: 5 of 10 steps
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.025, 5e-4, 5e-4])
    assert set_learning_rates(optimizer, 90, muon) == pytest.approx(5.5e-4)  # wsd: halfway down its last fifth
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0275, 5.5e-4, 5.5e-4])


def three_step_losses(tmp_path, data_dir, tokenizer, *extra):
    """Train losses of 3 steps of 2 micro-batches of 2 x 16 tokens (small: fp16 matmuls are slow on a CPU)."""
    overrides = tiny_run(tmp_path, data_dir, tokenizer, "optim.max_steps=3", "optim.warmup_steps=1", "batch.seq_len=16",
                         "batch.micro_batch=2", "batch.total_tokens=64", "eval.val_tokens=64", *extra)
    train(load_train_config("configs/tiny.toml", overrides))
    return np.array(train_losses(tmp_path / "run")[0])


@pytest.fixture(scope="module")
def float32_losses(tmp_path_factory, data_dir, tokenizer):
    return three_step_losses(tmp_path_factory.mktemp("fp32"), data_dir, tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, overrides, tolerance",
    [
        ("bf16 autocast", ["dtype=bfloat16"], 2e-2),
        ("fp16 autocast + GradScaler", ["dtype=float16"], 2e-2),
        ("compiled (inductor)", ["compile=true"], 1e-4),
    ],
)
def test_precision_and_compilation_follow_the_float32_run(tmp_path, data_dir, tokenizer, float32_losses, name, overrides, tolerance):
    """Three steps of the same run (warmup to a high learning rate, so that updates matter) in each mode, against
    plain float32 eager: the losses agree within the mode's tolerance (relative)."""
    losses = three_step_losses(tmp_path, data_dir, tokenizer, *overrides)
    assert len(losses) == 3 and np.all(np.abs(losses - float32_losses) <= tolerance * float32_losses), (name, losses, float32_losses)


@pytest.mark.slow
def test_grad_clip_zero_never_clips(tmp_path, data_dir, tokenizer):
    unclipped = three_step_losses(tmp_path / "huge", data_dir, tokenizer, "optim.grad_clip=1e9")
    assert np.array_equal(three_step_losses(tmp_path / "zero", data_dir, tokenizer, "optim.grad_clip=0"), unclipped)
    assert not np.array_equal(three_step_losses(tmp_path / "tight", data_dir, tokenizer, "optim.grad_clip=1e-3"), unclipped)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_run_says_what_it_did_keeps_config_history_and_refuses_a_meaningless_resume(tmp_path, data_dir, tokenizer, capsys):
    run_dir = tmp_path / "run"
    short = ["optim.max_steps=8", "optim.warmup_steps=1", "stop_at_step=4"]
    train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, *short)))
    out = capsys.readouterr().out
    assert f"finished 4 of 8 steps; final checkpoint {run_dir / 'checkpoints' / 'step_0000004'}" in out
    assert f"minillama generate {run_dir} " in out and f"  evaluate: minillama eval loss {run_dir}\n" in out

    before = snapshot(run_dir)
    train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, *short)))  # the same run again
    assert f"{run_dir} is complete: its newest checkpoint holds 4 of 4 steps" in capsys.readouterr().out
    assert snapshot(run_dir) == before  # nothing re-evaluated, nothing rewritten

    with pytest.raises(MiniLlamaError, match=r"was trained with model.n_layers = 4, this config gives 2: a resume must keep"):
        train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, "optim.max_steps=8", "optim.warmup_steps=1", "model.n_layers=2")))
    with pytest.raises(MiniLlamaError, match=r"was trained with optim.name = 'adamw', this config gives 'muon': .* optimizer and parallel;"):
        train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, "optim.max_steps=8", "optim.warmup_steps=1", "optim.name=muon")))
    with pytest.raises(MiniLlamaError, match=r"was trained with parallel = 'ddp', this config gives 'fsdp'"):
        train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, "optim.max_steps=8", "optim.warmup_steps=1", "parallel=fsdp")))
    assert snapshot(run_dir) == before

    train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, "optim.max_steps=8", "optim.warmup_steps=1", "optim.lr=0.001")))
    out = capsys.readouterr().out
    assert "resuming at step 4 with a changed config: optim.lr 0.003 -> 0.001; stop_at_step 4 -> None" in out
    assert load_train_config(run_dir / "config.before_step_4.toml").optim.lr == 0.003
    assert load_train_config(run_dir / "config.toml").optim.lr == 0.001


@pytest.mark.slow
def test_training_its_own_tokenizer_says_so(tmp_path, corpus_file, capsys):
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}", f"data.tokenizer={tmp_path / 'tok.model'}",
                 f"data.files=[\"{corpus_file}\"]", "model.vocab_size=320", "data.val_tokens=2048", "eval.val_tokens=1024",
                 "optim.max_steps=1", "optim.warmup_steps=0", "eval.num_samples=0", "device=cpu"]
    train(load_train_config("configs/tiny.toml", overrides))
    assert f"trained a 320-token tokenizer on {corpus_file}: {tmp_path / 'tok.model'}" in capsys.readouterr().out


def test_a_run_directory_has_one_training_run_at_a_time(tmp_path, data_dir, tokenizer):
    config = load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, "optim.max_steps=2", "optim.warmup_steps=0"))
    with DirectoryLock(tmp_path / "run", "training run"):  # as another `minillama train` would hold it
        with pytest.raises(MiniLlamaError, match=rf"run is in use by another training run \(process {os.getpid()}\); wait"):
            train(config)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing written
    (tmp_path / "run" / "checkpoints" / ".step_0000001.tmp-k3j4").mkdir(parents=True)  # a save killed midway
    (tmp_path / "run" / ".metrics.jsonl.q1w2.tmp").write_text("{")
    train(config)  # the lock went with its holder
    assert (tmp_path / "run" / "checkpoints" / "step_0000002").is_dir()
    assert sorted(p.name for p in (tmp_path / "run").rglob(".*")) == []  # the leftovers are gone, and the lock file with its holder


def test_resuming_in_another_precision_says_so_and_goes_on(tmp_path, data_dir, tokenizer, capsys):
    base = ["optim.max_steps=4", "optim.warmup_steps=1", "batch.seq_len=16", "batch.micro_batch=2", "batch.total_tokens=64",
            "eval.val_tokens=64"]
    train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, *base, "stop_at_step=2")))
    capsys.readouterr()
    train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, *base, "dtype=float16")))
    out = capsys.readouterr().out
    assert "the precision changed, so the fp16 gradient scaler starts afresh" in out and "dtype 'auto' -> 'float16'" in out
    assert len(train_losses(tmp_path / "run")[0]) == 4


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_full_disk_at_a_save_is_one_line_and_the_last_checkpoint_stays_loadable(tmp_path, data_dir, tokenizer, parallel):
    """A file-size limit stands in for a full disk: the first run saves step 2; the resumed run cannot write
    step 4's largest file (optimizer state, or under fsdp the shard), says so in one line (exit 2), and step 2
    still loads and resumes."""
    small = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.multiple_of=16", "optim.max_steps=4",
             "optim.warmup_steps=1", "checkpoint.interval=2", "checkpoint.keep_last=1", f"parallel={parallel}"]
    overrides = tiny_run(tmp_path, data_dir, tokenizer, *small)
    config = config_file(tmp_path, overrides)
    train(load_train_config(config, ["stop_at_step=2"]))
    step2 = tmp_path / "run" / "checkpoints" / "step_0000002"
    limit = max(p.stat().st_size for p in step2.rglob("*") if p.is_file()) - 1  # every other file it writes is smaller

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a short write instead of the signal that kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "minillama", "train", "--config", str(config)], capture_output=True, text=True,
                            preexec_fn=limit_file_size)  # a process of its own: the limit is per process
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"minillama: error: could not write checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_0000004'} (")
    assert last.endswith("a full disk, quota or file-size limit? free some space and run the same command again to resume from the last checkpoint")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000002"]
    train(load_train_config(config))  # space again: the same run resumes from step 2
    assert len(train_losses(tmp_path / "run")[0]) == 4


def test_threads_sets_pytorchs_cpu_threads_and_the_run_record_says_how_many(tmp_path, data_dir, tokenizer):
    before = torch.get_num_threads()
    try:
        train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, "optim.max_steps=1", "optim.warmup_steps=0",
                                                               "threads=1")))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    [run] = [r for r in train_losses(tmp_path / "run")[1] if r["kind"] == "run"]
    assert run["cpu_threads"] == 1
    # The checkpoint keeps the run's eval prompts: the playground starts from the first.
    assert read_checkpoint_info(tmp_path / "run" / "checkpoints" / "step_0000001").metadata["eval_prompts"] == ["ROMEO:", "To be or not to be,"]


def test_auto_micro_batch_picks_the_largest_that_fits_the_estimate_and_keeps_the_batch_exact():
    from minillama.config import preset
    from minillama.train.memory import fitting_micro_batch, micro_batch_candidates, training_bytes_per_rank

    model = preset("mini-llama-109M")
    assert micro_batch_candidates(524_288, 1024, 2) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    for budget_gib, ranks, parallel, checkpointing in [(24, 1, "ddp", "none"), (40, 1, "ddp", "none"), (80, 8, "ddp", "full"),
                                                       (24, 2, "fsdp", "selective")]:
        choice = fitting_micro_batch(model, parallel, ranks, 524_288, 1024, checkpointing, budget_gib * 2**30)
        assert choice.micro_batch * choice.accumulation * 1024 * ranks == 524_288
        fits = [b for b in micro_batch_candidates(524_288, 1024, ranks)
                if training_bytes_per_rank(model, parallel, ranks, b, 1024, checkpointing, 524_288 // (1024 * ranks) // b)["total"]
                <= budget_gib * 2**30]
        assert choice.micro_batch == max(fits) and choice.estimate_bytes <= choice.budget_bytes
    with pytest.raises(MiniLlamaError, match="even micro_batch 1 needs an estimated .* GiB per rank, more than the 1.0 GiB budget"):
        fitting_micro_batch(model, "ddp", 1, 524_288, 1024, "none", 2**30)


@pytest.mark.parametrize("name", ["adamw", "muon"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_optimizer_state_estimate_is_what_the_optimizer_holds_after_a_step(name, tie):
    from minillama.train.memory import model_state_bytes

    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=16,
                         tie_embeddings=tie)
    model = Transformer(config)
    optimizer = build_optimizer(model, OptimConfig(name=name), torch.device("cpu"))
    logits, _ = model(torch.randint(0, 96, (2, 16)))
    logits.sum().backward()
    optimizer.step()
    parts = [optimizer.muon, optimizer.adamw] if name == "muon" else [optimizer]
    held = sum(t.numel() * t.element_size() for part in parts for state in part.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)  # AdamW's step counters are scalars
    assert held == model_state_bytes(config, "ddp", 1, name)["optimizer"]


def test_auto_micro_batch_makes_up_every_batch_stage_exactly(tmp_path, data_dir, tokenizer, monkeypatch):
    from minillama.distributed import Distributed
    from minillama.train import micro_batch

    monkeypatch.setattr(micro_batch, "memory_bytes", lambda device: 2**40)  # memory is no limit: divisibility decides
    for stages, expected in [("[]", 8), ("[[3, 256]]", 4), ("[[3, 192]]", 1)]:  # steps of 8 sequences; stages of 4, of 3
        config = load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, "batch.micro_batch=auto", f"batch.stages={stages}"))
        assert micro_batch.estimated_micro_batch(config, torch.device("cpu"), None, Distributed(world_size=1)).micro_batch == expected


def test_auto_micro_batch_backs_off_while_a_pass_runs_out_of_memory():
    from minillama.train.memory import MicroBatchChoice, backed_off

    tried = []

    def runs_out_above_8(micro_batch):
        tried.append(micro_batch)
        if micro_batch > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    choice = backed_off(MicroBatchChoice(32, 2, 10, 20), runs_out_above_8, total_tokens=64 * 128, seq_len=128, ranks=1)
    assert tried == [32, 16, 8] and (choice.micro_batch, choice.accumulation) == (8, 8)

    def always_out(micro_batch):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(MiniLlamaError, match="even micro_batch 1 runs out of memory"):
        backed_off(choice, always_out, total_tokens=64 * 128, seq_len=128, ranks=1)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_auto_micro_batch_in_a_run_is_what_the_budget_allows_and_trains_as_that_number_would(tmp_path, data_dir, tokenizer,
                                                                                            monkeypatch, capsys, parallel):
    from minillama.train import micro_batch
    from minillama.train.memory import MEMORY_SHARE, training_bytes_per_rank

    base = load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, f"parallel={parallel}"))
    # A budget that holds micro_batch 2 (of the 8 sequences a step has), not 4: float32 activations count twice.
    def estimate(b):
        parts = training_bytes_per_rank(base.model, parallel, 1, b, 64, "none", 8 // b)
        return parts["total"] + parts["activations"]
    budget = (estimate(2) + estimate(4)) // 2
    monkeypatch.setattr(micro_batch, "memory_bytes", lambda device: int(budget / MEMORY_SHARE["cpu"]) + 1)
    steps = ["optim.max_steps=3", "optim.warmup_steps=1", f"parallel={parallel}"]
    train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, *steps, "batch.micro_batch=auto")))
    assert "batch.micro_batch auto: 2 (4 micro-steps per step; estimated" in capsys.readouterr().out
    assert load_train_config(tmp_path / "run" / "config.toml").batch.micro_batch == 2  # saved as the number it chose
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    train(load_train_config("configs/tiny.toml", tiny_run(explicit, data_dir, tokenizer, *steps, "batch.micro_batch=2")))
    assert train_losses(tmp_path / "run")[0] == train_losses(explicit / "run")[0]


def test_a_run_says_its_plan_before_the_first_step_and_the_time_left_once_steps_are_measured(tmp_path, data_dir, tokenizer, capsys):
    train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data_dir, tokenizer, "optim.max_steps=10", "optim.warmup_steps=1")))
    out = capsys.readouterr().out.splitlines()
    first_step = next(i for i, line in enumerate(out) if line.startswith("step      0 | loss"))
    assert "plan: 5.1k tokens in 10 steps of 512 (steps 0 to 9 of 10)" in out[:first_step]
    [left] = [line for line in out if line.startswith("at ")]
    assert out.index(left) == next(i for i, line in enumerate(out) if line.startswith("step      5 | loss")) + 1  # steps 1-5 timed
    assert " tok/s (median of 5 steps) the 4 steps left take about " in left and ": done around " in left


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, data_dir, tokenizer, capsys):
    from minillama.cli import main

    overrides = [f"--set={o}" for o in tiny_run(tmp_path, data_dir, tokenizer, "optim.max_steps=1000")]
    assert main(["train", "--config", "configs/tiny.toml", *overrides, "--dry-run", "--tokens-per-s", "2560"]) == 0
    out = capsys.readouterr().out
    assert "batch: 512 tokens per step = 1 rank x 2 micro-steps x micro_batch 4 x seq_len 64" in out
    assert "plan: 512.0k tokens in 1,000 steps of 512 (steps 0 to 999 of 1,000)" in out
    assert "time: about 3 min at 2.6k tok/s (at the given speed)" in out  # 512,000 tokens / 2,560 tok/s = 200 s
    assert "memory per rank (estimate: AdamW moments, float32): parameters " in out
    assert list(tmp_path.iterdir()) == []  # no run directory, no lock


def test_dry_run_under_torchrun_chooses_the_micro_batch_for_its_ranks(tmp_path, data_dir, tokenizer, capsys, monkeypatch):
    """Each of 4 ranks takes a quarter of a step: the first stage's 256 tokens are one 64-token sequence per rank,
    so "auto" must choose 1 there, as training's ranks would (not the 4 one process alone could take)."""
    from minillama.cli import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    overrides = tiny_run(tmp_path, data_dir, tokenizer, "batch.micro_batch=auto", "batch.stages=[[10, 256]]")
    assert main(["train", "--config", "configs/tiny.toml", *[f"--set={o}" for o in overrides], "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "batch: 512 tokens per step = 4 ranks x 2 micro-steps x micro_batch 1 x seq_len 64 (batch.micro_batch auto: 1 (2 micro-steps" in out


def test_speedrun_options_set_momentum_and_group_rates_by_step_and_zero_init_starts_blocks_as_identities():
    from dataclasses import replace

    from minillama.train.optim import muon_momentum, set_learning_rates, zero_output_projections

    config = OptimConfig(name="muon", schedule="wsd", lr=1e-3, min_lr=1e-4, warmup_steps=4, max_steps=100, muon_lr=0.02,
                         muon_momentum=0.95, muon_momentum_warmup_steps=10, muon_momentum_start=0.85,
                         embedding_lr_multiplier=3.0, norm_lr_multiplier=0.5)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16))
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    set_learning_rates(optimizer, 5, config)  # past the lr warmup, halfway through the momentum warmup
    muon, embedding, norms = optimizer.param_groups
    assert muon["momentum"] == pytest.approx(0.90) and muon["lr"] == pytest.approx(0.02)
    assert embedding["lr"] == pytest.approx(3e-3) and norms["lr"] == pytest.approx(5e-4)
    set_learning_rates(optimizer, 10, config)
    assert muon["momentum"] == pytest.approx(0.95)
    cooling = replace(config, muon_momentum_cooldown_steps=20)
    assert [muon_momentum(step, cooling) for step in (79, 80, 90, 99, 100, 150)] == \
        pytest.approx([0.95, 0.95, 0.90, 0.855, 0.85, 0.85])  # down to the start over the 20 steps before max_steps

    zero_output_projections(model)
    tokens = torch.randint(64, (2, 8))
    with torch.no_grad():  # every block adds zero to the residual stream: the model is embedding -> norm -> head
        expected = model.output(model.norm(model.tok_embeddings(tokens)))
        assert torch.allclose(model(tokens)[0], expected, atol=1e-6)
    _, loss = model(tokens, tokens)
    loss.backward()
    assert all(block.attention.wo.weight.grad.abs().sum() > 0 for block in model.layers)  # they move at the first step


def test_a_resume_on_data_prepared_again_is_refused(tmp_path, corpus_file, tokenizer, capsys):
    """A checkpoint's data position counts windows in the shards it was trained on: after `prepare --overwrite`
    made other shards in the same folder, `--resume` would continue silently on other data. It is refused."""
    from minillama.cli import main

    data = tmp_path / "shards"
    prepare(LocalFiles([str(corpus_file)], split_paragraphs=True), data, tokenizer, shard_tokens=20_000, val_tokens=4_096,
            progress=False)
    train(load_train_config("configs/tiny.toml", tiny_run(tmp_path, data, tokenizer, "stop_at_step=4")))
    other = tmp_path / "other.txt"
    other.write_text(synthetic_corpus(3000, seed=7))
    prepare(LocalFiles([str(other)], split_paragraphs=True), data, tokenizer, shard_tokens=20_000, val_tokens=4_096,
            overwrite=True, progress=False)
    config = config_file(tmp_path, tiny_run(tmp_path, data, tokenizer, "stop_at_step=8"))
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--resume"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"minillama: error: the train shards of {data} are not the ones this checkpoint's data position counts in (the data "
        "was prepared again since); resume on the data it was trained on, or start a new run_dir")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("tied", [True, False])
def test_each_rate_and_decay_option_reaches_exactly_the_parameters_it_names(optimizer, tied):
    """Every parameter's rate and decay after the schedule is set, read back from the real optimizer and compared
    with what each option's documentation says, by parameter name: embedding_lr_multiplier reaches the embedding
    (and an untied head) alone under both optimizers, norm_lr_multiplier the norm gains alone, weight_decay the
    2-D weights AdamW trains, muon_weight_decay Muon's."""
    from minillama.train.optim import set_learning_rates

    config = OptimConfig(name=optimizer, lr=1e-3, min_lr=1e-4, warmup_steps=0, max_steps=100, muon_lr=0.02, weight_decay=0.1,
                         muon_weight_decay=0.05, embedding_lr_multiplier=4.0, norm_lr_multiplier=0.5)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16,
                                    tie_embeddings=tied))
    built = build_optimizer(model, config, torch.device("cpu"))
    set_learning_rates(built, 0, config)
    name_of = {id(p): n for n, p in model.named_parameters()}
    seen = {name_of[id(p)]: (g["lr"], g["weight_decay"]) for g in built.param_groups for p in g["params"]}
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())  # each once

    def expected(name, dims):
        if name in ("tok_embeddings.weight", "output.weight"):
            return 4e-3, 0.1
        if dims == 1:
            return 5e-4, 0.0
        return (0.02, 0.05) if optimizer == "muon" else (1e-3, 0.1)

    for name, param in model.named_parameters():
        assert seen[name] == pytest.approx(expected(name, param.dim())), name
    assert ("output.weight" in seen) == (not tied)


def test_an_adamw_checkpoint_of_the_two_group_layout_resumes_into_the_groups_by_kind():
    """Runs saved before the groups were described by kind held AdamW in two groups (2-D weights, then gains):
    their moments go to the same parameters now, so the next step is the step the old layout would have taken."""
    from minillama.train.optim import load_optimizer_state

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16,
                                    tie_embeddings=False))
    named = list(model.named_parameters())
    old = torch.optim.AdamW([{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}], lr=1e-3)
    tokens = torch.randint(64, (2, 8))
    model(tokens, tokens)[1].backward()
    old.step()
    saved = old.state_dict()
    config = OptimConfig(lr=1e-3, weight_decay=0.1)
    new = build_optimizer(model, config, torch.device("cpu"))
    load_optimizer_state(new, saved, model)
    for name, param in named:
        assert torch.equal(new.state[param]["exp_avg"], old.state[param]["exp_avg"]), name
        assert torch.equal(new.state[param]["exp_avg_sq"], old.state[param]["exp_avg_sq"]), name


def test_a_dry_run_that_does_not_fit_says_so_and_what_auto_would_choose(capsys):
    """micro_batch 512 of the 109M model needs hundreds of GiB: the plan ends with a verdict naming the micro-batch
    that a dry run with micro_batch "auto" chooses on this same machine."""
    from minillama.cli import main

    base = ["train", "--dry-run", "--config", "configs/mini-llama-109M.toml", "--set", "device=cpu"]
    assert main([*base, "--set", "batch.micro_batch=auto"]) == 0
    auto = capsys.readouterr().out.split("batch.micro_batch auto: ")[1].split(" ")[0]
    assert main([*base, "--set", "batch.micro_batch=512"]) == 0
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert verdict.startswith("verdict: does not fit this device's ") and f"batch.micro_batch=auto would choose {auto} (" in verdict


def test_the_hints_after_training_suggest_what_works_for_that_run():
    from minillama.train.history import next_commands

    tiny = next_commands(load_train_config("configs/tiny.toml"))  # a small corpus: HellaSwag would score chance
    assert "eval loss runs/tiny" in tiny and "hellaswag" not in tiny and "export gguf runs/tiny" in tiny
    reference = next_commands(load_train_config("configs/mini-llama-109M.toml"))
    assert "eval hellaswag runs/mini-llama-109M  (downloads the validation file once)" in reference
    local = next_commands(load_train_config("configs/mini-llama-109M.toml", ["eval.hellaswag_file=hs.jsonl"]))
    assert "eval hellaswag runs/mini-llama-109M --data hs.jsonl" in local


def test_the_tiny_config_trains_on_data_prepared_elsewhere_and_says_which_tokenizer_it_needs(tmp_path, data_dir, tokenizer,
                                                                                             monkeypatch, capsys):
    """configs/tiny.toml names data.files to prepare from; pointed at a folder already prepared (and its files not
    here), it trains on that data, and without its tokenizer says which one (dry run and run alike)."""
    from minillama.cli import main

    config = str(Path("configs/tiny.toml").resolve())
    monkeypatch.chdir(tmp_path)  # data/tinyshakespeare.txt is not here
    base = ["train", "--config", config, "--set", f"data.dir={data_dir}", "--set", "model.vocab_size=320"]
    for extra in (["--dry-run"], []):
        assert main([*base, *extra]) == 2
        assert capsys.readouterr().err == (
            "minillama: error: data.tokenizer data/tiny/tokenizer.model does not exist, and data.files to train one on are "
            f"not here (data/tinyshakespeare.txt: no such file); {data_dir} was prepared with a tokenizer of vocab 320 "
            f"(sha256 {tokenizer.fingerprint[:12]}…): pass it with --set data.tokenizer=PATH\n")
    run = ["--set", f"data.tokenizer={tokenizer.path}", "--set", "optim.max_steps=2", "--set", "optim.warmup_steps=1",
           "--set", "batch.seq_len=64", "--set", "model.max_seq_len=64", "--set", "batch.total_tokens=512", "--set",
           "batch.micro_batch=8", "--set", "eval.num_samples=0", "--set", "eval.val_tokens=512", "--set", "device=cpu",
           "--set", "compile=false"]
    assert main([*base, *run]) == 0
    assert f"using the prepared data in {data_dir} (data.files are not here, and not needed)" in capsys.readouterr().out
