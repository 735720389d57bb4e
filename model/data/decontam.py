"""Decontamination: which eval items share a 13-gram with the training text, per eval set.

"No eval item may appear in training data" is checked the way GPT-3 / PaLM-style reports do it, on words:

- Normalization: Unicode NFKC, then lowercase, then word tokens = maximal runs of Unicode letters and
  digits (regex ``[^\\W_]+``). Punctuation, whitespace and underscores only separate words, so case,
  punctuation and spacing differences never hide a copy, and non-English text keeps its words.
- An n-gram is n consecutive word tokens of one text (default n = 13). Grams never span two training
  documents: each document is scanned on its own.
- Hashing: each word is hashed to 64 bits with blake2b (digest_size=8, little-endian); a gram's hash is
  the polynomial ``sum(word_hash[j] * B**(n-1-j)) mod 2**64``. Both are stable across processes (unlike
  ``hash()``), and the polynomial lets a document's grams be computed from prefix sums in one pass.
  A false hit needs a 64-bit collision, which is negligible at these sizes.
- An eval item is contaminated when any of its n-grams occurs in some training document.
- Items with fewer than n words: their whole word sequence is used as a single gram when it has at
  least ``min_words`` words (default 8); eight words in a row rarely repeat by chance, and skipping such
  items would leave short-question sets unchecked. Items under ``min_words`` words cannot be checked
  and are counted as ``too_short``.

An item's text is whatever the caller passes (see `item_text`): its fields are joined, so grams may run
across field boundaries (e.g. the end of a question into its first choice). A training copy of only part
of an item (a question without its choices, say) is found only if that part alone holds an n-gram.

Scanning streams: `EvalIndex.scan` takes one training document at a time and keeps only the index and
the set of hit items, never the training text. Words absent from every eval item get hash 0 and cannot
complete a matching gram except by collision, so the per-document cost is a few list comprehensions.
"""
from __future__ import annotations

import re
import unicodedata
from hashlib import blake2b
from typing import Iterable

_WORD = re.compile(r"[^\W_]+")
_MASK = (1 << 64) - 1
_BASE = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio): every power of it is invertible mod 2**64
_MAX_EXAMPLES = 5


def words(text: str) -> list[str]:
    """The normalized word tokens of `text` (NFKC, lowercase, runs of letters and digits)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _word_hash(word: str) -> int:
    return int.from_bytes(blake2b(word.encode(), digest_size=8).digest(), "little")


def _prefix(hashes: list[int]) -> list[int]:
    """pre[i] = hash of the first i words, so any gram's hash is pre[i+k] - pre[i] * B**k (mod 2**64)."""
    acc = 0
    return [0] + [acc := (acc * _BASE + h) & _MASK for h in hashes]


def _grams(pre: list[int], k: int) -> list[int]:
    bk = pow(_BASE, k, 1 << 64)
    return [(last - first * bk) & _MASK for first, last in zip(pre, pre[k:])]


def ngrams(text: str, n: int = 13) -> set[int]:
    """Stable 64-bit hashes of all n-grams of `text` (empty when it has fewer than n words)."""
    return set(_grams(_prefix([_word_hash(w) for w in words(text)]), n))


class EvalIndex:
    """Gram hash -> owning eval items, plus the items hit so far by `scan`."""

    def __init__(self, sets: dict[str, list[str]], n: int = 13, min_words: int = 8) -> None:
        if n < 1 or min_words < 1:
            raise ValueError(f"n and min_words must be >= 1, got n={n}, min_words={min_words}")
        self.n, self.min_words = n, min_words
        self._owner: list[tuple[str, int]] = []  # global item id -> (set name, index in set)
        self._sizes = {name: len(items) for name, items in sets.items()}
        self._too_short = dict.fromkeys(sets, 0)
        # One owner is stored as a bare int (the item's shared id object), several as a list: most grams
        # belong to one item, and a container per gram would multiply the index's memory.
        self._grams: dict[int, int | list[int]] = {}
        # Short items, keyed by the hash of their first min_words words: (id, length, whole-item hash).
        self._short: dict[int, list[tuple[int, int, int]]] = {}
        self._vocab: dict[str, int] = {}
        self._hit: set[int] = set()
        for name, items in sets.items():
            for idx, text in enumerate(items):
                self._add(name, idx, text)

    def _add(self, name: str, idx: int, text: str) -> None:
        gid = len(self._owner)
        self._owner.append((name, idx))
        ws = words(text)
        if len(ws) < min(self.n, self.min_words):
            self._too_short[name] += 1
            return
        hashes = [self._vocab.get(w) or self._vocab.setdefault(w, _word_hash(w)) for w in ws]
        pre = _prefix(hashes)
        if len(ws) >= self.n:
            for g in _grams(pre, self.n):
                old = self._grams.setdefault(g, gid)
                if isinstance(old, list):
                    if old[-1] != gid:  # ids only grow, so a repeat of this item's gram is always last
                        old.append(gid)
                elif old != gid:
                    self._grams[g] = [old, gid]
        else:
            whole = _grams(pre, len(ws))[0]
            self._short.setdefault(_grams(pre, self.min_words)[0], []).append((gid, len(ws), whole))

    def scan(self, text: str) -> None:
        """Feed one training document; records every eval item that shares a gram with it."""
        vocab = self._vocab
        hashes = [vocab.get(w, 0) for w in words(text)]
        if len(hashes) < min(self.n, self.min_words) or not any(hashes):
            return
        pre = _prefix(hashes)
        for g in self._grams.keys() & _grams(pre, self.n):
            owners = self._grams[g]
            self._hit.update(owners if isinstance(owners, list) else (owners,))
        if not self._short:
            return
        # Short items: find their first min_words words, then confirm the whole item follows.
        starts = _grams(pre, self.min_words)
        for g in self._short.keys() & starts:
            for i in (i for i, s in enumerate(starts) if s == g):
                for gid, k, whole in self._short[g]:
                    if i + k < len(pre) and (pre[i + k] - pre[i] * pow(_BASE, k, 1 << 64)) & _MASK == whole:
                        self._hit.add(gid)

    def hits(self, text: str) -> list[tuple[str, int]]:
        """`scan` one document and return the (set name, item index) of every eval item it hits, sorted
        (the conversation mixtures drop such documents and count them per set)."""
        before, self._hit = self._hit, set()
        try:
            self.scan(text)
            found = self._hit
        finally:
            before.update(self._hit)
            self._hit = before
        return sorted(self._owner[gid] for gid in found)

    def report(self) -> dict[str, dict]:
        hits: dict[str, list[int]] = {name: [] for name in self._sizes}
        for gid in self._hit:
            name, idx = self._owner[gid]
            hits[name].append(idx)
        out = {}
        for name, size in self._sizes.items():
            checked = size - self._too_short[name]
            found = sorted(hits[name])
            out[name] = {"items": size, "checked": checked, "too_short": self._too_short[name],
                         "contaminated": len(found), "fraction": len(found) / max(checked, 1),
                         "examples": found[:_MAX_EXAMPLES]}
        return out


def check(train_texts: Iterable[str], sets: dict[str, list[str]], n: int = 13, min_words: int = 8,
          progress: bool = False) -> dict[str, dict]:
    """Build the index, stream every training document through it, and report per eval set."""
    index = EvalIndex(sets, n=n, min_words=min_words)
    if progress:
        from model.progress import progress as progress_bar

        train_texts = progress_bar(train_texts, desc=f"{n}-gram decontamination", unit="doc")
    for text in train_texts:
        index.scan(text)
    return index.report()


# Task content, in reading order; ids, tests, entry points, gold indices and categories are left out.
_TEXT_FIELDS = ("query", "context", "context_options", "question", "prompt", "choices", "continuation",
                "solution", "chain_of_thought", "canonical_solution", "answer")


def item_text(item: dict) -> str:
    """The task text of one eval item (CORE mc/schema/lm, MMLU/ARC, GSM8K, HumanEval, spelling), newline-joined."""
    parts: list[str] = []
    for field in _TEXT_FIELDS:
        value = item.get(field)
        if isinstance(value, str):
            # A bare final answer ("18") is a number, not task text; a worked answer is kept.
            if field == "answer" and len(words(value)) < 2:
                continue
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(v for v in value if isinstance(v, str))
    return "\n".join(parts)


def markdown(report: dict[str, dict], n: int) -> str:
    """A small table: how many items of each eval set share a `n`-gram with the training text."""
    lines = [f"{n}-gram overlap of eval items with the training text", "",
             "| set | items | checked | contaminated | fraction |", "|---|---:|---:|---:|---:|"]
    for name, r in report.items():
        lines.append(f"| {name} | {r['items']} | {r['checked']} | {r['contaminated']} | {r['fraction']:.2%} |")
    return "\n".join(lines) + "\n"


def run(n: int, min_words: int, max_train_chars: int | None, dataset_dir, evalset_dirs: dict, out_dir, log=print) -> dict:
    """The `decontam` stage: every item of the evalset artifacts against the dataset's train split.

    Writes decontam.json (the report, sets named `<evalset stage>/<set>`) and decontam.md; returns metrics.
    """
    import json
    from pathlib import Path

    from model.data.dataset import iter_texts
    from model.evals.evalsets import load_sets

    sets = {f"{stage}/{name}": [item_text(it) for it in items]
            for stage, d in evalset_dirs.items() for name, items in load_sets(Path(d)).items() if items}
    scanned = {"docs": 0, "chars": 0}

    def train_texts():
        for text in iter_texts(Path(dataset_dir), "train"):
            if max_train_chars is not None and scanned["chars"] >= max_train_chars:
                return
            scanned["docs"] += 1
            scanned["chars"] += len(text)
            yield text

    report = check(train_texts(), sets, n=n, min_words=min_words, progress=True)
    out_dir = Path(out_dir)
    (out_dir / "decontam.json").write_text(json.dumps({"n": n, "min_words": min_words, "scanned": scanned, "sets": report},
                                                      indent=1, sort_keys=True))
    note = (f"\nScanned {scanned['docs']:,} training documents ({scanned['chars']:,} characters) of the train split"
            + (f", capped at {max_train_chars:,} characters" if max_train_chars else "") + ".\n")
    (out_dir / "decontam.md").write_text(markdown(report, n) + note)
    hits = {name: r["contaminated"] for name, r in report.items() if r["contaminated"]}
    log(f"decontam: {sum(hits.values())} contaminated items" + (f" ({', '.join(f'{k} {v}' for k, v in hits.items())})" if hits else ""))
    return {"contaminated": sum(hits.values()), "contaminated_by_set": hits, "sets": len(report),
            "items": sum(r["items"] for r in report.values()), "train_docs": scanned["docs"], "train_chars": scanned["chars"]}
