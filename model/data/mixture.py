"""Conversation mixtures as artifacts (kind `conversations`): the `mid_data`, `sft_data` and `rl_data` stages.

A `MixtureConfig` lists entries per split (train, val), each `count` conversations of one source's split
(sources, their licences and split rules: model/data/chat_sources.py). `build` makes the artifact:

    train.parquet, val.parquet   columns `messages` (JSON text of the conversation, the schema of
                                 model/chat/conversation.py), `source` (the source name), `answer` (the
                                 N a reply's final "#### N" must equal, for GSM-style problems, arithmetic
                                 and spellingbee; null otherwise, see chat_sources); val may have 0 rows
    mixture.json                 per entry requested / available / taken / kept counts; per source its
                                 provenance (Hub repo + revision + files + sha256, PyPI package==version +
                                 archive sha256, or the generator and its seed), licence, split rule and the
                                 invalid records dropped; the decontamination figures

How a split is drawn:

1. Each source is read once for all its entries (model/data/chat_sources.py `read`).
2. Per entry: finite sources (Hub, local, identity) are shuffled with `Random(derive_seed(seed, source,
   split))` and the entry takes the first `count` (None: all). Streamed sources (sharegpt, gsm_symbolic,
   arithmetic, spelling, spellingbee) are read only up to the largest count asked of them and the entry
   takes the first `count` in stream order. Either way an entry's rows depend only on the source, the
   split, the seed and its own count.
3. Oversampling: listing a source twice takes its first `count` rows again, so each listing adds a
   copy of the same conversations (as nanochat lists a task twice for two epochs of it); a larger second
   count adds the first rows again plus new ones.
4. All rows of the split are shuffled together with `Random(derive_seed(seed, "mixture", split))`.
5. Decontamination: every conversation (train and val) is checked for `decontam_n`-gram overlap with
   every item of every eval set of the two evalset artifacts (model/data/decontam.py: same words, grams
   and short-item rule as the `decontam` stage) and dropped when it shares one; figures per source and
   per eval set go to mixture.json. Scanned per conversation: all its text (messages and assistant parts,
   newline-joined), plus, for a lettered multiple-choice user message, the question and choices without
   the letters and the instruction, which is how eval items' text reads. The SpellingBee eval's (word,
   letter) pairs are also never generated.

Errors: an unknown source is refused by the config; an endless generated source without a count, a
local entry without paths (or paths on another source), an invalid local conversation (file:line) or a
split with no training conversations is a one-line `InputError` raised before anything is written.
"""
from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from pathlib import Path

from model.config import MixtureConfig, MixtureEntry
from model.data import chat_sources
from model.data.chat_sources import ENDLESS, SPLITS, SourceContext, derive_seed, text_of
from model.errors import InputError

FILES = {"train": "train.parquet", "val": "val.parquet"}
_MC_OPTION = re.compile(r"^[A-Z]\. ")
_MC_INSTRUCTION = "Reply with the letter of the correct answer"


# ---------------------------------------------------------------- reading a mixture artifact

def load_conversations(artifact_dir, split: str) -> list[dict]:
    """The conversations of one split of a `conversations` artifact, in the mixture's order:
    [{"messages": list, "source": str, "answer": str | None}]."""
    import pyarrow.parquet as pq

    if split not in FILES:
        raise InputError(f"unknown split {split!r}: use 'train' or 'val'")
    path = Path(artifact_dir) / FILES[split]
    if not path.is_file():
        raise InputError(f"{path} is missing: {artifact_dir} is not a conversations artifact")
    table = pq.read_table(path, columns=["messages", "source", "answer"])
    cols = table.to_pydict()
    return [{"messages": json.loads(m), "source": s, "answer": a}
            for m, s, a in zip(cols["messages"], cols["source"], cols["answer"])]


# ---------------------------------------------------------------- building one

def build(cfg: MixtureConfig, out_dir, download_dir, evalset_dirs: dict[str, Path] | None = None,
          stage: str = "mixture", log=print) -> dict:
    """Write the mixture artifact into `out_dir` (empty staging directory); return the manifest metrics."""
    out_dir, download_dir = Path(out_dir), Path(download_dir)
    entries = {"train": list(cfg.train), "val": list(cfg.val)}
    _check_entries(entries, stage)
    eval_sets = _eval_sets(evalset_dirs or {})
    exclude = frozenset((it["word"], it["letter"]) for name, items in eval_sets.items()
                        if name.endswith("/spellingbee") for it in items if "word" in it and "letter" in it)

    # 1. read each source once, for every split and count asked of it
    needs: dict[tuple, dict[str, int | None]] = {}
    for split, es in entries.items():
        for e in es:
            want = needs.setdefault(_group(e), {})
            want[split] = None if (e.count is None or want.get(split, 0) is None) else max(want.get(split, 0), e.count)
    data: dict[tuple, chat_sources.SourceData] = {}
    timings: dict[str, float] = {}
    for key in sorted(needs, key=_read_order):
        source, paths = key
        ctx = SourceContext(download_dir=download_dir, hub_revision=cfg.hub_revision, seed=cfg.seed,
                            paths=list(paths) or None, exclude_pairs=exclude, stage=stage, log=log)
        t0 = time.perf_counter()
        data[key] = chat_sources.read(source, needs[key], ctx)
        timings[source] = timings.get(source, 0.0) + time.perf_counter() - t0
        got = ", ".join(f"{s} {len(rows)}" for s, rows in data[key].splits.items())
        dropped = sum(data[key].invalid.values())
        log(f"{stage}: {source}: {got} conversations read in {timings[source]:.1f}s"
            + (f" ({dropped} invalid records dropped)" if dropped else ""))
        if source in chat_sources.CAVEATS:
            log(f"{stage}: note on {source}: {chat_sources.CAVEATS[source]}")

    # 2-4. draw each entry, then shuffle the split
    rows: dict[str, list[tuple[str, dict, int]]] = {}
    entry_stats: dict[str, list[dict]] = {}
    shuffled: dict[tuple, list[dict]] = {}
    for split, es in entries.items():
        rows[split], entry_stats[split] = [], []
        for i, e in enumerate(es):
            key = _group(e)
            src = data[key]
            pool = src.splits[split]
            if not src.streamed:
                if (key, split) not in shuffled:
                    shuffled[key, split] = list(pool)
                    random.Random(derive_seed(cfg.seed, e.source, split, *key[1])).shuffle(shuffled[key, split])
                pool = shuffled[key, split]
            take = pool if e.count is None else pool[:e.count]
            if e.count is not None and len(take) < e.count:
                log(f"{stage}: {split} entry {i} ({e.source}) asked for {e.count} conversations, the source's "
                    f"{split} split has {len(take)}: taking all of them")
            stat = {"source": e.source, "requested": e.count, "taken": len(take)}
            if not src.streamed:
                stat["available"] = len(pool)
            if e.paths:
                stat["paths"] = list(e.paths)
            entry_stats[split].append(stat)
            rows[split].extend((json.dumps(rec["messages"], ensure_ascii=False), rec, i) for rec in take)
        random.Random(derive_seed(cfg.seed, "mixture", split)).shuffle(rows[split])

    # 5. decontaminate
    decontam = _decontaminate(rows, eval_sets, cfg, entry_stats, stage, log)
    if not rows["train"]:
        raise InputError(f"{stage}: the mixture has no training conversations left (its train entries gave "
                         f"{sum(s['taken'] for s in entry_stats['train'])}, decontamination dropped "
                         f"{decontam['dropped']}): add sources or raise counts")

    # write (nothing above wrote a file)
    for split in SPLITS:
        _write_parquet(out_dir / FILES[split], rows[split])
    by_source = {split: dict(sorted(Counter(rec["source"] for _, rec, _ in rows[split]).items())) for split in SPLITS}
    sources = {}
    for (source, paths), src in sorted(data.items()):
        info = sources.setdefault(source, {"licence": chat_sources.LICENCES[source],
                                           "split_rule": chat_sources.SPLIT_RULES.get(source, "hash share: val = "
                                           f"{chat_sources.VAL_SHARE:.0%} of conversations by sha256 of the first user message"),
                                           "provenance": [], "invalid_dropped": {},
                                           **({"caveat": chat_sources.CAVEATS[source]} if source in chat_sources.CAVEATS else {})})
        info["provenance"].append(src.provenance)
        for reason, n in src.invalid.items():
            info["invalid_dropped"][reason] = info["invalid_dropped"].get(reason, 0) + n
    manifest = {"stage": stage, "seed": cfg.seed, "entries": entry_stats, "conversations": by_source,
                "sources": sources, "decontamination": decontam}
    (out_dir / "mixture.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False))
    counts = {split: len(rows[split]) for split in SPLITS}
    log(f"{stage}: wrote {counts['train']} train and {counts['val']} val conversations; decontamination dropped "
        f"{decontam['dropped']} of {decontam['checked']}")
    return {
        "conversations": counts,
        "by_source": by_source,
        "invalid_dropped": {s: sum(i["invalid_dropped"].values()) for s, i in sources.items() if i["invalid_dropped"]},
        "decontamination": {k: decontam[k] for k in ("n", "sets", "checked", "dropped", "dropped_by_source", "dropped_by_set")},
        "provenance": {s: _origin(i["provenance"]) for s, i in sources.items()},
        "read_seconds": {s: round(t, 2) for s, t in sorted(timings.items())},
    }


def _group(e: MixtureEntry) -> tuple[str, tuple[str, ...]]:
    return e.source, tuple(e.paths or ()) if e.source == "local" else ()


def _read_order(key: tuple) -> tuple:
    # user files first (their errors are the likeliest and cheapest to find), downloads last
    source = key[0]
    rank = 0 if source == "local" else 1 if source in ("identity", "arithmetic") else 2 if source in ENDLESS else 3
    return rank, key


def _check_entries(entries: dict[str, list[MixtureEntry]], stage: str) -> None:
    for split, es in entries.items():
        for i, e in enumerate(es):
            where = f"{stage}.{split}[{i}] ({e.source})"
            if e.split != split:
                raise InputError(f"{where} has split {e.split!r} but is listed under {split}: list it under "
                                 f"{e.split} (or set split: {split})")
            if e.source in ENDLESS and e.count is None:
                raise InputError(f"{where} is generated without end: give it a count (e.g. count: 1000)")
            if e.source == "local" and not e.paths:
                raise InputError(f"{where} needs paths: jsonl files or globs, one conversation per line")
            if e.source != "local" and e.paths:
                raise InputError(f"{where} has paths, which only local entries read: remove them or use source: local")
    for split, es in entries.items():  # a missing local file is found before anything is downloaded
        for e in es:
            if e.source == "local":
                chat_sources.local_files(list(e.paths), stage)


def _eval_sets(evalset_dirs: dict[str, Path]) -> dict[str, list[dict]]:
    from model.evals.evalsets import load_sets

    return {f"{stage}/{name}": items for stage, d in sorted(evalset_dirs.items())
            for name, items in load_sets(Path(d)).items() if items}


def scan_texts(messages: list[dict]) -> list[str]:
    """What decontamination scans of one conversation: all its text, plus each lettered multiple-choice
    user message as eval items read (question and choices, without letters and instruction)."""
    texts = [text_of(messages)]
    for m in messages:
        if m["role"] != "user":
            continue
        lines = m["content"].split("\n")
        if sum(bool(_MC_OPTION.match(line)) for line in lines) >= 2:
            texts.append("\n".join(_MC_OPTION.sub("", line) for line in lines if not line.startswith(_MC_INSTRUCTION)))
    return texts


def _decontaminate(rows: dict, eval_sets: dict[str, list[dict]], cfg: MixtureConfig, entry_stats: dict,
                   stage: str, log) -> dict:
    from model.data.decontam import EvalIndex, item_text
    from model.progress import progress

    log(f"{stage}: indexing {sum(map(len, eval_sets.values())):,} items of {len(eval_sets)} eval sets for the "
        f"{cfg.decontam_n}-gram check")
    index = EvalIndex({name: [item_text(it) for it in items] for name, items in eval_sets.items()},
                      n=cfg.decontam_n, min_words=cfg.decontam_min_words)
    hits_of: dict[str, list[tuple[str, int]]] = {}  # a conversation listed twice is scanned once
    checked: Counter = Counter()
    dropped: Counter = Counter()
    by_set: Counter = Counter()
    examples: list[dict] = []
    bar = progress(total=sum(len(r) for r in rows.values()), desc=f"{stage} decontamination", unit="conv")
    for split in SPLITS:
        kept = []
        for row in rows[split]:
            text, rec, entry = row
            if text not in hits_of:
                found: set[tuple[str, int]] = set()
                for t in scan_texts(rec["messages"]):
                    found.update(index.hits(t))
                hits_of[text] = sorted(found)
            hits = hits_of[text]
            checked[rec["source"]] += 1
            bar.update(1)
            if not hits:
                kept.append(row)
                continue
            dropped[rec["source"]] += 1
            for name in {name for name, _ in hits}:
                by_set[name] += 1
            stat = entry_stats[split][entry]
            stat["contaminated"] = stat.get("contaminated", 0) + 1
            if len(examples) < 5:
                examples.append({"split": split, "source": rec["source"], "eval_items": [f"{n}#{i}" for n, i in hits[:3]]})
        rows[split] = kept
    bar.close()
    for split in SPLITS:
        for stat in entry_stats[split]:
            stat["kept"] = stat["taken"] - stat.get("contaminated", 0)
    report = index.report()
    sets = {name: {"items": r["items"], "checked": r["checked"], "too_short": r["too_short"],
                   "contaminated_items": r["contaminated"], "conversations_dropped": by_set.get(name, 0)}
            for name, r in report.items()}
    total = sum(dropped.values())
    if total:
        log(f"{stage}: dropped {total} conversations that share a {cfg.decontam_n}-gram with an eval item "
            f"({', '.join(f'{k} {v}' for k, v in sorted(by_set.items()))})")
    return {"n": cfg.decontam_n, "min_words": cfg.decontam_min_words, "sets": len(sets), "eval_sets": sets,
            "checked": sum(checked.values()), "dropped": total, "checked_by_source": dict(sorted(checked.items())),
            "dropped_by_source": dict(sorted(dropped.items())), "dropped_by_set": dict(sorted(by_set.items())),
            "examples": examples}


def _write_parquet(path: Path, rows: list[tuple[str, dict, int]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "messages": pa.array([text for text, _, _ in rows], pa.string()),
        "source": pa.array([rec["source"] for _, rec, _ in rows], pa.string()),
        "answer": pa.array([rec["answer"] for _, rec, _ in rows], pa.string()),
    })
    pq.write_table(table, path, compression="zstd")


def _origin(provenance: list[dict]) -> str:
    """One line per source for the manifest metrics: where it came from."""
    out = []
    for p in provenance:
        line = p.get("origin", "")
        if "revision" in p:
            line += f"@{p['revision']}"
        if "sha256" in p:
            line += f" sha256 {p['sha256'][:12]}"
        if "seed" in p:
            line += f" seed {p['seed']}"
        if "files" in p:
            line += f" ({len(p['files'])} files)"
        out.append(line)
    return "; ".join(dict.fromkeys(out))
