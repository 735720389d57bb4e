"""What every page shares: the store, the cached catalog (refreshed on each rerun), the states a page shows
instead of data (an empty store, a store that cannot be read, skipped files), and number formats.

The app frame (app.py) calls `load()` once per rerun, before the page; a page calls `context()`.
The catalog is one `artifacts.catalog.Catalog` per store and cache file for the whole server process
(st.cache_resource); its `refresh()` reads only new files, so a rerun over an unchanged store costs a few
milliseconds. Each rerun queries through its own cursor: a DuckDB connection serves one thread, and every
browser session runs in its own thread.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import streamlit as st

from artifacts.catalog import Catalog, default_cache_path, open_catalog
from artifacts.store import Store, default_url
from artifacts.summary import seconds
from dashboards import STORE_ENV  # set by `chatforge dashboard --store`; else the default store

START_A_RUN = "chatforge run --preset tiny"


@dataclass
class Context:
    store: Store
    catalog: Catalog
    con: object  # a DuckDB cursor for this rerun
    runs: int
    refresh_ms: float


class StoreUnavailable(Exception):
    """The store cannot be opened or listed; the message is one line naming the problem and the fix."""


def store_url() -> str | None:
    return os.environ.get(STORE_ENV) or None


@st.cache_resource(show_spinner=False)
def _catalog(url: str | None, cache: str) -> Catalog:
    return open_catalog(Store(url), cache)


def _open(url: str | None) -> tuple[Catalog, float]:
    """The cached catalog of the store at `url`, refreshed now; (catalog, milliseconds the refresh took)."""
    def not_a_store(path: str, what: str) -> StoreUnavailable:
        return StoreUnavailable(f"the store {path} {what}: pass the directory your runs wrote to "
                                "(`chatforge dashboard --store DIR`, or set CHATFORGE_HOME)")

    if url and "://" not in url and os.path.isfile(os.path.expanduser(url)):  # Store() refuses a file: say it here
        raise not_a_store(url, "is not a directory")
    try:
        store = Store(url)
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing fsspec backend, a refused connection
        raise StoreUnavailable(_why(url, e)) from None
    if store.local and not os.path.isdir(store.root):
        raise not_a_store(store.url, "is not a directory" if os.path.exists(store.root) else "does not exist")
    t0 = time.perf_counter()
    try:
        cat = _catalog(url, str(default_cache_path(store)))
        cat.refresh()
    except Exception as e:  # noqa: BLE001 - an object store that stopped answering, a permission error
        raise StoreUnavailable(_why(store.url, e)) from None
    return cat, (time.perf_counter() - t0) * 1000


def _why(url: str | None, e: Exception) -> str:
    detail = (str(e).splitlines() or [""])[0] or type(e).__name__
    return (f"cannot read the store {url or default_url()} ({type(e).__name__}: {detail}): check the URL, "
            "the network and the credentials, or pass another store with `chatforge dashboard --store URL`")


def load() -> Context | None:
    """Open and refresh the catalog for this rerun; None (after saying why) when the store cannot be read."""
    url = store_url()
    try:
        cat, ms = _open(url)
    except StoreUnavailable as e:
        st.error(str(e), icon=":material/cloud_off:")
        return None
    con = cat.cursor()
    runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    ctx = Context(cat.store, cat, con, runs, ms)
    st.session_state["_chatforge_ctx"] = ctx
    return ctx


def context() -> Context:
    """The context `load()` made for this rerun (a page runs only after the frame made one)."""
    return st.session_state["_chatforge_ctx"]


def close(ctx: Context | None) -> None:
    if ctx is not None:
        ctx.con.close()


def frame(ctx: Context) -> None:
    """The sidebar every page shares: which store, how fresh, and what could not be read."""
    with st.sidebar:
        st.caption(f"store `{ctx.store.url}`")
        st.caption(f"{ctx.runs:,} runs · catalog refreshed in {ctx.refresh_ms:.0f} ms")
        if ctx.catalog.note:
            st.caption(ctx.catalog.note)
    skipped = ctx.catalog.skipped
    if skipped:
        ledger = sum(1 for path, _ in skipped if "/ledger/" in path.replace("\\", "/"))
        what = f"{ledger} ledger row{'s' if ledger != 1 else ''}" if ledger == len(skipped) else \
            f"{len(skipped)} store file{'s' if len(skipped) != 1 else ''} ({ledger} ledger row{'s' if ledger != 1 else ''})"
        st.warning(f"{what} could not be read and {'were' if len(skipped) != 1 else 'was'} skipped: the figures below "
                   "leave them out. Fix or remove the file(s) listed below.", icon=":material/warning:")
        with st.expander("skipped files"):
            st.dataframe({"file": [p for p, _ in skipped], "reason": [r for _, r in skipped]}, hide_index=True)


def empty_state(ctx: Context) -> bool:
    """Show the explanatory empty state when the store has no runs; True when it did (the page stops there)."""
    if ctx.runs:
        return False
    st.info(f"No runs in the store `{ctx.store.url}` yet. The dashboard reads the ledger that every "
            f"`chatforge run` writes (one row per stage: time, device-hours, dollars) and the artifacts' manifests "
            f"and scores. Start a run, then reload this page:\n\n```\n{START_A_RUN}"
            f"{'' if store_url() is None else ' --store ' + ctx.store.url}\n```", icon=":material/info:")
    return True


# ---------------------------------------------------------------- formats

def usd(x) -> str:
    """Dollars: cents for anything from a dollar up, four decimals below (a tiny CPU run costs fractions of a cent)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"${x:,.2f}" if abs(x) >= 1 or x == 0 else f"${x:.4f}"


def duration(s) -> str:
    return seconds(None if isinstance(s, float) and math.isnan(s) else s)


def score(name, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{name} not scored" if isinstance(name, str) and name else "no score"
    return f"{name} {v:.4f}"


def short(run_id: str) -> str:
    return str(run_id)[:8]
