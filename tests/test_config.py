import pytest

from minillama.config import ModelConfig, from_dict, parse_override, preset
from minillama.errors import MiniLlamaError


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
