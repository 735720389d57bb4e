"""Run: one run's triple, its dollars and hours per stage (cache hits and failures marked), its training
curves, the lineage of every artifact it used (keys, parents, which run computed each), and its report card
(artifacts.report, the same card as `chatforge report`)."""
from __future__ import annotations

import streamlit as st

from dashboards import charts, common, queries

ctx = common.context()
st.title("Run")
if common.empty_state(ctx):
    st.stop()

all_runs = queries.runs(ctx.con)
ids = list(all_runs["run_id"])
asked = st.query_params.get("run")
run_id = queries.find_run(ctx.con, asked) if asked else ids[0]
if run_id is None:
    st.error(f"No run {asked!r} in the store `{ctx.store.url}`: the id is wrong or its ledger rows are in another "
             "store. Pick a run below, or on the Runs page.", icon=":material/search_off:")
labels = {r: f"{r[:8]} · {p} · {s:%Y-%m-%d %H:%M}" if s == s and s is not None else f"{r[:8]} · {p}"
          for r, p, s in zip(all_runs["run_id"], all_runs["preset"], all_runs["started"])}


def _picked() -> None:
    st.query_params["run"] = st.session_state["run_pick"]


run_id = st.selectbox("run", ids, index=ids.index(run_id) if run_id else None, format_func=labels.get, key="run_pick",
                      on_change=_picked, placeholder="pick a run")
if run_id is None:
    st.stop()
st.query_params["run"] = run_id
r = queries.run(ctx.con, run_id)

st.caption(f"run `{run_id}` · preset {r['preset'] or '—'} · hardware {r['hardware'] or '— (all cached)'} · "
           f"host {r['host'] or '—'}")
c = st.columns(5)
c[0].metric("cost", common.usd(r["cost_usd"]), help="computed, failed and interrupted stages at the price each ledger row recorded")
c[1].metric("saved by the cache", common.usd(r["saved_usd"]), help="what computing its cache hits' artifacts cost")
c[2].metric("wall clock", common.duration(r["wall_clock_seconds"]), help="first stage start to last stage end")
c[3].metric("stage time", common.duration(r["stage_seconds"]), help="the sum of the stages' wall times")
c[4].metric(r["score_name"] if isinstance(r["score_name"], str) else "score",
            "—" if r["score"] != r["score"] or r["score"] is None else f"{r['score']:.4f}",
            help="ChatCORE of the final chat model if the run has one, else CORE of the base model")
st.caption(f"{r['stage_executions']} stage executions · {r['cache_hits']} cache hits · {r['failures']} failed"
           + (f" · {r['interrupted']} interrupted" if r.get("interrupted") else "")
           + (f" · {common.score(r['core_name'], r['core'])}" if isinstance(r["core_name"], str) else "")
           + (f" · {common.score(r['chat_name'], r['chat_score'])} ({r['chat_stage']})" if isinstance(r["chat_name"], str) else ""))

stages = queries.stages(ctx.con, run_id)
st.subheader("Stages")
st.altair_chart(charts.stage_bars(stages))
st.dataframe(
    stages.assign(key=stages["key"].str[:12], wall=stages["wall_seconds"].map(common.duration)),
    hide_index=True,
    column_order=["stage", "result", "key", "wall", "device_hours", "cost_usd", "saved_usd", "device_type", "device_count",
                  "price_per_device_hour", "price_source", "error"],
    column_config={
        "wall": "wall time", "device_hours": st.column_config.NumberColumn("device-hours", format="%.5f"),
        "cost_usd": st.column_config.NumberColumn("$", format="$%.4f"),
        "saved_usd": st.column_config.NumberColumn("$ saved", format="$%.4f"),
        "device_type": "device", "device_count": "devices",
        "price_per_device_hour": st.column_config.NumberColumn("$ / device-hour", format="$%.2f"),
        "price_source": "price from",
    },
)
for row in stages[stages["result"] == queries.FAILED].itertuples():
    st.error(f"{row.stage} failed after {common.duration(row.wall_seconds)}: {row.error or 'no error recorded'}",
             icon=":material/error:")
for row in stages[stages["result"] == queries.INTERRUPTED].itertuples():
    st.warning(f"{row.stage} was interrupted (its process died; no heartbeat since {row.end}): charged for "
               f"{common.duration(row.wall_seconds)} up to that heartbeat", icon=":material/power_off:")

st.subheader("Curves")
points = queries.curves(ctx.store, ctx.con, run_id)
if points.empty:
    st.info("No training curves: this run used or made no checkpoint with a curve.json (base, mid, sft, rl).")
else:
    st.altair_chart(charts.curves(points))

st.subheader("Lineage")
lineage = queries.lineage(ctx.con, run_id)
if lineage.empty:
    st.info("This run committed or used no artifact (its stages failed).")
else:
    st.graphviz_chart(queries.lineage_dot(lineage, run_id))
    st.dataframe(
        lineage.assign(
            computed_by=[("this run" if b == run_id else b[:8]) if isinstance(b, str) else "not in the ledger"
                         for b in lineage["computed_by"]],
            parents=[", ".join(f"{s} {k[:12]}" for s, k in p.items()) or "—" for p in lineage["parents"]],
        ),
        hide_index=True,
        column_order=["stage", "key", "kind", "parents", "computed_by", "created"],
        column_config={"key": st.column_config.TextColumn("key", width="medium"),
                       "computed_by": "computed by run", "created": st.column_config.DatetimeColumn("created (UTC)")},
    )

st.subheader("Report card")
from artifacts import report  # noqa: E402 - the card is the last section; its module is needed only here

with st.container(border=True):
    st.markdown(report.markdown(report.card(ctx.con, run_id)))
