"""`chatforge serve`: resolve a model reference, load one model copy per worker, serve HTTP.

Wiring (flows/cli.py):  `add_arguments(sub.add_parser("serve", help=...))`, and `cmd_serve(args)` as the
command, or call `serve_main(...)` directly. User errors (unknown ref, port in use, bad device) raise
`artifacts.errors.StoreError` / `model.errors.InputError` with one-line messages.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def resolve_artifact(model_ref: str | None, store_url: str | None) -> Path:
    """The local, verified directory of the checkpoint `model_ref` names (key, ref or hf://org/repo[@rev]);
    None: the newest chat model in the store, announced on stderr."""
    from artifacts.models import pick_model, resolve_model
    from artifacts.store import Store

    store = Store(store_url)
    return resolve_model(pick_model(model_ref, store, log=lambda m: print(m, file=sys.stderr)), store)


def artifact_key(artifact_dir: Path) -> str:
    """The artifact's key from its manifest (the directory name when it has none)."""
    try:
        return json.loads((artifact_dir / "manifest.json").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return artifact_dir.name


def _check_port(host: str, port: int) -> None:
    from model.errors import InputError

    if not 0 < port < 65536:
        raise InputError(f"port {port} is out of range: pick one in 1-65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another port with --port") from None


def serve_main(model_ref: str | None, store_url: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
               workers: int | None = None, device: str = "auto") -> int:
    """Serve `model_ref` over HTTP until Ctrl-C (then returns 0; SIGTERM ends the process after a graceful shutdown).

    workers: model copies (default: one per CUDA device, or 1 on the CPU); device: auto, cpu, cuda, cuda:N, mps."""
    import uvicorn

    from model.errors import InputError

    from .app import create_app
    from .workers import WorkerPool, plan_devices

    try:
        devices = plan_devices(device, workers)
    except ValueError as e:
        raise InputError(str(e)) from None
    _check_port(host, port)
    if model_ref is None:  # the newest chat model; its ref is also the model's name in the API
        from artifacts.models import pick_model
        from artifacts.store import Store

        model_ref = pick_model(None, Store(store_url), log=lambda m: print(m, file=sys.stderr))
    artifact_dir = resolve_artifact(model_ref, store_url)
    key = artifact_key(artifact_dir)
    if all(d == "cpu" for d in devices) and len(devices) > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))  # one share of the cores per worker
    print(f"chatforge serve: loading {model_ref} ({key[:12]}) on {', '.join(devices)}", file=sys.stderr)
    pool = WorkerPool(artifact_dir, device=device, workers=workers)
    try:
        app = create_app(pool, model_id=model_ref, key=key)
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}"
        print(f"chatforge serve: chat at {url}/  (OpenAI API: {url}/v1, model {model_ref!r}); Ctrl-C stops", flush=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"chatforge serve: warning: listening on {host} without authentication", file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    finally:
        pool.close()
    return 0


def add_arguments(p) -> None:
    """The `chatforge serve` options on an argparse (sub)parser."""
    p.add_argument("--model", default=None, help="a ref (sft/latest, base/latest), a key, or hf://org/repo[@rev] "
                   "(default: the newest chat model in the store: rl, else sft, else mid, else base)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--workers", type=int, default=None,
                   help="model copies serving requests in parallel (default: one per CUDA device, 1 on CPU)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--store", default=None, help="artifact store: a directory or fsspec URL (default: $CHATFORGE_HOME or ~/.cache/chatforge)")


def cmd_serve(args) -> int:
    return serve_main(args.model, args.store, args.host, args.port, args.workers, args.device)
