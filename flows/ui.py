"""What the Prefect UI shows of chatforge's flows: their parameters as a run form, and the names and tags of their
runs (a stage's task run, its metrics line and its artifacts: tasks/prefect_task.py).

The form is Prefect's rendering of the flows' signatures (flows/pipeline.py), so the signatures are written
for it: every parameter has a default a Quick run can start from (the `tiny` preset's config, which needs no
download and no GPU), the stage names are an enum (a choice, not a text field), the descriptions come from the
flows' docstrings (Prefect reads their `Args:` section), and nothing optional defaults to null -- a null
default makes the form open the `None` branch of the field's anyOf and print "Property is type None" under it
(model/config.py `_form_schema` does the same for the config's own optional fields). `form_config` is the
config as the form should show it; a deployment's `parameters` should hold that, not a raw dump.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import Field

from model.config import PipelineConfig, Section
from artifacts.keys import is_key
from tasks.registry import STAGES
from tasks.stage import plan, upstream

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]  # the schema's enum is the registry's stages
# `until` defaults to the last stage instead of None (a null default, see above). That means "the whole DAG"
# only while every stage is upstream of the last one: checked here, at import, not discovered in a short run.
FULL_DAG = STAGE_NAMES[-1]
if [s.name for s in upstream(STAGES, FULL_DAG)] != list(STAGE_NAMES):
    raise RuntimeError(f"not every stage is upstream of {FULL_DAG!r}: flows.ui.FULL_DAG no longer means the whole DAG")
DEFAULT_PRESET = "tiny"


def form_config(cfg: PipelineConfig) -> dict:
    """`cfg` as JSON for a run form or a deployment's parameters: without the optional fields that are unset
    (None where the default is None), so that the form shows them as empty fields of their own type."""
    return _prune(cfg, cfg.model_dump(mode="json"))


def _prune(model: Section, dumped: dict) -> dict:
    out = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None and field.default is None:
            continue
        if isinstance(value, Section):
            out[name] = _prune(value, dumped[name])
        elif isinstance(value, list) and value and all(isinstance(v, Section) for v in value):
            out[name] = [_prune(v, d) for v, d in zip(value, dumped[name])]
        else:
            out[name] = dumped[name]
    return out


def _default_config() -> dict:
    from flows.presets import PRESETS

    return form_config(PRESETS[DEFAULT_PRESET]())


DEFAULT_CONFIG = _default_config()
# The flows' `config` parameter. Its default is DEFAULT_CONFIG, JSON (the schema's default must be the pruned form, which
# a PipelineConfig object would not serialize to); validate_default turns it into a PipelineConfig when a run leaves
# the field out (a Quick run), as pydantic validates only what is passed otherwise.
Config = Annotated[PipelineConfig, Field(validate_default=True)]


# ---------------------------------------------------------------- run names and tags

def _config_of(params: dict) -> PipelineConfig | None:
    cfg = params.get("config", DEFAULT_CONFIG)
    if isinstance(cfg, PipelineConfig):
        return cfg
    try:
        return PipelineConfig.model_validate(cfg)
    except Exception:  # noqa: BLE001 - a bad config fails the run's parameter validation, with its own message
        return None


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%m-%d %H:%M:%SZ")


def pipeline_run_name() -> str:
    """`tiny: all stages @ 06-12 15:36:07Z`, `d20: up to base @ ...`: the preset, how far, when (UTC)."""
    from prefect import runtime

    params = runtime.flow_run.parameters or {}
    cfg = _config_of(params)
    until = params.get("until")
    target = "all stages" if until in (None, FULL_DAG) else f"up to {until}"
    return f"{cfg.preset if cfg else '?'}: {target} @ {_stamp()}"


def stage_run_name() -> str:
    """`tiny: base 3fa2c1b0e9d2`: the preset, the stage and the key it makes (the artifact this run is about); with
    given inputs (keys, as `chatforge stage --input` passes them) `tiny: mid 3fa2c1b0e9d2 from base=9c1e4b2a7d0f`."""
    from prefect import runtime

    params = runtime.flow_run.parameters or {}
    cfg, stage = _config_of(params), params.get("stage", "?")
    given = params.get("inputs") if isinstance(params.get("inputs"), dict) else {}
    key = ""
    if cfg is not None and stage in STAGE_NAMES and all(is_key(v) for v in given.values()):
        try:
            key = " " + plan(STAGES, cfg, given)[stage][:12]
        except Exception:  # noqa: BLE001 - a name is no reason to fail a run; the run itself will say what is wrong
            key = ""
    source = (" from " + ", ".join(f"{n}={r[:12] if is_key(r) else r}" for n, r in sorted(given.items()))) if given else ""
    forced = " (forced)" if params.get("force") else ""
    return f"{cfg.preset if cfg else '?'}: {stage}{key}{source}{forced}"


def run_tags(cfg: PipelineConfig, gpus: list[str]) -> list[str]:
    """`chatforge`, `preset:<name>` and `device:<cuda|cpu>` -- the device the training stages ask for, `auto`
    resolved by this host's GPUs unless work pools send training elsewhere (then `device:auto`)."""
    wanted = {cfg.base.device, cfg.mid.device, cfg.sft.device, cfg.rl.device}
    if wanted == {"auto"}:
        device = "auto" if cfg.execution.pool_names() is not None else ("cuda" if gpus else "cpu")
    else:
        device = "cuda" if "cuda" in wanted else "cpu" if wanted == {"cpu"} else "mixed"
    return ["chatforge", f"preset:{cfg.preset}", f"device:{device}"]


def tag_flow_run(tags: list[str]) -> None:
    """Add `tags` to the current flow run (its tags are fixed when it is created, before the config is read)."""
    from prefect import runtime
    from prefect.client.orchestration import get_client

    run_id = runtime.flow_run.id
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            have = client.read_flow_run(run_id).tags or []
            client.update_flow_run(run_id, tags=sorted(set(have) | set(tags)))
    except Exception as e:  # noqa: BLE001 - tags help find a run; an API hiccup setting them is no reason to fail it
        from prefect import get_run_logger

        get_run_logger().warning(f"could not tag this run {tags}: {type(e).__name__}: {e}")

