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
    # every size is bounded: an absurd one is refused before anything runs, naming the field
    ("tiny", ["tokenizer.vocab_size=1000000000000"],
     "bad value for tokenizer.vocab_size: Input should be less than or equal to 1048576 (got 1000000000000)"),
    ("tiny", ["base.device_batch_size=0"], "bad value for base.device_batch_size: Input should be greater than or equal to 1 (got 0)"),
    ("tiny", ["base.depth=100000"], "bad value for base.depth: Input should be less than or equal to 256 (got 100000)"),
    ("tiny", ["base.max_seq_len=100000000"], "bad value for base.max_seq_len: Input should be less than or equal to 1048576"),
    ("tiny", ["base.checkpoint_every=0"], "bad value for base.checkpoint_every: Input should be greater than or equal to 1"),
    ("tiny", ["rl.max_new_tokens=1e12"], "bad value for rl.max_new_tokens"),
    ("tiny", ["mid_data.train.0.count=10000000000"], "bad value for mid_data.train.0.count: Input should be less than or equal to"),
    # the batch splits the training code requires, across fields: each message names every field involved
    ("tiny", ["base.total_batch_size=1000"], "bad config: base.total_batch_size=1000 is not a multiple of "
     "base.device_batch_size × base.max_seq_len × base.nproc = 4 × 256 × 1 = 1024: change one of them so that it divides"),
    ("tiny", ["base.nproc=3"], "base.total_batch_size=2048 is not a multiple of base.device_batch_size × base.max_seq_len × base.nproc = 4 × 256 × 3"),
    ("tiny", ["mid.device_batch_size=3"], "mid.total_batch_size=2048 is not a multiple of mid.device_batch_size × base.max_seq_len × mid.nproc"),
    ("tiny", ["sft.device_batch_size=5"], "sft.examples_per_step=16 is not a multiple of sft.device_batch_size × sft.nproc = 5 × 1 = 5"),
    ("tiny", ["rl.nproc=3"], "rl.examples_per_step=4 is not a multiple of rl.nproc=3"),
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


def test_the_bounds_allow_every_preset_and_the_real_sizes():
    for preset in PRESETS:
        build_config(preset)
    cfg = build_config("d32", ["base.device_batch_size=8", "base.max_seq_len=4096", "tokenizer.vocab_size=262144",
                               "base.nproc=8", "base.total_batch_size=1048576"])
    assert (cfg.base.depth, cfg.base.device_batch_size, cfg.tokenizer.vocab_size) == (32, 8, 262144)


def test_a_long_value_is_cut_in_the_message():
    with pytest.raises(ConfigError) as e:
        build_config("tiny", ["base.depth=" + "9" * 500])
    assert len(str(e.value)) < 300 and "\n" not in str(e.value)
