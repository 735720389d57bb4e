"""Checks a stage makes before it allocates: will what the config asks for fit what this machine and this data can
give? A "no" is a one-line InputError naming the config field to change, raised before the first large allocation
(a model, an optimizer, the BPE trainer's tables), so a bad size never ends in an allocator's abort or traceback.

Both checks refuse only what cannot work, and let everything else through: their figures are floors, never guesses
on the high side, and they cost a few file reads (no torch allocation, no pass over the text).

**Training memory** (`check_training_memory`, called by base, mid, sft and rl before building the model). For the
GPT of model/nn/gpt.py with L layers, width d, key/value width kv = n_kv_head × head_dim, vocabulary V (padded to
a multiple of 64 in the embedding and head, V'), at B sequences of T tokens per forward pass:

    parameters     P = P_embed + P_blocks,   P_embed = 2·V'·d (embedding, untied head),   P_blocks = L·(10·d² + 2·d·kv)
    weights        4·P                        fp32
    optimizer      8·P_embed + 4·P_blocks     AdamW's two fp32 moments; Muon's one fp32 momentum buffer
    gradients      4·P                        fp32, freed after every step (zero_grad(set_to_none=True))
    activations    B·T·(L·(8·d + 2·kv)·a + 4·V)
    need           weights + optimizer + max(gradients, activations)

a is the bytes of an activation: 2 under CUDA's bf16 autocast, 4 in fp32 on the CPU. 8·d + 2·kv per token and layer
counts only what the backward pass must keep: the inputs of the six matmuls (d for q/k/v, d for the attention output,
d for the MLP, 4·d for its second matmul) and attention's q, k, v and output (2·d + 2·kv); 4·V is one fp32 copy of the
logits. The activations are all alive at the end of the forward pass, the gradients all at the end of the backward
pass, the weights and optimizer state always: the peak is at least the larger of the two sums. Temporaries, the
logits' gradient, gradients accumulated over micro-batches, allocator slack, the CUDA context and torch.compile's
workspace come on top, so a run that passes can still run out of memory -- but one that fails cannot fit.
tests/model/test_preflight.py measures a CPU step against it: the tensors backward keeps and the optimizer's state
are at least the estimate.

The estimate is compared with the memory the device has free now: `torch.cuda.mem_get_info` for a GPU; for the CPU
MemAvailable + SwapFree of /proc/meminfo (else os.sysconf), or less under a cgroup memory limit, shared by the
processes of this node.

**Tokenizer vocabulary** (`check_tokenizer_vocab`, called before BPE training). A byte-level BPE starts from 256
byte tokens plus the special tokens, and each merge removes at least one symbol from the training text, so it can
learn at most one merge per byte it is fed: vocab_size ≤ 256 + specials + bytes. The bytes are bounded without
reading the text: the train shards' uncompressed column size (parquet metadata; each value's bytes and a length),
4 bytes per character of tokenizer.max_chars, and 4 × tokenizer.doc_cap per document. (HF `tokenizers` sizes a
table by vocab_size when it trains, ~70 bytes a token: an absurd value aborts the process, Rust backtrace and all,
with no Python exception to catch.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from model.errors import InputError

GiB = 1 << 30
VOCAB_MULTIPLE = 64  # model/nn/gpt.py pads the vocabulary to this


# ---------------------------------------------------------------- training memory

@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weight_bytes: int
    optimizer_bytes: int
    grad_bytes: int
    activation_bytes: int

    @property
    def fixed_bytes(self) -> int:
        """What a step needs at any batch size: weights, optimizer state and gradients."""
        return self.weight_bytes + self.optimizer_bytes + self.grad_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.optimizer_bytes + max(self.grad_bytes, self.activation_bytes)


def training_memory(model, batch: int, seq: int, activation_bytes: int) -> MemoryEstimate:
    """The floor of one training process's memory (see the module docstring) for `model`, a GPTConfig or anything with
    its fields (vocab_size, n_layer, n_head, n_kv_head, n_embd), at `batch` sequences of `seq` tokens."""
    d, layers = model.n_embd, model.n_layer
    kv = model.n_kv_head * (d // model.n_head)
    padded = -(-model.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    p_embed = 2 * padded * d
    p_blocks = layers * (10 * d * d + 2 * d * kv)
    params = p_embed + p_blocks
    activations = batch * seq * (layers * (8 * d + 2 * kv) * activation_bytes + 4 * model.vocab_size)
    return MemoryEstimate(params, 4 * params, 8 * p_embed + 4 * p_blocks, 4 * params, activations)


def available_memory(device) -> tuple[int, str]:
    """(bytes this process can still allocate on `device`, how to name that in a message)."""
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return free, f"{device} has {_gib(free)} GiB free"
    free = cpu_available()
    return free, f"this machine has {_gib(free)} GiB of memory available"


def cpu_available() -> int:
    """RAM a new allocation can still get: MemAvailable + SwapFree, or less where a cgroup limits this process."""
    info = _meminfo()
    if "MemAvailable" in info:
        avail = info["MemAvailable"] + info.get("SwapFree", 0)
    else:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # unknown: allow
    limit = _cgroup_headroom()
    return min(avail, limit) if limit is not None else avail


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1), page cache counted as free; None: no
    limit found."""
    try:
        rel = next((line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if line.startswith("0::")), None)
        v2 = Path("/sys/fs/cgroup") / rel.lstrip("/") if rel is not None else None
        if v2 is not None and (v2 / "memory.max").exists():
            limit = (v2 / "memory.max").read_text().strip()
            if limit == "max":
                return None
            room = int(limit) - int((v2 / "memory.current").read_text()) + _stat(v2 / "memory.stat", "file")
            swap = v2 / "memory.swap.max"
            if swap.exists() and swap.read_text().strip() != "0":  # swap allowed: as much as the limit and the system give
                cap = swap.read_text().strip()
                swap_free = _meminfo().get("SwapFree", 0)
                if cap != "max":
                    swap_free = min(swap_free, int(cap) - int((v2 / "memory.swap.current").read_text()))
                room += max(0, swap_free)
            return max(0, room)
        v1 = Path("/sys/fs/cgroup/memory")
        if (v1 / "memory.limit_in_bytes").exists():
            limit = int((v1 / "memory.limit_in_bytes").read_text())
            if limit >= 1 << 60:  # "no limit" is the largest page-aligned number
                return None
            used = int((v1 / "memory.usage_in_bytes").read_text())
            return max(0, limit - used + _stat(v1 / "memory.stat", "total_cache"))
    except (OSError, ValueError, IndexError):
        pass
    return None


def _stat(path: Path, name: str) -> int:
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return 0


def check_training_memory(stage: str, model, batch: int, seq: int, device, *, batch_field: str,
                          seq_field: str | None = None, model_field: str | None = None, procs: int = 1) -> MemoryEstimate:
    """Raise a one-line InputError when training `model` at `batch` × `seq` cannot fit `device`. `seq` 0: the rows'
    length is not known before the data is read (sft, rl), so only the model state is certain and checked.

    `batch_field`, `seq_field` and `model_field` ("base.depth=20") name the config fields that set the batch, the
    sequence length and the model's size, for the message; a fine-tuning stage has no model field (the model is its
    input checkpoint's). `procs`: training processes of this node sharing the CPU's memory (torchrun on the CPU).
    Returns the estimate when it fits."""
    kind = getattr(device, "type", str(device))
    est = training_memory(model, batch, seq, activation_bytes=2 if kind == "cuda" else 4)
    free, where = available_memory(device)
    share = procs if kind != "cuda" else 1
    if est.total_bytes * share <= free:
        return est
    subject = model_field or f"{stage} of its input checkpoint (depth {model.n_layer}, width {model.n_embd})"
    each = f" in each of {share} processes" if share > 1 else ""
    parts = f"params+optimizer {_gib(est.weight_bytes + est.optimizer_bytes)} GiB for {_count(est.params)} parameters + "
    if seq:
        at = f"{batch_field.rsplit('.', 1)[-1]}={batch}, " + (f"{seq_field.rsplit('.', 1)[-1]}={seq}" if seq_field else f"{seq} tokens")
        parts += f"max(gradients {_gib(est.grad_bytes)} GiB, activations {_gib(est.activation_bytes)} GiB at {at})"
    else:
        parts += f"gradients {_gib(est.grad_bytes)} GiB; activations not counted: the data decides the rows' lengths"
    what = f"{subject} needs ~{_gib(est.total_bytes)} GiB{each} ({parts}) but {where}"
    if est.fixed_bytes * share > free:  # not even one sequence fits: no batch size helps
        fix = f"lower {model_field.split('=')[0]}" if model_field else "fine-tune on a device with more memory"
    else:
        fix = f"lower {batch_field}" + (f" or {seq_field}" if seq_field else "")
        if model_field:
            fix = f"lower {model_field.split('=')[0]} or {batch_field}" + (f" (or {seq_field})" if seq_field else "")
    raise InputError(f"{what}: {fix}")


def checkpoint_model(artifact_dir: Path):
    """The model config (GPTConfig) recorded in a checkpoint artifact's model.json, read without loading weights;
    None when it cannot be read (the stage's own loading then says what is wrong)."""
    import json

    from model.nn.gpt import GPTConfig

    try:
        return GPTConfig.from_dict(json.loads((Path(artifact_dir) / "model.json").read_text())["model"])
    except (OSError, ValueError, KeyError, TypeError, InputError):
        return None


def _count(n: int) -> str:
    return f"{n / 1e9:,.1f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def _gib(n: float) -> str:
    g = n / GiB
    return f"{g:,.0f}" if g >= 100 else f"{g:.1f}" if g >= 1 else f"{g:.2f}"


# ---------------------------------------------------------------- tokenizer vocabulary

def text_bytes_bound(dataset_dir: Path, max_chars: int, doc_cap: int) -> int | None:
    """An upper bound of the bytes of train-split text the tokenizer is fed (see the module docstring), read from the
    shards' parquet footers; None when they cannot be read (the check then allows)."""
    import pyarrow.parquet as pq

    from model.data.dataset import list_shards

    column_bytes = rows = 0
    try:
        for path in list_shards(dataset_dir, "train"):
            md = pq.ParquetFile(path).metadata
            rows += md.num_rows
            column_bytes += sum(md.row_group(i).column(0).total_uncompressed_size for i in range(md.num_row_groups))
    except Exception:  # noqa: BLE001 - a shard the stage cannot read fails with its own clear error later
        return None
    return min(column_bytes, 4 * max_chars, 4 * doc_cap * rows)


def check_tokenizer_vocab(cfg, dataset_dir: Path) -> None:
    """Raise a one-line InputError when `cfg.vocab_size` (a TokenizerConfig) is more than BPE can learn from the
    train split of `dataset_dir`."""
    from model.config import SPECIAL_TOKENS

    text = text_bytes_bound(Path(dataset_dir), cfg.max_chars, cfg.doc_cap)
    if not text:  # unreadable, or no text at all: the stage's own error says that better
        return
    base = 256 + len(SPECIAL_TOKENS)
    if cfg.vocab_size > base + text:
        raise InputError(
            f"tokenizer.vocab_size={cfg.vocab_size} is more than BPE can learn from the training text: {base} byte and "
            f"special tokens + at most one merge per byte, and the train split gives it at most {text:,} bytes "
            f"(tokenizer.max_chars={cfg.max_chars}, doc_cap={cfg.doc_cap}): lower tokenizer.vocab_size (to well under "
            f"{base + text:,}) or give the data stage more text"
        )
