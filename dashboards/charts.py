"""The dashboard's Altair charts, built from the DataFrames of queries.py."""
from __future__ import annotations

import altair as alt
import pandas as pd

from .queries import CACHED, COMPUTED, FAILED

RESULT_COLORS = alt.Scale(domain=[COMPUTED, CACHED, FAILED], range=["#2563eb", "#9ca3af", "#dc2626"])


def pareto(runs: pd.DataFrame, front: pd.DataFrame) -> alt.LayerChart:
    """Dollars against score, one point per scored run (colored by the score's name); the Pareto frontier
    of each score name drawn as a step line through its runs, which are ringed."""
    pts = runs[runs["score"].notna()].assign(run=runs["run_id"].str[:8], on_frontier=runs["run_id"].isin(front["run_id"]))
    tooltip = [alt.Tooltip("run:N"), alt.Tooltip("preset:N"), alt.Tooltip("hardware:N"),
               alt.Tooltip("cost_usd:Q", title="$", format="$.4f"), alt.Tooltip("score:Q", format=".4f"),
               alt.Tooltip("score_name:N", title="score"), alt.Tooltip("on_frontier:N", title="on the frontier")]
    x = alt.X("cost_usd:Q", title="cost ($)", scale=alt.Scale(zero=True))
    y = alt.Y("score:Q", title="score", scale=alt.Scale(zero=False))
    color = alt.Color("score_name:N", title="score")
    dots = alt.Chart(pts).mark_circle(size=90, opacity=0.85).encode(x=x, y=y, color=color, tooltip=tooltip)
    fr = front.assign(run=front["run_id"].str[:8])
    line = alt.Chart(fr).mark_line(interpolate="step-after", strokeDash=[5, 3]).encode(
        x=x, y=y, color=color, detail="score_name:N", order="cost_usd:Q")
    rings = alt.Chart(fr).mark_point(size=260, filled=False, strokeWidth=2).encode(x=x, y=y, color=color)
    return alt.layer(line, dots, rings).properties(height=360, title="cost against score · dashed: Pareto frontier")


def stage_bars(stages: pd.DataFrame) -> alt.HConcatChart:
    """Per stage: dollars spent (a cache hit spends nothing; what it saved is a light bar beside it) and hours
    of wall time, colored by result so that cache hits and failures stand out."""
    order = list(dict.fromkeys(stages["stage"]))
    spent = stages.assign(kind="spent", dollars=stages["cost_usd"])
    saved = stages[stages["saved_usd"] > 0].assign(kind="saved by the cache", dollars=lambda d: d["saved_usd"])
    money = pd.concat([spent, saved])[["stage", "result", "kind", "dollars", "key"]]
    dollars = alt.Chart(money).mark_bar().encode(
        y=alt.Y("stage:N", sort=order, title=None),
        x=alt.X("dollars:Q", title="dollars"),
        yOffset=alt.YOffset("kind:N", sort=["spent", "saved by the cache"]),
        color=alt.Color("result:N", scale=RESULT_COLORS, title="result"),
        opacity=alt.Opacity("kind:N", scale=alt.Scale(domain=["spent", "saved by the cache"], range=[1.0, 0.35]),
                            title="bar"),
        tooltip=["stage", "result", "kind", alt.Tooltip("dollars:Q", format="$.4f")],
    ).properties(title="dollars per stage", width=320, height=alt.Step(14))
    hours = alt.Chart(stages).mark_bar().encode(
        y=alt.Y("stage:N", sort=order, title=None),
        x=alt.X("hours:Q", title="hours (wall clock)"),
        color=alt.Color("result:N", scale=RESULT_COLORS, title="result"),
        tooltip=["stage", "result", alt.Tooltip("wall_seconds:Q", title="seconds", format=".1f"),
                 alt.Tooltip("device_hours:Q", title="device-hours", format=".5f")],
    ).properties(title="hours per stage", width=320, height=alt.Step(22))
    return alt.hconcat(dollars, hours)


def curves(points: pd.DataFrame) -> alt.FacetChart:
    """Training curves, one panel per series (train loss, val bpb, mean reward, ...), a line per stage."""
    return alt.Chart(points).mark_line(point=True).encode(
        x=alt.X("step:Q"), y=alt.Y("value:Q", scale=alt.Scale(zero=False), title=None),
        color=alt.Color("stage:N"), tooltip=["stage", "series", "step", alt.Tooltip("value:Q", format=".4f")],
    ).properties(width=280, height=200).facet(facet=alt.Facet("series:N", title=None), columns=3).resolve_scale(y="independent")


def compare_bars(table: pd.DataFrame, metric: str, title: str, fmt: str) -> alt.Chart:
    """One metric per stage for runs A and B side by side (from queries.stage_compare)."""
    long = pd.concat([table[["stage", f"{metric} {side}"]].rename(columns={f"{metric} {side}": "value"}).assign(run=side)
                      for side in ("A", "B")])
    return alt.Chart(long).mark_bar().encode(
        y=alt.Y("stage:N", sort=list(table["stage"]), title=None), x=alt.X("value:Q", title=title),
        yOffset="run:N", color=alt.Color("run:N", scale=alt.Scale(domain=["A", "B"], range=["#2563eb", "#f59e0b"])),
        tooltip=["stage", "run", alt.Tooltip("value:Q", format=fmt)],
    ).properties(width=320, height=alt.Step(12), title=title)
