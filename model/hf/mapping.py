"""Our GPT ⇄ transformers' `nanochat` architecture: parameter names, the config, and what must agree.

transformers (5.x) has a native `NanoChatForCausalLM`: the same v0 architecture we train (rotary then QK norm,
parameter-free RMSNorm on the embeddings, before each block half and at the end, ReLU² MLP, untied head,
logits soft-capped at 15). This module is the one place that pins the correspondence, in both directions;
it needs no torch (names, dicts and numpy arrays only), so the exporter runs on safetensors alone.

Two differences are handled here, not hidden:
- Vocabulary. Our embedding and head are padded to a multiple of 64 rows (the padded rows are never read:
  no token has their id, and our logits are sliced back to the vocabulary). The export keeps the vocabulary's
  rows only, so transformers' logits have exactly one column per token. The import pads with zero rows, which is
  what our init and training leave in them (`GPT.init_weights` zeroes them; they never get a gradient), so an
  export → import round trip gives back the same bytes.
- Norm epsilon. Our RMSNorm uses torch's default epsilon (the dtype's machine epsilon: 2**-23 in fp32), which the
  export writes as `rms_norm_eps`. A nanochat model written elsewhere may carry another small epsilon (1e-6);
  our GPT has no epsilon setting, so the import accepts it with a note and refuses one above 1e-5 (measured on a
  2-layer test model: transformers' logits move by at most 1.4e-5 at 1e-6, 1.3e-4 at 1e-5).
"""
from __future__ import annotations

import re

import numpy as np

from model.errors import InputError

# model.nn.gpt's SOFTCAP, ROPE_BASE and VOCAB_MULTIPLE, copied because gpt.py imports torch (a test pins them)
SOFTCAP = 15.0
ROPE_THETA = 10_000.0
VOCAB_MULTIPLE = 64
OUR_EPS = float(np.finfo(np.float32).eps)  # F.rms_norm's eps=None in fp32
MAX_EPS = 1e-5  # an imported epsilon above this changes the model: refused

# ours ← → transformers; {i} is the layer index
_LAYER = {
    "blocks.{i}.attn.c_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.c_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.c_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.c_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.mlp.c_fc.weight": "model.layers.{i}.mlp.fc1.weight",
    "blocks.{i}.mlp.c_proj.weight": "model.layers.{i}.mlp.fc2.weight",
}
_GLOBAL = {"embed.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
VOCAB_ROWS = ("embed.weight", "lm_head.weight")  # (vocab, n_embd) matrices: padded on our side only


def names(n_layer: int) -> dict[str, str]:
    """Our parameter name → transformers' name, for a model of `n_layer` blocks."""
    out = dict(_GLOBAL)
    for i in range(n_layer):
        out.update({ours.format(i=i): theirs.format(i=i) for ours, theirs in _LAYER.items()})
    return out


def inverse(n_layer: int) -> dict[str, str]:
    """transformers' name → ours (the inverse of `names`)."""
    return {theirs: ours for ours, theirs in names(n_layer).items()}


def padded(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# ---------------------------------------------------------------- config

def hf_config(model: dict, *, bos_id: int, eos_id: int, pad_id: int, provenance: dict | None = None) -> dict:
    """config.json of `NanoChatForCausalLM` for our model config (`GPTConfig.to_dict()`)."""
    n_embd, n_head = model["n_embd"], model["n_head"]
    config = {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": model["vocab_size"],
        "hidden_size": n_embd,
        "intermediate_size": 4 * n_embd,
        "num_hidden_layers": model["n_layer"],
        "num_attention_heads": n_head,
        "num_key_value_heads": model["n_kv_head"],
        "head_dim": n_embd // n_head,
        "max_position_embeddings": model["sequence_len"],
        "hidden_act": "relu2",
        "rms_norm_eps": OUR_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "final_logit_softcapping": SOFTCAP,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": "float32",
        "use_cache": True,
    }
    if provenance:
        config["chatforge"] = provenance  # kept by transformers as an attribute; the import reads it back
    return config


def our_config(config: dict, tokenizer_vocab: int) -> tuple[dict, list[str]]:
    """(our model config, notes) for a transformers `nanochat` config.json; InputError listing every feature that
    our GPT lacks or that does not fit the tokenizer."""
    if config.get("model_type") != "nanochat":
        raise InputError(f"config.json has model_type {config.get('model_type')!r}, not 'nanochat': only transformers' "
                         "nanochat architecture maps onto chatforge's GPT")
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
    missing = [k for k in need if not isinstance(config.get(k), int) or isinstance(config.get(k), bool)]
    if missing:
        raise InputError(f"config.json lacks integer {', '.join(missing)}: it is not a complete nanochat config")
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta", ROPE_THETA)}
    differs = []

    def expect(what: str, got, want) -> None:
        if got != want:
            differs.append(f"{what} {got!r} (chatforge: {want!r})")

    expect("hidden_act", config.get("hidden_act", "relu2"), "relu2")
    expect("intermediate_size", config.get("intermediate_size"), 4 * n_embd)
    expect("attention_bias", bool(config.get("attention_bias", False)), False)
    expect("tie_word_embeddings", bool(config.get("tie_word_embeddings", False)), False)
    expect("final_logit_softcapping", config.get("final_logit_softcapping", SOFTCAP), SOFTCAP)
    expect("rope_type", rope.get("rope_type", "default"), "default")
    expect("rope_theta", float(rope.get("rope_theta", ROPE_THETA)), ROPE_THETA)
    if n_head < 1 or n_embd % n_head:
        differs.append(f"hidden_size {n_embd} not divisible by num_attention_heads {n_head}")
    else:
        expect("head_dim", config.get("head_dim", n_embd // n_head), n_embd // n_head)
        if (n_embd // n_head) % 2:
            differs.append(f"odd head size {n_embd // n_head} (rotary needs an even one)")
    if n_kv < 1 or n_head % n_kv:
        differs.append(f"num_key_value_heads {n_kv} does not divide num_attention_heads {n_head}")
    eps = config.get("rms_norm_eps", OUR_EPS)
    if not isinstance(eps, (int, float)) or not 0 <= eps <= MAX_EPS:
        differs.append(f"rms_norm_eps {eps!r} (chatforge: {OUR_EPS:.3g}, accepted up to {MAX_EPS:g})")
    if config["vocab_size"] < tokenizer_vocab:
        differs.append(f"vocab_size {config['vocab_size']} smaller than the tokenizer's {tokenizer_vocab} tokens")
    if differs:
        raise InputError(f"this nanochat model has features chatforge's GPT lacks: {'; '.join(differs)}")
    notes = []
    if eps != OUR_EPS:
        notes.append(f"rms_norm_eps {eps:g} is not chatforge's {OUR_EPS:.3g} (our GPT has no such setting): "
                     "logits differ slightly from transformers' (1e-6: by ~1e-5)")
    if config["vocab_size"] > tokenizer_vocab:
        notes.append(f"embedding rows {tokenizer_vocab}..{config['vocab_size'] - 1} have no token and are dropped")
    ours = {"vocab_size": tokenizer_vocab, "n_layer": config["num_hidden_layers"], "n_head": n_head, "n_kv_head": n_kv,
            "n_embd": n_embd, "sequence_len": config["max_position_embeddings"]}
    return ours, notes


# ---------------------------------------------------------------- weights

def to_hf(tensors: dict[str, np.ndarray], model: dict) -> dict[str, np.ndarray]:
    """Our state dict (numpy) → transformers' names, vocabulary rows cut to the vocabulary."""
    mapping = names(model["n_layer"])
    extra = sorted(set(tensors) - set(mapping))
    absent = sorted(set(mapping) - set(tensors))
    if extra or absent:
        raise InputError(f"checkpoint weights do not match its model.json (missing {absent[:3]}, unexpected {extra[:3]}): "
                         "the artifact is inconsistent; re-pull it")
    vocab = model["vocab_size"]
    return {mapping[k]: (v[:vocab] if k in VOCAB_ROWS else v) for k, v in tensors.items()}


def from_hf(tensors: dict[str, np.ndarray], model: dict) -> dict[str, np.ndarray]:
    """transformers' weights → ours as fp32, shapes checked against our config, vocabulary rows zero-padded."""
    mapping = inverse(model["n_layer"])
    unexpected = sorted(k for k in tensors if k not in mapping and not _IGNORED.match(k))
    missing = sorted(set(mapping) - set(tensors))
    if missing or unexpected:
        what = [f"missing {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}"] if missing else []
        what += [f"unexpected {', '.join(unexpected[:4])}{' …' if len(unexpected) > 4 else ''}"] if unexpected else []
        raise InputError(f"the weights do not match a nanochat model of this config.json ({'; '.join(what)}): "
                         "pass the complete model directory")
    d, hd = model["n_embd"], model["n_embd"] // model["n_head"]
    shapes = {"embed.weight": None, "lm_head.weight": None}
    for i in range(model["n_layer"]):
        shapes.update({f"blocks.{i}.attn.c_q.weight": (model["n_head"] * hd, d), f"blocks.{i}.attn.c_k.weight": (model["n_kv_head"] * hd, d),
                       f"blocks.{i}.attn.c_v.weight": (model["n_kv_head"] * hd, d), f"blocks.{i}.attn.c_proj.weight": (d, model["n_head"] * hd),
                       f"blocks.{i}.mlp.c_fc.weight": (4 * d, d), f"blocks.{i}.mlp.c_proj.weight": (d, 4 * d)})
    vocab, rows = model["vocab_size"], padded(model["vocab_size"])
    out = {}
    for theirs, ours in mapping.items():
        w = np.asarray(tensors[theirs], dtype=np.float32)
        want = shapes[ours]
        if ours in VOCAB_ROWS:
            if w.ndim != 2 or w.shape[1] != d or w.shape[0] < vocab:
                raise InputError(f"{theirs} has shape {tuple(w.shape)}, expected (≥{vocab}, {d}): the weights do not fit config.json")
            w = np.concatenate([w[:vocab], np.zeros((rows - vocab, d), np.float32)]) if rows > vocab else w[:vocab]
        elif tuple(w.shape) != want:
            raise InputError(f"{theirs} has shape {tuple(w.shape)}, expected {want}: the weights do not fit config.json")
        out[ours] = np.ascontiguousarray(w)
    return out


_IGNORED = re.compile(r"^model\.rotary_emb\.")  # recomputed buffers some writers save
