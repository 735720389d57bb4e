"""The GPT of nanochat's recipe, in plain PyTorch.

Architecture (depth is the dial; see `GPTConfig.from_base`):

- token embedding (`embed`), then a parameter-free RMSNorm; no learned positions
- `n_layer` pre-norm blocks: x += attn(norm(x)); x += mlp(norm(x)), all norms parameter-free RMSNorm
- attention: rotary embeddings (base 10,000) on q and k, then RMSNorm on q and k (QK norm),
  grouped-query attention with `n_kv_head` key/value heads, causal
- MLP: 4× wide, ReLU²
- final RMSNorm, untied output head (`lm_head`), logits soft-capped at 15 (in fp32)
- no biases anywhere; vocabulary padded to a multiple of 64 in embedding and head, logits sliced back

Parameter names are part of the optimizer contract (DeepSpeed's Muon takes 2-D parameters whose
names contain neither ``embed`` nor ``lm_head``): only the token embedding is called ``embed``, only
the head is called ``lm_head``, and every other matrix lives under ``blocks``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import BaseConfig
from model.errors import InputError

ROPE_BASE = 10_000.0
SOFTCAP = 15.0
VOCAB_MULTIPLE = 64


# ---------------------------------------------------------------- config

@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    sequence_len: int

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"model.{f.name} must be an integer (got {value!r}): fix the model config")
            if value < 1:
                raise InputError(f"model.{f.name} must be ≥ 1 (got {value}): fix the model config")
        if self.n_head % self.n_kv_head:
            raise InputError(
                f"model.n_kv_head {self.n_kv_head} does not divide n_head {self.n_head}: use a divisor of {self.n_head}"
            )
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise InputError(
                f"model.n_embd {self.n_embd} must be n_head {self.n_head} × an even head size: fix the model config"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(d))
        unknown = sorted(set(d) - names)
        if missing or unknown:
            raise InputError(
                f"model config has missing fields {missing} / unknown fields {unknown}: "
                "the checkpoint was written by another version; retrain or convert it"
            )
        return cls(**{k: d[k] for k in names})

    @classmethod
    def from_base(cls, cfg: BaseConfig, vocab_size: int) -> "GPTConfig":
        """nanochat's sizing: width = depth × aspect_ratio, heads = ceil(width / head_dim)."""
        for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len"):
            value = getattr(cfg, name)
            if value < 1:
                raise InputError(f"base.{name} must be ≥ 1 (got {value}): set --set base.{name}=N")
        if vocab_size < 1:
            raise InputError(f"vocab_size must be ≥ 1 (got {vocab_size}): check the tokenizer")
        n_embd = cfg.depth * cfg.aspect_ratio
        n_head = -(-n_embd // cfg.head_dim)
        if n_embd % n_head or (n_embd // n_head) % 2:
            raise InputError(
                f"width {n_embd} (= base.depth {cfg.depth} × base.aspect_ratio {cfg.aspect_ratio}) does not split into "
                f"{n_head} heads of an even size (head_dim {cfg.head_dim}): {_sizing_hint(cfg, n_embd)}"
            )
        n_kv_head = cfg.n_kv_head if cfg.n_kv_head is not None else n_head
        if n_kv_head < 1 or n_head % n_kv_head:
            divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
            raise InputError(
                f"base.n_kv_head {n_kv_head} does not divide the {n_head} query heads: "
                f"set --set base.n_kv_head=N with N in {divisors}"
            )
        return cls(vocab_size=vocab_size, n_layer=cfg.depth, n_head=n_head, n_kv_head=n_kv_head,
                   n_embd=n_embd, sequence_len=cfg.max_seq_len)


def _sizing_hint(cfg: BaseConfig, n_embd: int) -> str:
    """Suggest a head_dim that divides the width, or an aspect_ratio that makes the width a multiple of head_dim."""
    hints = []
    head = next((d for d in range(min(cfg.head_dim, n_embd), 1, -1) if n_embd % d == 0 and d % 2 == 0), None)
    if head is not None:
        hints.append(f"--set base.head_dim={head}")
    if cfg.head_dim % 2 == 0:
        aspect = next(a for a in itertools.count(cfg.aspect_ratio) if (cfg.depth * a) % cfg.head_dim == 0)
        hints.append(f"--set base.aspect_ratio={aspect}")
    else:
        hints.append("an even base.head_dim")
    return "use " + " or ".join(hints)


# ---------------------------------------------------------------- layers

def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) by the position's angle. x: (B, T, H, D); cos/sin: (1, T, 1, D/2)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d = config.n_embd
        self.c_q = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


def _rotary_norm_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """rms_norm(apply_rotary(·)) of q and k in one pass over their heads side by side: the same numbers,
    half the operator calls (at batch 1 the calls, not the arithmetic, are the cost)."""
    x = torch.cat((q, k), dim=2)
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    x = rms_norm(torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1))
    return x.split((q.size(2), k.size(2)), dim=2)


def _rowwise(kv_cache, B: int):
    """F.linear for x (B, 1, C) as B matrix-vector products (each row takes the same kernel whatever B is),
    with each weight's (B, C, N) view made once per cache and batch size rather than at every call."""
    views = kv_cache.__dict__.setdefault("_rowwise_views", {})

    def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        w = views.get((id(weight), B))
        if w is None:
            w = views[(id(weight), B)] = weight.t().expand(B, -1, -1)
        return torch.bmm(x, w)

    return linear


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), cos, sin)
        return x + self.mlp(rms_norm(x))


# ---------------------------------------------------------------- model

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        self.embed = nn.Embedding(vocab, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        cos, sin = self._rotary_tables(self.embed.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        if not self.embed.weight.is_meta:
            self.init_weights()

    def _rotary_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.config.head_dim // 2
        inv_freq = ROPE_BASE ** (-torch.arange(half, dtype=torch.float32, device=device) / half)
        t = torch.arange(self.config.sequence_len, dtype=torch.float32, device=device)
        angles = torch.outer(t, inv_freq)[None, :, None, :]  # (1, T, 1, D/2)
        return angles.cos(), angles.sin()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every weight and rebuild the rotary tables on the current device.

        For a model built on the meta device: ``model.to_empty(device=...)`` then ``model.init_weights()``.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        # rows past the vocabulary are never read (no token has their id) and never get a gradient: zero, they
        # stay zero, so a checkpoint does not depend on how its vocabulary was padded (model/hf/mapping.py)
        nn.init.zeros_(self.embed.weight[self.config.vocab_size:])
        for block in self.blocks:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.cos, self.sin = self._rotary_tables(self.embed.weight.device)

    # ------------------------------------------------------------ accounting

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_embedding_params(self) -> int:
        return self.embed.weight.numel()

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per non-embedding parameter plus the attention term 12·L·H·D·T."""
        c = self.config
        return 6 * (self.num_params() - self.num_embedding_params()) + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    # ------------------------------------------------------------ forward

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean"):
        B, T = idx.shape
        if T > self.config.sequence_len:
            raise InputError(
                f"sequence length {T} exceeds the model's maximum {self.config.sequence_len}: "
                "crop the input or train with a larger base.max_seq_len"
            )
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = rms_norm(self.embed(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        x = rms_norm(x)
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        if loss_reduction not in ("mean", "none"):
            raise ValueError(f"loss_reduction must be 'mean' or 'none' (got {loss_reduction!r})")
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def forward_cached(self, idx: torch.Tensor, kv_cache, last: torch.Tensor | None = None) -> torch.Tensor:
        """Inference on top of a KV cache (see `model.chat.engine.KVCache`): fp32 logits (B, V) of one token per row.

        `kv_cache.positions(T)` gives the (B, T) absolute positions of `idx`'s tokens (for the rotary angles),
        and `kv_cache.attend(layer, q, k, v)` stores the new keys/values (B, H_kv, T, D) and returns the
        attention output (B, H, T, D). With `kv_cache.batch_invariant`, a one-token step runs its linear layers
        as one matrix-vector product per row, so a row's numbers do not depend on the batch size.
        `last` (B,) picks the position whose logits are returned per row (default: the last, T - 1), so a
        prefill never materialises T × vocab logits. Same result as `forward` on the whole sequence (up to
        rounding). The blocks' weights are used directly: module calls cost more than the arithmetic at batch 1.
        """
        B, T = idx.shape
        if kv_cache.capacity > self.config.sequence_len:
            raise InputError(
                f"KV cache of {kv_cache.capacity} positions is larger than the model's context of "
                f"{self.config.sequence_len} tokens: shorten the prompt or generate fewer tokens"
            )
        pos = kv_cache.positions(T)
        cos, sin = self.cos[0, pos], self.sin[0, pos]  # (B, T, 1, D/2)
        linear = _rowwise(kv_cache, B) if T == 1 and getattr(kv_cache, "batch_invariant", False) else F.linear
        x = rms_norm(self.embed(idx))
        for i, block in enumerate(self.blocks):
            a, mlp = block.attn, block.mlp
            h = rms_norm(x)
            q = linear(h, a.c_q.weight).view(B, T, a.n_head, a.head_dim)
            k = linear(h, a.c_k.weight).view(B, T, a.n_kv_head, a.head_dim)
            v = linear(h, a.c_v.weight).view(B, T, a.n_kv_head, a.head_dim)
            if cos.dtype != q.dtype:  # once per call (autocast): apply_rotary's casts, hoisted out of the loop
                cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            q, k = _rotary_norm_qk(q, k, cos, sin)
            y = kv_cache.attend(i, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = x + linear(y.transpose(1, 2).reshape(B, T, -1), a.c_proj.weight)
            x = x + linear(F.relu(linear(rms_norm(x), mlp.c_fc.weight)).square(), mlp.c_proj.weight)
        x = x[:, -1:] if last is None else x[torch.arange(B, device=x.device), last][:, None]
        logits = linear(rms_norm(x), self.lm_head.weight)[:, 0, : self.config.vocab_size].float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    @torch.no_grad()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[int]:
        """Sample up to `max_tokens` tokens after `tokens`, one at a time (no KV cache: recomputes each step)."""
        if not tokens:
            raise InputError("generate needs at least one prompt token: start the prompt with BOS")
        if temperature < 0:
            raise InputError(f"temperature must be ≥ 0 (got {temperature}): use 0 for greedy decoding")
        device = self.embed.weight.device
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            context = ids[:, -self.config.sequence_len:]
            logits = self(context)[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=rng)
            ids = torch.cat((ids, nxt), dim=1)
            yield int(nxt.item())
