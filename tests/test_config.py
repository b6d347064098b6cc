import dataclasses
import math
import re
from pathlib import Path

import pytest

from minillama.config import ModelConfig, from_dict, parse_override, preset
from minillama.errors import MiniLlamaError
from minillama.train.config import (
    BatchConfig,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    TrainConfig,
    config_to_toml,
    load_train_config,
)
from minillama.train.memory import full_step_accumulation, micro_batch_candidates


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"dim": 100, "n_heads": 12}, "'dim' is 100; expected a multiple of n_heads=12"),
        ({"dim": 36, "n_heads": 12}, "head_dim is 3"),
        ({"n_heads": 12, "n_kv_heads": 5}, "'n_kv_heads' is 5; expected a divisor of n_heads=12"),
        ({"n_layers": 0}, "'n_layers' is 0; expected a positive integer"),
        ({"vocab_size": -3}, "'vocab_size' is -3"),
        ({"dropout": 1.0}, "'dropout' is 1.0"),
    ],
)
def test_bad_model_config_names_field_and_value(fields, named):
    with pytest.raises(MiniLlamaError, match=named.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**fields)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(MiniLlamaError, match="unknown model preset 'huge'.*mini-llama-109M"):
        preset("huge")


def test_unknown_field_in_config_file_is_refused():
    with pytest.raises(MiniLlamaError, match="model.json: unknown field 'dimension'"):
        from_dict(ModelConfig, {"dimension": 64}, "model.json")


def test_wrong_type_in_config_file_is_refused():
    with pytest.raises(MiniLlamaError, match="field 'n_layers' is '12'; expected an integer"):
        from_dict(ModelConfig, {"n_layers": "12"}, "model.json")


def test_config_file_values_are_converted_losslessly():
    config = from_dict(ModelConfig, {"rope_theta": 500000, "n_kv_heads": None}, "x")
    assert config.rope_theta == 500000.0 and isinstance(config.rope_theta, float)


def test_override_values_parse_as_json_or_string():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("model.preset=tiny") == (["model", "preset"], "tiny")
    assert parse_override("compile=false") == (["compile"], False)
    with pytest.raises(MiniLlamaError, match="expected key=value"):
        parse_override("lr")


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=-1", "'seed' is -1; expected an integer in [0, 9,223,372,036,854,775,807]"),
        ("optim.lr=NaN", "'optim.lr' is nan; expected a number > 0"),
        ("optim.lr=-0.1", "'optim.lr' is -0.1; expected a number > 0"),
        ("optim.beta2=1", "'optim.beta2' is 1.0; expected a number in [0, 1)"),
        ("data.source=fineweb", "'data.source' is \"fineweb\"; expected one of \"fineweb-edu\", \"text\""),
        ("eval.top_k=0", "'eval.top_k' is 0; expected a positive integer"),
        ("data.prepare_workers=-3", "'data.prepare_workers' is -3; expected a positive integer"),
        ("eval.hellaswag_limit=0", "'eval.hellaswag_limit' is 0; expected a positive integer or null"),
        ("compile=1", "'compile' is 1; expected one of \"auto\", true, false"),
        ("on_nonfinite=ignore", "'on_nonfinite' is \"ignore\"; expected one of \"stop\", \"skip\""),
        ("model.max_seq_len=1000000000000", "'max_seq_len' is 1000000000000; expected an integer in [1, 1,048,576]"),
    ],
)
def test_run_config_choices_and_ranges_come_from_the_annotations(override, message):
    with pytest.raises(MiniLlamaError, match=re.escape(message)):
        load_train_config(None, [override])


@pytest.mark.parametrize(
    "path, overrides",
    [
        ("configs/tiny.toml", []),
        ("configs/mini-llama-109M.toml", ["data.tokenizer=tok.model", "stop_at_step=7"]),
        (None, ['model.preset="mini-llama-1.1B"', "model.hidden_dim=null", "model.n_kv_heads=null",
                'eval.prompts=["two\\nlines, a \\"quote\\", a \\\\ and é"]']),
    ],
)
def test_saved_config_toml_reloads_equal(tmp_path, path, overrides):
    config = load_train_config(path, overrides)
    saved = tmp_path / "config.toml"
    saved.write_text(config_to_toml(config))
    assert load_train_config(saved) == config


def test_train_help_explains_every_run_config_field_with_its_default(capsys):
    from minillama.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = capsys.readouterr().out.split("Run config fields")[1].splitlines()[1:]
    described = {line.split(" = ")[0].strip(): (line.split(" = ", 1)[1], note.strip()) for line, note in zip(lines[::2], lines[1::2])}
    tables = {"model": ModelConfig, "data": DataConfig, "batch": BatchConfig, "optim": OptimConfig, "eval": EvalConfig,
              "checkpoint": CheckpointConfig, "log": LogConfig}
    keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in tables]
    keys += [f"{table}.{f.name}" for table, cls in tables.items() for f in dataclasses.fields(cls)]
    assert sorted(described) == sorted(keys)
    assert all(note and not note.startswith(("=", "(")) for _, note in described.values()), described
    assert described["optim.lr"][0] == "0.0006" and described["batch.total_tokens"][0] == "524288"
    assert described["eval.hellaswag_file"] == ("(none)", "local HellaSwag jsonl; None: download the official validation file")



@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_saved_form_reads_back_equal(path, tmp_path):
    config = load_train_config(path)
    (tmp_path / "saved.toml").write_text(config_to_toml(config))
    assert load_train_config(tmp_path / "saved.toml") == config


@pytest.mark.parametrize("ranks", [1, 8])
@pytest.mark.parametrize("path", sorted(Path("configs").glob("mini-llama-*.toml")), ids=lambda p: p.name)
def test_every_109M_config_makes_up_each_of_its_steps_on_one_gpu_or_eight(path, ranks):
    """What their comments promise: `torchrun --nproc_per_node=8` runs them as they are, batch stages included."""
    batch = load_train_config(path).batch
    micro_batches = ([batch.micro_batch] if batch.micro_batch != "auto"
                     else micro_batch_candidates(math.gcd(*batch.step_sizes), batch.seq_len, ranks))
    full_step_accumulation(dataclasses.replace(batch, micro_batch=micro_batches[0]), ranks)
