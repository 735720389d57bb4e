"""Runs: every run's cost / time / score triple, filtered by preset, device type and date; dollars against
score with the Pareto frontier."""
from __future__ import annotations

import streamlit as st

from dashboards import charts, common, queries

ctx = common.context()
st.title("Runs")
if common.empty_state(ctx):
    st.stop()

all_runs = queries.runs(ctx.con)
with st.sidebar:
    st.subheader("filters")
    presets = st.multiselect("preset", sorted(all_runs["preset"].dropna().unique()), placeholder="all presets")
    devices = st.multiselect("device type", queries.device_types(all_runs), placeholder="all device types")
    days = all_runs["started"].dropna().dt.date
    dates = st.date_input("started between", value=(days.min(), days.max()), min_value=days.min(), max_value=days.max()) \
        if not days.empty else None
runs = queries.filter_runs(all_runs, presets, devices, dates if isinstance(dates, tuple) and len(dates) == 2 else None)
if runs.empty:
    st.info(f"No run matches these filters ({len(all_runs)} runs in the store): widen them in the sidebar.")
    st.stop()

front = queries.frontier(runs)
scored = runs["score"].notna().sum()
c = st.columns(4)
c[0].metric("runs", f"{len(runs):,}", help="after the filters")
c[1].metric("spent", common.usd(runs["cost_usd"].sum()), help="computed, failed and interrupted stages, at the price each ledger row recorded")
c[2].metric("saved by the cache", common.usd(runs["saved_usd"].sum()), help="what computing the cache hits' artifacts cost")
c[3].metric("on the Pareto frontier", f"{len(front)} of {scored} scored")

table = runs.assign(
    run=runs["run_id"].str[:8],
    link="./run?run=" + runs["run_id"],
    hardware=runs["hardware"].fillna("— (all cached)"),
    frontier=runs["run_id"].isin(front["run_id"]),
    time=runs["wall_clock_seconds"].map(common.duration),
    stage_time=runs["stage_seconds"].map(common.duration),
)
st.dataframe(
    table,
    hide_index=True,
    column_order=["link", "started", "preset", "hardware", "cost_usd", "saved_usd", "time", "stage_time", "score_name",
                  "score", "core", "chat_score", "cache_hits", "stage_executions", "failures", "frontier"],
    column_config={
        "link": st.column_config.LinkColumn("run", display_text=r"run=(.{8})", help="open the run"),
        "started": st.column_config.DatetimeColumn("started (UTC)", format="YYYY-MM-DD HH:mm:ss"),
        "cost_usd": st.column_config.NumberColumn("$", format="$%.4f", help="dollars spent; cache hits cost $0"),
        "saved_usd": st.column_config.NumberColumn("$ saved", format="$%.4f", help="what the cache hits would have cost"),
        "time": st.column_config.TextColumn("wall clock", help="first stage start to last stage end"),
        "stage_time": st.column_config.TextColumn("stage time", help="sum of the stages' wall times"),
        "score_name": st.column_config.TextColumn("score", help="ChatCORE of the final chat model if any, else CORE"),
        "score": st.column_config.NumberColumn("value", format="%.4f"),
        "core": st.column_config.NumberColumn("CORE", format="%.4f"),
        "chat_score": st.column_config.NumberColumn("ChatCORE", format="%.4f"),
        "cache_hits": st.column_config.NumberColumn("cache hits"),
        "stage_executions": st.column_config.NumberColumn("stages"),
        "frontier": st.column_config.CheckboxColumn("frontier", help="on the Pareto frontier of $ against score"),
    },
)

if scored:
    st.altair_chart(charts.pareto(runs, front))
    st.caption("A run is on the frontier when no other run with the same score name costs as little or less and scores "
               "as high or higher. A run made entirely of cache hits costs $0, so it sits at the left edge.")
else:
    st.info("None of these runs has a score yet: CORE comes from `base_eval`, ChatCORE from the chat evals "
            "(`chatforge run` without `--until`, or `--until base_eval`).")
