"""The chatforge dashboard (Streamlit over the DuckDB catalog): app.py is the entry point, views/ the pages,
queries.py what they show, charts.py how; `chatforge dashboard` (cli.py) starts it. Reads the store, never
writes it. Nothing here imports torch except the Chat page, once a checkpoint is loaded."""

STORE_ENV = "CHATFORGE_DASHBOARD_STORE"  # the store the app reads (set by `chatforge dashboard --store`)
