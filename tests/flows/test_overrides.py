import pytest

from flows.overrides import ConfigError, build_config
from flows.presets import PRESETS, approx_params, shards_for


def test_presets_derive_from_depth():
    assert approx_params(20, 65536) == 560_988_160  # nanochat d20
    assert approx_params(32, 65536) == 1_879_048_192
    d12, d20 = PRESETS["d12"](), PRESETS["d20"]()
    assert (d12.base.depth, d20.base.depth) == (12, 20)
    assert d12.data.sources[0].num_train_shards < d20.data.sources[0].num_train_shards == shards_for(20, 65536)
    assert d20.tokenizer.vocab_size == 65536


def test_set_overrides_typed_values():
    cfg = build_config("d12", ["tokenizer.vocab_size=8192", "cost.prices.H100=2.5", "data.sources.0.revision=1"])
    assert cfg.tokenizer.vocab_size == 8192 and cfg.cost.prices["H100"] == 2.5
    assert cfg.data.sources[0].revision == "1"  # a string field keeps the text


@pytest.mark.parametrize("preset, sets, message", [
    ("huge", [], "unknown preset 'huge': choose one of tiny"),
    ("d12", ["tokenizer.vocab=3"], "unknown --set key 'tokenizer.vocab': tokenizer has vocab_size"),
    ("d12", ["tokenizer.vocab_size=abc"], "bad value for tokenizer.vocab_size"),
    ("d12", ["tokenizer.vocab_size=10"], "bad value for tokenizer.vocab_size: Input should be greater than or equal to 265"),
    ("d12", ["data.sources.3.revision=x"], "data.sources has items 0..0"),
    ("d12", ["depth"], "write it as key.path=value"),
])
def test_bad_config_is_one_line(preset, sets, message):
    with pytest.raises(ConfigError) as e:
        build_config(preset, sets)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_key_excludes_fields_that_do_not_change_results():
    a = build_config("d12").tokenizer
    b = build_config("d12", ["tokenizer.threads=1", "tokenizer.reference_dir=/x"]).tokenizer
    assert a.key_dict() == b.key_dict()
    assert a.key_dict() != build_config("d12", ["tokenizer.doc_cap=5"]).tokenizer.key_dict()
