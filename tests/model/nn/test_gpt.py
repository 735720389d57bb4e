"""The GPT: sizes, init, forward, the parameter-name contract, generation, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from model.config import BaseConfig
from model.errors import InputError
from model.nn.gpt import GPT, GPTConfig


def tiny_config(**over) -> GPTConfig:
    base = dict(vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, sequence_len=32)
    return GPTConfig(**{**base, **over})


def tiny(seed: int = 0, randomize: bool = False, **over) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**over))
    if randomize:  # zero-init head and projections make every logit 0; give them weights to test behaviour
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                    p.normal_(0, 0.2)
    return model


# ---------------------------------------------------------------- config and sizes

@pytest.mark.parametrize("depth, params, flops", [
    (20, 560_988_160, 3_491_758_080),
    (32, 1_879_048_192, None),
])
def test_parameter_count_of_the_real_sizes(depth, params, flops):
    cfg = GPTConfig.from_base(BaseConfig(depth=depth), 65536)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.sequence_len) == (64 * depth, depth // 2, depth // 2, 2048)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.embed.weight.is_meta
    assert model.num_params() == params
    assert model.num_embedding_params() == 65536 * 64 * depth
    L, H, D, T = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.sequence_len
    assert model.flops_per_token() == 6 * (params - 65536 * 64 * depth) + 12 * L * H * D * T
    if flops is not None:
        assert model.flops_per_token() == flops  # nanochat's printed figure for d20


def test_config_round_trips_through_json():
    cfg = GPTConfig.from_base(BaseConfig(depth=4, head_dim=64, n_kv_head=2), 1000)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.padded_vocab_size) == (256, 4, 2, 64, 1024)
    again = GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(InputError, match="missing fields"):
        GPTConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "n_head"})


@pytest.mark.parametrize("over, vocab, message", [
    ({"depth": 0}, 100, "base.depth must be ≥ 1 (got 0): set --set base.depth=N"),
    ({"depth": 5}, 100, "width 320"),                      # ceil(320/128) = 3 heads do not divide 320
    ({"depth": 4, "n_kv_head": 3}, 100, "base.n_kv_head 3 does not divide the 2 query heads"),
    ({"depth": 2}, 0, "vocab_size must be ≥ 1"),
])
def test_bad_sizes_are_one_line_input_errors(over, vocab, message):
    cfg = BaseConfig.model_construct(**{**BaseConfig().model_dump(), **over})  # bypass pydantic's own checks
    with pytest.raises(InputError) as e:
        GPTConfig.from_base(cfg, vocab)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_indivisible_width_suggests_a_fix_that_works():
    with pytest.raises(InputError) as e:
        GPTConfig.from_base(BaseConfig(depth=5), 100)
    msg = str(e.value)
    assert "base.head_dim=80" in msg and "base.aspect_ratio=128" in msg
    assert GPTConfig.from_base(BaseConfig(depth=5, head_dim=80), 100).n_head == 4
    assert GPTConfig.from_base(BaseConfig(depth=5, aspect_ratio=128), 100).n_head == 5


# ---------------------------------------------------------------- structure and init

def test_parameter_names_follow_the_optimizer_contract():
    model = tiny(n_kv_head=1)
    names = dict(model.named_parameters())
    assert "embed.weight" in names and "lm_head.weight" in names
    for name, p in names.items():
        assert p.ndim == 2  # no biases, no norm gains
        if name not in ("embed.weight", "lm_head.weight"):
            assert name.startswith("blocks.") and "embed" not in name and "lm_head" not in name
    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert "cos" not in model.state_dict() and "sin" not in model.state_dict()  # rotary tables are not saved


def test_init_properties():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=500, n_layer=2, n_head=4, n_kv_head=1, n_embd=128, sequence_len=16))
    assert torch.count_nonzero(model.lm_head.weight) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0
    assert abs(model.embed.weight.std().item() - 1.0) < 0.02

    def expected(w):
        fan_out, fan_in = w.shape
        return fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in))

    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert expected(attn.c_k.weight) == pytest.approx(128 ** -0.5 * 0.5)  # GQA: 32 rows of 128 → scaled down
    for w in (attn.c_q.weight, attn.c_k.weight, attn.c_v.weight, mlp.c_fc.weight):
        assert w.std().item() == pytest.approx(expected(w), rel=0.05)
        assert abs(w.mean().item()) < 0.1 * expected(w)


def test_meta_build_then_materialize():
    cfg = tiny_config()
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    ref = GPT(cfg)
    assert torch.equal(model.cos, ref.cos) and torch.equal(model.sin, ref.sin)
    assert model.cos.shape == (1, cfg.sequence_len, 1, cfg.head_dim // 2)
    assert torch.count_nonzero(model.lm_head.weight) == 0
    assert model.embed.weight.std().item() == pytest.approx(1.0, rel=0.1)
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    assert torch.isfinite(model(x, x)).all()


# ---------------------------------------------------------------- forward

def test_forward_shapes_and_losses():
    model = tiny(randomize=True)
    x = torch.randint(0, 64, (3, 16))
    y = torch.randint(0, 64, (3, 16))
    logits = model(x)
    assert logits.shape == (3, 16, 64) and logits.dtype == torch.float32
    per_token = model(x, y, loss_reduction="none")
    assert per_token.shape == (3, 16)
    assert model(x, y).item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 64), y.view(-1), reduction="none").view(3, 16)
    torch.testing.assert_close(per_token, ref)
    y[:, :8] = -1  # ignored targets: loss 0 there, and the mean is over the rest
    per_token = model(x, y, loss_reduction="none")
    assert torch.all(per_token[:, :8] == 0)
    assert model(x, y).item() == pytest.approx(per_token[:, 8:].mean().item(), rel=1e-6)
    with torch.no_grad():
        zero = tiny()(x, y)  # zero head: uniform prediction
    assert zero.item() == pytest.approx(math.log(64), rel=1e-6)


def test_attention_is_causal():
    model = tiny(randomize=True, n_kv_head=1)
    x = torch.randint(0, 64, (2, 20))
    x2 = x.clone()
    x2[:, 12:] = torch.randint(0, 64, (2, 8))
    a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gqa_matches_repeated_kv_heads():
    """n_kv_head=1 equals full multi-head attention whose k/v heads are copies of the one kv head."""
    gqa = tiny(randomize=True, n_head=4, n_kv_head=1, n_embd=64)
    mha = GPT(tiny_config(n_head=4, n_kv_head=4, n_embd=64))
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith("c_k.weight") or key.endswith("c_v.weight"):
            state[key] = state[key].repeat(4, 1)  # (16, 64) → (64, 64): head h reads kv head 0
    mha.load_state_dict(state)
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-4, atol=1e-4)


def test_logits_are_soft_capped_at_15():
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 50.0)
    logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.abs().max().item() <= 15.0
    assert logits.abs().max().item() > 14.0


def test_vocab_is_padded_to_a_multiple_of_64():
    model = GPT(tiny_config(vocab_size=1000))
    assert model.embed.weight.shape == (1024, 64)
    assert model.lm_head.weight.shape == (1024, 64)
    x = torch.randint(0, 1000, (2, 8))
    assert model(x).shape == (2, 8, 1000)
    assert model(x, x).item() == pytest.approx(math.log(1000), rel=1e-6)  # padded rows take no probability


def test_sequence_longer_than_the_model_is_an_input_error():
    model = tiny()
    model(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(InputError, match="sequence length 33 exceeds the model's maximum 32: "):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x = torch.randint(0, 64, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(50):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(64), rel=1e-5)
    assert model(x, y).item() < 0.25 * first


# ---------------------------------------------------------------- generation

def test_greedy_generation_is_deterministic_and_is_the_argmax():
    model = tiny(randomize=True)
    prompt = [1, 5, 9]
    a = list(model.generate(prompt, max_tokens=10, temperature=0.0))
    b = list(model.generate(prompt, max_tokens=10, temperature=0.0, seed=7))
    assert a == b and len(a) == 10
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert a == ids[len(prompt):]
    assert list(model.generate(prompt, max_tokens=10, temperature=1.0, top_k=1)) == a


def test_sampling_is_seeded_and_context_is_cropped():
    model = tiny(randomize=True)
    prompt = list(range(30))
    a = list(model.generate(prompt, max_tokens=8, temperature=1.0, seed=3))  # runs past sequence_len 32
    assert a == list(model.generate(prompt, max_tokens=8, temperature=1.0, seed=3))
    assert all(0 <= t < 64 for t in a)
    draws = {tuple(model.generate(prompt, max_tokens=8, temperature=1.0, seed=s)) for s in range(4)}
    assert len(draws) > 1
    top2 = list(model.generate([1], max_tokens=20, temperature=1.0, top_k=2, seed=0))
    with torch.no_grad():
        best = set(model(torch.tensor([[1]]))[0, -1].topk(2).indices.tolist())
    assert top2[0] in best
