"""The chatforge dashboard: `streamlit run dashboards/app.py` (what `chatforge dashboard` starts).

The frame around every page: it opens the store's catalog (read-only; cached, refreshed on each rerun),
draws the shared sidebar and warnings, then runs the page the navigation chose. The store comes from
$CHATFORGE_DASHBOARD_STORE (set by `chatforge dashboard --store`), else the default store.
"""
from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run` puts this file's directory on sys.path, not the project's root that holds the packages
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import streamlit as st  # noqa: E402

from dashboards import common  # noqa: E402

# No page or page_config icons: Streamlit turns them into the tab's favicon, fetched from fonts.gstatic.com, and
# the dashboard makes no request outside the machine.
st.set_page_config(page_title="chatforge dashboard", layout="wide")

PAGES = [
    st.Page("views/runs.py", title="Runs", url_path="runs", default=True),
    st.Page("views/run.py", title="Run", url_path="run"),
    st.Page("views/compare.py", title="Compare", url_path="compare"),
    st.Page("views/chat.py", title="Chat", url_path="chat"),
]

page = st.navigation(PAGES)
ctx = common.load()
if ctx is None:
    st.stop()
try:
    common.frame(ctx)
    page.run()
finally:
    common.close(ctx)
