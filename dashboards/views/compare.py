"""Compare: two runs side by side: their triples, the settings that differ, per-stage time and cost, and
per-task eval scores."""
from __future__ import annotations

import streamlit as st

from dashboards import charts, common, queries

ctx = common.context()
st.title("Compare")
if common.empty_state(ctx):
    st.stop()

all_runs = queries.runs(ctx.con)
ids = list(all_runs["run_id"])
labels = {r: f"{r[:8]} · {p} · {common.score(n, s)}" for r, p, n, s in
          zip(all_runs["run_id"], all_runs["preset"], all_runs["score_name"], all_runs["score"])}


def pick(param: str, fallback: str) -> str | None:
    asked = st.query_params.get(param)
    if not asked:
        return fallback
    found = queries.find_run(ctx.con, asked)
    if found is None:
        st.error(f"No run {asked!r} in the store `{ctx.store.url}`: the id is wrong or its ledger rows are in another "
                 f"store. Pick run {param.upper()} below.", icon=":material/search_off:")
    return found


def _picked(param: str) -> None:
    st.query_params[param] = st.session_state[f"compare_{param}"]


default_a = pick("a", ids[1] if len(ids) > 1 else ids[0])
default_b = pick("b", ids[0])
left, right = st.columns(2)
a = left.selectbox("run A", ids, index=ids.index(default_a) if default_a else None, format_func=labels.get,
                   key="compare_a", on_change=_picked, args=("a",), placeholder="pick a run")
b = right.selectbox("run B", ids, index=ids.index(default_b) if default_b else None, format_func=labels.get,
                    key="compare_b", on_change=_picked, args=("b",), placeholder="pick a run")
if a is None or b is None:
    st.stop()
st.query_params.update({"a": a, "b": b})
if a == b:
    st.info("Pick two different runs to compare.")
    st.stop()

ra, rb = queries.run(ctx.con, a), queries.run(ctx.con, b)
for col, r, side in ((left, ra, "A"), (right, rb, "B")):
    with col:
        c = st.columns(3)
        c[0].metric(f"cost {side}", common.usd(r["cost_usd"]))
        c[1].metric(f"wall clock {side}", common.duration(r["wall_clock_seconds"]))
        c[2].metric(f"score {side}", "—" if r["score"] != r["score"] or r["score"] is None else f"{r['score']:.4f}",
                    help=r["score_name"] if isinstance(r["score_name"], str) else "not scored")
        st.caption(f"{r['preset']} · {r['hardware'] or '— (all cached)'} · {r['cache_hits']} cache hits · "
                   f"{r['failures']} failed · saved {common.usd(r['saved_usd'])}")

st.subheader("Config diff")
diff = queries.config_diff(ctx.con, a, b)
if diff.empty:
    st.info("The two runs were started with the same config.")
else:
    st.dataframe(diff, hide_index=True, column_config={"A": f"A ({a[:8]})", "B": f"B ({b[:8]})"})

st.subheader("Stages")
table = queries.stage_compare(ctx.con, a, b)
st.altair_chart(charts.compare_bars(table, "wall_seconds", "seconds", ".1f")
                | charts.compare_bars(table, "cost_usd", "dollars", "$.4f"))
st.dataframe(table, hide_index=True, column_config={
    "wall_seconds A": st.column_config.NumberColumn("seconds A", format="%.1f"),
    "wall_seconds B": st.column_config.NumberColumn("seconds B", format="%.1f"),
    "cost_usd A": st.column_config.NumberColumn("$ A", format="$%.4f"),
    "cost_usd B": st.column_config.NumberColumn("$ B", format="$%.4f"),
})

st.subheader("Eval scores")
evals = queries.eval_compare(ctx.con, a, b)
if evals.empty:
    st.info("Neither run has an eval stage (base_eval, chat_eval_*).")
else:
    show_missing = st.toggle("show tasks that did not run", value=False)
    shown = evals if show_missing else evals[evals["note"] == ""]
    st.dataframe(shown, hide_index=True, column_config={
        "A": st.column_config.NumberColumn(f"A ({a[:8]})", format="%.4f"),
        "B": st.column_config.NumberColumn(f"B ({b[:8]})", format="%.4f"),
        "B − A": st.column_config.NumberColumn("B − A", format="%+.4f"),
    })
