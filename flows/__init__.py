"""Prefect flows (full pipeline, single stage), presets and the `chatforge` CLI."""
