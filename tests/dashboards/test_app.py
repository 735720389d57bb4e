"""Every dashboard page through Streamlit's AppTest, on a store made by real runs (conftest.py), and the states a
page shows instead of data: an empty store, a corrupt ledger row, an unknown run id, an unreachable store.

Expected figures come from the store's ledger files read here with json, not from the catalog or the
dashboard's queries, so that a wrong query fails a test."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from helpers import free_port

APP = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"
TIMEOUT = 120  # the first run opens the catalog; the chat page loads torch and the checkpoint


def app(store, **params) -> AppTest:
    """The dashboard on `store`, run once on its default page (Runs)."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params.update(params)
    return at


def open_page(store, monkeypatch, page: str | None = None, **params) -> AppTest:
    monkeypatch.setenv("CHATFORGE_DASHBOARD_STORE", str(store))
    at = app(store).run()
    if page:
        at.query_params.update(params)
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    """Everything the page wrote, as text (titles, markdown, captions, metrics, alerts)."""
    out = []
    for kind in ("title", "subheader", "markdown", "caption", "error", "warning", "info", "success"):
        out += [str(e.value) for e in getattr(at, kind)]
    out += [f"{m.label}: {m.value}" for m in at.metric]
    return "\n".join(out)


def charts(at: AppTest) -> list[dict]:
    """The Vega-Lite charts on the page: spec, and each dataset as a list of row dicts."""
    out = []
    for el in at.get("vega_lite_chart"):
        data = {d.name: pa.ipc.open_stream(d.data.data).read_all().to_pylist() for d in el.proto.datasets}
        out.append({"spec": json.loads(el.proto.spec), "data": data})
    return out


def ledger(store: Path) -> dict[str, list[dict]]:
    """run id → its ledger rows, straight from the JSON files."""
    out: dict[str, list[dict]] = {}
    for f in sorted((store / "ledger").glob("*/*.json")):
        row = json.loads(f.read_text())
        out.setdefault(row["run_id"], []).append(row)
    return out


def triple(rows: list[dict]) -> dict:
    """The cost / time / score of a run, from its rows (the definition in the issue)."""
    t = lambda s: datetime.fromisoformat(s)  # noqa: E731
    core = [r for r in rows if r["stage"] == "base_eval" and r["status"] == "completed"]
    return {
        "cost": sum(r["cost_usd"] for r in rows if not r["cache_hit"]),
        "wall": (max(t(r["end"]) for r in rows) - min(t(r["start"]) for r in rows)).total_seconds(),
        "stage_seconds": sum(r["wall_seconds"] for r in rows),
        "score": core[-1]["metrics"]["score"] if core else None,
        "score_name": core[-1]["metrics"]["score_name"] if core else None,
        "hits": sum(r["cache_hit"] for r in rows),
        "failures": sum(r["status"] == "failed" for r in rows),
    }


# ---------------------------------------------------------------- the pages on real runs

@pytest.mark.slow
def test_runs_page_shows_every_triple_and_the_frontier(fixture_store, monkeypatch):
    fs = fixture_store
    at = open_page(fs.path, monkeypatch)
    rows = ledger(fs.path)
    assert set(rows) == {fs.first, fs.cached, fs.longer, fs.failed}
    table = at.dataframe[0].value.set_index("run_id")
    assert set(table.index) == set(rows)
    for run_id, run_rows in rows.items():
        want, got = triple(run_rows), table.loc[run_id]
        assert got["cost_usd"] == pytest.approx(want["cost"], abs=1e-9)
        assert got["wall_clock_seconds"] == pytest.approx(want["wall"], abs=1e-3)
        assert got["stage_seconds"] == pytest.approx(want["stage_seconds"], abs=1e-6)
        assert got["cache_hits"] == want["hits"] and got["failures"] == want["failures"]
        if want["score"] is None:
            assert got["score"] != got["score"]  # NaN: the failed run has no score
        else:
            assert got["score"] == pytest.approx(want["score"]) and got["score_name"] == want["score_name"] == "CORE-3 (partial)"
    # the two runs with different settings computed their models: real dollars; the repeat cost nothing and saved
    assert table.loc[fs.first, "cost_usd"] > 0 and table.loc[fs.longer, "cost_usd"] > table.loc[fs.first, "cost_usd"] * 0.5
    assert table.loc[fs.cached, "cost_usd"] == 0 and table.loc[fs.cached, "saved_usd"] == pytest.approx(table.loc[fs.first, "cost_usd"])
    assert table.loc[fs.cached, "cache_hits"] == 5 and table.loc[fs.failed, "failures"] == 1

    # the frontier: the scored runs that no other scored run beats on both cost and score
    scored = {r: triple(v) for r, v in rows.items() if triple(v)["score"] is not None}
    front = {r for r, x in scored.items()
             if not any(y["cost"] <= x["cost"] and y["score"] >= x["score"] and (y["cost"], y["score"]) != (x["cost"], x["score"])
                        for s, y in scored.items() if s != r)}
    ties = {r for r in front if any(scored[s]["cost"] == scored[r]["cost"] and scored[s]["score"] == scored[r]["score"]
                                    for s in front if s < r)}
    assert set(table.index[table["frontier"]]) == front - ties
    assert fs.cached in front  # $0 for the same score as run 1: nothing beats it
    (chart,) = charts(at)
    layers = chart["spec"]["layer"]
    assert [layer["mark"]["type"] for layer in layers] == ["line", "circle", "point"]
    dots = chart["data"][layers[1]["data"]["name"]]
    assert {d["run_id"] for d in dots} == set(scored)
    line = chart["data"][layers[0]["data"]["name"]]
    assert {d["run_id"] for d in line} == front - ties
    assert f"{len(front - ties)} of {len(scored)} scored" in texts(at)


@pytest.mark.slow
def test_runs_page_filters(fixture_store, monkeypatch):
    fs = fixture_store
    at = open_page(fs.path, monkeypatch)
    preset, device = at.sidebar.multiselect
    assert preset.options == ["tiny"] and device.options == ["cpu"]
    (dates,) = at.sidebar.date_input
    day = datetime.fromisoformat(ledger(fs.path)[fs.first][0]["start"]).date()
    assert dates.value == (day, day)
    device.select("cpu").run()
    assert not at.exception
    assert set(at.dataframe[0].value["run_id"]) == {fs.first, fs.longer, fs.failed}  # the cached run used no device
    assert at.metric[0].value == "3"
    at.sidebar.multiselect[0].select("tiny").run()
    assert len(at.dataframe[0].value) == 3


@pytest.mark.slow
def test_run_page_stages_curves_report_and_lineage(fixture_store, monkeypatch):
    fs = fixture_store
    at = open_page(fs.path, monkeypatch, "run", run=fs.cached[:8])
    assert at.selectbox[0].value == fs.cached
    stages = at.dataframe[0].value
    assert list(stages["stage"]) == ["data", "core_evalset", "tokenizer", "base", "base_eval"]
    assert set(stages["result"]) == {"cache hit"} and (stages["cost_usd"] == 0).all()
    first = {r["stage"]: r for r in ledger(fs.path)[fs.first]}
    assert [pytest.approx(first[s]["cost_usd"]) for s in stages["stage"]] == list(stages["saved_usd"])

    bars, curves = charts(at)
    money = next(rows for rows in bars["data"].values() if rows and "dollars" in rows[0])
    saved = {r["stage"]: r["dollars"] for r in money if r["kind"] == "saved by the cache"}
    assert set(saved) == set(first) and all(r["result"] == "cache hit" for r in money)
    points = next(iter(curves["data"].values()))
    assert {(p["stage"], p["series"]) for p in points} == {("base", "train loss"), ("base", "val bpb")}
    assert max(p["step"] for p in points if p["series"] == "train loss") == 4  # base.num_iterations of runs 1 and 2

    text = texts(at)
    assert f"# chatforge report card: run {fs.cached}" in text  # artifacts.report's card
    assert "CORE-3 (partial)" in text
    dot = at.get("graphviz_chart")[0].proto.spec
    lineage = at.dataframe[1].value
    assert list(lineage["stage"]) == list(stages["stage"])
    assert set(lineage["computed_by"]) == {fs.first[:8]}  # every artifact came from run 1's computation
    for key in stages["key"]:  # 12-character keys in the table, full keys in the graph
        assert key in dot
    parents = {k: json.loads(next((fs.path / "artifacts").glob(f"{k}*/manifest.json")).read_text())["parents"]
               for k in stages["key"]}
    edges = {(p, full) for k, ps in parents.items() for full in [_full(fs, k)] for p in ps.values()}
    assert len(edges) == 6  # data → tokenizer; data, tokenizer → base; data, base, core_evalset → base_eval
    assert all(f'"{p}" -> "{c}"' in dot for p, c in edges) and dot.count("->") == len(edges)


@pytest.mark.slow
def test_run_page_of_the_failed_run_names_the_error(fixture_store, monkeypatch):
    at = open_page(fixture_store.path, monkeypatch, "run", run=fixture_store.failed)
    (err,) = at.error
    assert err.value.startswith("data failed after ") and "produced no documents" in err.value
    assert list(at.dataframe[0].value["result"]) == ["failed"]
    assert "This run committed or used no artifact" in texts(at)


@pytest.mark.slow
def test_compare_page_config_diff_stages_and_evals(fixture_store, monkeypatch):
    fs = fixture_store
    at = open_page(fs.path, monkeypatch, "compare", a=fs.first, b=fs.longer)
    diff = at.dataframe[0].value.set_index("setting")
    assert diff.loc["base.num_iterations"].tolist() == ["4", "6"]
    assert list(diff.index) == ["base.num_iterations"]  # nothing else differs (the runs' own ids are left out)
    stages = at.dataframe[1].value.set_index("stage")
    assert stages.loc["tokenizer", "result A"] == "computed" and stages.loc["tokenizer", "result B"] == "cache hit"
    assert stages.loc["base", "result B"] == "computed" and stages.loc["base", "cost_usd B"] > 0
    evals = at.dataframe[2].value
    copa = evals[(evals["task"] == "copa") & (evals["metric"] == "centered")].iloc[0]
    core = {r: json.loads(next((fs.path / "artifacts").glob(f"{k}/core.json")).read_text())
            for r, k in ((fs.first, _key(fs, fs.first, "base_eval")), (fs.longer, _key(fs, fs.longer, "base_eval")))}
    assert copa["A"] == pytest.approx(core[fs.first]["tasks"]["copa"]["centered"])
    assert copa["B"] == pytest.approx(core[fs.longer]["tasks"]["copa"]["centered"])
    assert (evals["note"] == "").all()  # tasks that did not run are hidden until asked for
    at.toggle[0].set_value(True).run()
    assert "not run: data unavailable" in set(at.dataframe[2].value["note"])


def _full(fs, prefix: str) -> str:
    return next((fs.path / "artifacts").glob(f"{prefix}*")).name


def _key(fs, run_id: str, stage: str) -> str:
    return next(r["key"] for r in ledger(fs.path)[run_id] if r["stage"] == stage)


@pytest.mark.slow
def test_chat_page_streams_a_reply_from_a_checkpoint(fixture_store, monkeypatch):
    fs = fixture_store
    base = _key(fs, fs.first, "base")
    at = open_page(fs.path, monkeypatch, "chat", model=base[:12])
    keys = at.selectbox[0].options
    base_keys = {_key(fs, fs.first, "base")[:12], _key(fs, fs.longer, "base")[:12]}
    assert len(keys) == 2 and all(k.split(" · ")[0] == "base" and k.split(" · ")[1] in base_keys for k in keys)
    assert at.selectbox[0].value == base  # the checkpoint the link named
    at.sidebar.slider[0].set_value(0.0)  # greedy: the same reply every time
    at.chat_input[0].set_value("Doc 1:").run()
    assert not at.exception, [e.value for e in at.exception]
    user, assistant = at.chat_message
    assert user.markdown[0].value == "Doc 1:"
    reply = assistant.markdown[0].value
    assert reply.strip()
    assert any("tokens · first after" in c.value for c in assistant.caption)

    # the same prompt to the same checkpoint through `chatforge chat`: the same greedy reply
    r = subprocess.run([sys.executable, "-m", "flows.cli", "chat", "--store", str(fs.path), "--model", base,
                        "-p", "Doc 1:", "--temperature", "0", "--max-tokens", "128"], capture_output=True, text=True, timeout=120,
                       cwd=APP.parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == reply.strip()


@pytest.mark.slow
def test_pages_other_than_chat_never_import_torch(fixture_store):
    """Runs, Run and Compare work where torch cannot even be imported."""
    code = f"""
import sys, os
sys.modules["torch"] = None  # `import torch` now raises ImportError
os.environ["CHATFORGE_DASHBOARD_STORE"] = {str(fixture_store.path)!r}
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({str(APP)!r}, default_timeout={TIMEOUT}).run()
assert not at.exception, at.exception
for page in ("run", "compare"):
    at.switch_page(f"views/{{page}}.py").run()
    assert not at.exception, (page, [e.value for e in at.exception])
    assert at.dataframe, page
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=APP.parents[1])
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ---------------------------------------------------------------- what a page shows instead of data

@pytest.mark.parametrize("page", [None, "run", "compare", "chat"])
def test_empty_store_explains_how_to_fill_it(page, tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    at = open_page(store, monkeypatch, page)
    (info,) = at.info
    assert f"No runs in the store `{store}` yet" in info.value and f"chatforge run --preset tiny --store {store}" in info.value
    assert not at.dataframe and not at.error


@pytest.mark.slow
def test_corrupt_ledger_row_is_skipped_counted_and_warned(store_copy, fixture_store, monkeypatch):
    rows = sorted((store_copy / "ledger" / fixture_store.longer).glob("*.json"))
    tokenizer = next(p for p in rows if "-tokenizer-" in p.name)
    tokenizer.write_bytes(tokenizer.read_bytes()[:40])  # truncated mid-write
    (store_copy / "ledger" / fixture_store.longer / "2099-01-01T000000.000+0000-base-deadbeef.json").write_text("{]")
    at = open_page(store_copy, monkeypatch)
    (warning,) = at.warning
    assert warning.value.startswith("2 ledger rows could not be read and were skipped")
    skipped = at.dataframe[0].value  # the list of skipped files, in the warning's expander
    assert {Path(p).name for p in skipped["file"]} == {tokenizer.name, "2099-01-01T000000.000+0000-base-deadbeef.json"}
    assert all("invalid JSON" in r for r in skipped["reason"])
    table = at.dataframe[1].value.set_index("run_id")
    assert table.loc[fixture_store.longer, "stage_executions"] == 4  # the page renders the rows it could read
    at.switch_page("views/run.py").run()
    assert not at.exception and at.warning[0].value.startswith("2 ledger rows")


@pytest.mark.slow
@pytest.mark.parametrize("page, params, message", [
    ("run", {"run": "0000dead"}, "No run '0000dead' in the store"),
    ("compare", {"a": "0000dead"}, "No run '0000dead' in the store"),
    ("chat", {"model": "0000dead"}, "No checkpoint '0000dead' in the store"),
])
def test_unknown_run_id_is_a_clear_message(page, params, message, fixture_store, monkeypatch):
    at = open_page(fixture_store.path, monkeypatch, page, **params)
    (err,) = at.error
    assert err.value.startswith(message) and str(fixture_store.path) in err.value
    if page == "run":  # nothing about another run is shown until one is picked
        assert not at.metric and at.selectbox[0].value is None
        at.selectbox[0].set_value(fixture_store.first).run()
        assert not at.exception and not at.error and at.query_params["run"] == fixture_store.first
        assert at.metric[0].label == "cost"


@pytest.mark.parametrize("kind", ["refused", "missing", "file", "scheme"])
def test_unreachable_store_is_a_clear_message(kind, tmp_path, monkeypatch):
    store = {"refused": f"ftp://127.0.0.1:{free_port()}/store", "missing": str(tmp_path / "nowhere"),
             "file": str(tmp_path / "a-file"), "scheme": "ftpx://host/store"}[kind]
    (tmp_path / "a-file").write_text("not a store")
    monkeypatch.setenv("CHATFORGE_DASHBOARD_STORE", store)
    at = app(store).run()
    assert not at.exception, [e.value for e in at.exception]
    (err,) = at.error
    expected = {"refused": "cannot read the store ftp://127.0.0.1:", "missing": f"the store {store} does not exist",
                "file": f"the store {store} is not a directory", "scheme": "cannot read the store ftpx://host/store"}[kind]
    assert err.value.startswith(expected) and "--store" in err.value and "\n" not in err.value
    assert not at.title  # no page ran on a store that cannot be read
