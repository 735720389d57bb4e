"""What a Prefect user sees of chatforge: the deployments' run forms (from the flows' signatures), run and task
names, tags, the run graph's edges, a cached stage's report artifacts, and readable metric lines in the logs."""
from __future__ import annotations

import functools
import subprocess
import sys

import httpx
import pytest
from prefect.utilities.schema_tools.validation import validate

from flows import ui
from flows.pipeline import pipeline, stage_flow
from flows.presets import PRESETS
from helpers import cli_env, sets_for, write_corpus
from model.config import PipelineConfig, Section
from tasks.prefect_task import metrics_line
from tasks.registry import STAGES


@functools.cache
def schema_of(flow) -> dict:
    """The parameter schema a deployment of `flow` gets: what the UI's run form is drawn from."""
    return flow.to_deployment(name="form")._parameter_openapi_schema.model_dump()


def null_defaults(schema: dict) -> list[str]:
    """Fields whose schema default is null: the form would open their `None` branch ("Property is type None")."""
    out = [f"param {k}" for k, v in schema["properties"].items() if "default" in v and v["default"] is None]
    for name, d in schema.get("definitions", {}).items():
        out += [f"{name}.{k}" for k, v in d.get("properties", {}).items() if "default" in v and v["default"] is None]
    return out


def test_the_pipeline_form_needs_nothing_filled_in_for_a_quick_run():
    s = schema_of(pipeline)
    props = s["properties"]
    assert s["required"] == []  # Quick run starts at once: every parameter has a default
    assert PipelineConfig.model_validate(props["config"]["default"]) == PRESETS["tiny"]()
    assert props["until"]["default"] == "report" == ui.FULL_DAG
    assert props["until"]["anyOf"][0] == {"enum": [st.name for st in STAGES], "type": "string"}
    assert props["force"]["items"]["enum"] == [st.name for st in STAGES] and props["force"]["default"] == []
    assert props["store"]["default"] == ""
    assert all(len(props[k].get("description", "")) > 30 for k in ("config", "until", "force", "store")), props
    assert null_defaults(s) == []
    validate({}, s, raise_on_error=True)  # what the server checks a Quick run's parameters with
    # ... and what the flow then gets: the preset's config as a PipelineConfig, not the schema's JSON default
    assert pipeline.validate_parameters({}) == {"config": PRESETS["tiny"](), "until": "report", "force": (), "store": ""}
    validate({"config": props["config"]["default"], "until": "tokenizer", "force": ["data"]}, s, raise_on_error=True)
    # a plain dump (what a dispatched stage run passes) is valid too: null is still one of the anyOf's choices
    validate({"config": PRESETS["d20"]().model_dump(mode="json"), "until": None, "store": None}, s, raise_on_error=True)
    with pytest.raises(Exception, match=r"field 'until'. Failure reason: 'tokenzier' is not one of \['data', "):
        validate({"until": "tokenzier"}, s, raise_on_error=True)


def test_the_stage_form_offers_the_real_stage_names():
    s = schema_of(stage_flow)
    props = s["properties"]
    assert s["required"] == ["stage"]  # which stage to rerun is the one thing to choose
    assert props["stage"]["enum"] == [st.name for st in STAGES] and "stage to run" in props["stage"]["description"]
    assert all(len(props[k].get("description", "")) > 30 for k in ("config", "force", "store"))
    assert null_defaults(s) == []
    validate({"stage": "tokenizer"}, s, raise_on_error=True)
    assert isinstance(stage_flow.validate_parameters({"stage": "tokenizer"})["config"], PipelineConfig)
    # inputs given by name (`chatforge stage mid --input base=REF`): an empty mapping unless filled in
    assert props["inputs"]["default"] == {} and props["inputs"]["additionalProperties"] == {"type": "string"}
    assert "instead of the ones the config plans" in props["inputs"]["description"]
    validate({"stage": "mid", "inputs": {"base": "base/hf--org--repo"}}, s, raise_on_error=True)
    assert stage_flow.validate_parameters({"stage": "mid"})["inputs"] == {}
    with pytest.raises(Exception, match="inputs"):
        validate({"stage": "mid", "inputs": {"base": 3}}, s, raise_on_error=True)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_form_config_is_the_config_without_its_unset_optional_fields(preset):
    cfg = PRESETS[preset]()
    form = ui.form_config(cfg)
    assert PipelineConfig.model_validate(form) == cfg  # nothing lost

    def unset_optionals(model: Section, d: dict, where: str = "") -> list[str]:
        out = []
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if field.default is None and value is None:
                out += [f"{where}{name}"] if name in d else []
            elif isinstance(value, Section):
                out += unset_optionals(value, d[name], f"{where}{name}.")
        return out

    assert unset_optionals(cfg, form) == []
    # an explicit None that differs from the field's default stays: tiny downloads no CORE bundle
    if preset == "tiny":
        assert form["core_evalset"]["url"] is None
    validate({"config": form}, schema_of(pipeline), raise_on_error=True)


def test_run_names_say_what_runs(monkeypatch):
    import prefect.runtime.flow_run as fr

    cfg = PRESETS["tiny"]()
    monkeypatch.setitem(fr.FIELDS, "parameters", lambda: {"config": cfg, "until": "tokenizer"})
    assert ui.pipeline_run_name().startswith("tiny: up to tokenizer @ ")
    monkeypatch.setitem(fr.FIELDS, "parameters", lambda: {})  # a Quick run: the parameters' defaults
    assert ui.pipeline_run_name().startswith("tiny: all stages @ ")
    from tasks.stage import plan

    key = plan(STAGES, cfg)["base"][:12]
    monkeypatch.setitem(fr.FIELDS, "parameters", lambda: {"stage": "base", "config": ui.form_config(cfg), "force": True})
    assert ui.stage_run_name() == f"tiny: base {key} (forced)"
    monkeypatch.setitem(fr.FIELDS, "parameters", lambda: {"stage": "base", "config": {"preset": 3}})
    assert ui.stage_run_name() == "?: base"  # a bad config fails validation with its own message, not in the name


def test_tags_name_preset_and_device():
    cfg = PRESETS["tiny"]()
    assert ui.run_tags(cfg, gpus=[]) == ["chatforge", "preset:tiny", "device:cpu"]
    assert ui.run_tags(cfg, gpus=["NVIDIA H100 80GB HBM3 (81559 MiB)"])[-1] == "device:cuda"
    cfg.base.device = "cuda"
    assert ui.run_tags(cfg, gpus=[])[-1] == "device:cuda"
    cfg = PRESETS["d20"]()
    cfg.execution.pools = True  # training runs on the GPU pool's machines, not here: this host's GPUs say nothing
    assert ui.run_tags(cfg, gpus=[]) == ["chatforge", "preset:d20", "device:auto"]


def test_a_stage_logs_one_readable_line_of_metrics():
    metrics = {"score_name": "CORE-2 (partial)", "score": 0.1234, "val_bpb": 1.5, "params": 4194304, "steps": 120,
               "device_type": "cpu", "world_size": 1, "curve": {"step": [1, 2], "loss": [3.0, 2.0]},
               "notes": "x" * 500, "mfu": 0.0123}
    line = metrics_line("base_eval", "3fa2c1b0e9d2" + "0" * 52, metrics, cached=False, wall_seconds=72.5)
    assert "\n" not in line and '{"' not in line and "x" * 50 not in line
    assert line.startswith("base_eval: computed 3fa2c1b0e9d2 in 1 m 12 s · CORE-2 (partial) 0.1234 · val bpb 1.5000 · ")
    assert "params 4,194,304" in line and "steps 120" in line
    cached = metrics_line("base_eval", "3fa2c1b0e9d2" + "0" * 52, metrics, cached=True, wall_seconds=72.5, limit=2)
    assert cached.startswith("base_eval: cached 3fa2c1b0e9d2 (made in 1 m 12 s)")
    assert "more in `chatforge artifacts show 3fa2c1b0e9d2`" in cached


# ---------------------------------------------------------------- against a real Prefect server

def api_post(api: str, path: str, body: dict) -> list[dict]:
    r = httpx.post(f"{api}{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def run_facts(api: str, run_id: str) -> dict:
    """A flow run as its page shows it: name, tags, task runs by name, graph edges, artifacts, log lines."""
    run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()
    tasks = {t["name"]: t for t in api_post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})}
    graph = httpx.get(f"{api}/flow_runs/{run_id}/graph-v2", timeout=30).json()
    parents = {n["label"]: {p["id"] for p in n["parents"]} for _, n in graph["nodes"]}
    arts = api_post(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    logs = api_post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return {"run": run, "tasks": tasks, "parents": parents, "artifacts": arts, "logs": [entry["message"] for entry in logs]}


@pytest.mark.slow
def test_a_cached_run_keeps_its_names_tags_edges_and_reports(prefect_server, tmp_path):
    api, env = prefect_server, cli_env(prefect_server)
    corpus = write_corpus(tmp_path / "docs.jsonl", docs=600)
    args = [sys.executable, "-m", "flows.cli", "run", "--store", str(tmp_path / "store"), "--until", "tokenizer",
            *sets_for(corpus, vocab=600)]
    ids = []
    for _ in range(2):  # computed, then fully cached
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        ids.append(r.stdout.split("── chatforge run ", 1)[1].split()[0])

    for run_id, state in zip(ids, ("Completed", "Cached")):
        f = run_facts(api, run_id)
        assert f["run"]["name"].startswith("tiny: up to tokenizer @ ")
        assert {"chatforge", "preset:tiny", "device:cpu"} <= set(f["run"]["tags"])
        assert set(f["tasks"]) == {"data", "tokenizer"}  # task runs named by their stage
        assert {t["state"]["name"] for t in f["tasks"].values()} == {state}
        data_id = f["tasks"]["data"]["id"]
        assert f["tasks"]["tokenizer"]["task_inputs"]["wait_for"] == [{"input_type": "task_run", "id": data_id}]
        assert f["parents"]["tokenizer"] == {data_id} and f["parents"]["data"] == set()  # the graph's edge
        lines = [m for m in f["logs"] if m.startswith(("data: ", "tokenizer: "))]
        word = "computed" if state == "Completed" else "cached"
        assert any(m.startswith(f"tokenizer: {word} ") and " · vocab_size 600" in m for m in lines), lines
        assert not [m for m in f["logs"] if m.lstrip().startswith("{") or "\r" in m]  # no raw JSON, no redraws

    cached = run_facts(api, ids[1])["artifacts"]
    by_key = {a["key"]: a for a in cached if a["key"]}
    report = by_key["tokenizer-compression"]["data"]
    assert report.startswith("> **Cached**: `tokenizer` was not recomputed in this run.")
    assert str(tmp_path / "store" / "artifacts") in report and "# Tokenizer compression" in report
    data_note = [a["data"] for a in cached if a["description"].startswith("data: cached artifact")]
    assert len(data_note) == 1 and "`chatforge artifacts show" in data_note[0]
    assert "| `tokenizer` |" in by_key["chatforge-run"]["data"]


@pytest.mark.slow
def test_a_deployment_with_no_parameters_accepts_a_quick_run(prefect_server):
    """The server validates a run's parameters against the schema (enforce_parameter_schema): a Quick run sends none."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        dep_id = pipeline.to_deployment(name="ui-form-test").apply()
        with get_client(sync_client=True) as client:
            dep = client.read_deployment(dep_id)
    assert dep.enforce_parameter_schema and not dep.parameter_openapi_schema.get("required")
    quick = httpx.post(f"{prefect_server}/deployments/{dep_id}/create_flow_run", json={"parameters": {}}, timeout=30)
    assert quick.status_code == 201, quick.text
    bad = httpx.post(f"{prefect_server}/deployments/{dep_id}/create_flow_run", json={"parameters": {"until": "tokenzier"}}, timeout=30)
    assert bad.status_code == 409 and "'tokenzier' is not one of ['data'" in bad.text, bad.text
    httpx.delete(f"{prefect_server}/flow_runs/{quick.json()['id']}", timeout=30)
    httpx.delete(f"{prefect_server}/deployments/{dep_id}", timeout=30)
