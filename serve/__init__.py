"""The chat server: an OpenAI-compatible HTTP API (`/v1/chat/completions`, streaming) over a pool of model
workers, a small web chat page, and the terminal chat. Depends on `model` and `artifacts` only."""
