"""Load on `chatforge serve`: N concurrent streaming clients on loopback; requests/s, tokens/s, time to first token.

    python bench/serve_load.py                                   # 64 clients, 2 CPU workers, depth-4 model
    python bench/serve_load.py --clients 8 --workers 1 --json
    CHATFORGE_CODE=/path/to/old/checkout python bench/serve_load.py   # the same load on another checkout

A model with random weights (--depth, width = depth × 64) and a small BPE tokenizer is committed to a
temporary store; the server runs as a subprocess (`python -m flows.cli serve`) of the checkout under test
(CHATFORGE_CODE, default this one). Each client sends --requests streaming chat completions one after the
other (temperature 1, its own seed, --max-tokens); all clients start together. Time to first token: from
sending a request to its first chunk with text. Tokens: the usage the server reports (include_usage).
Aggregate tokens/s = all completion tokens / wall time of the whole load. --json prints one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CODE = os.environ.get("CHATFORGE_CODE") or str(Path(__file__).resolve().parents[1])
sys.path.insert(0, CODE)

WORDS = ("the quick brown fox jumps over the lazy dog while a small model answers questions about numbers "
         "like 1+2 and 12*7 and tells short stories about cats, rivers, trains and the weather in spring").split()


def build_store(root: Path, depth: int, seq_len: int, vocab: int) -> str:
    """A store holding one random-weight checkpoint under ref bench/served; returns the store path."""
    import hashlib
    import shutil

    import torch
    from tokenizers import pre_tokenizers, trainers

    from artifacts.manifest import Manifest
    from artifacts.store import Store
    from model.config import SPECIAL_TOKENS
    from model.data.tokenizer import Tokenizer, _untrained
    from model.nn.checkpoint import WEIGHTS, save_weights
    from model.nn.gpt import GPT, GPTConfig

    art = root / "artifact"
    (art / "tokenizer").mkdir(parents=True)
    hf = _untrained()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([" ".join(WORDS)] * 50, trainer=trainer)
    hf.save(str(art / "tokenizer" / "tokenizer.json"))
    tok = Tokenizer.load(art / "tokenizer")
    width = depth * 64
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=depth, n_head=width // 64, n_kv_head=width // 64,
                    n_embd=width, sequence_len=seq_len)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # zero-initialised head/projections would make every logit 0: give them weights
        for name, p in model.named_parameters():
            if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                p.normal_(0, 0.02)
    save_weights(model, art / WEIGHTS)
    (art / "model.json").write_text(json.dumps({"model": cfg.to_dict(), "step": 0, "stage": "sft"}))
    store_dir = root / "store"
    store = Store(str(store_dir))
    key = hashlib.sha256(b"serve-load-bench").hexdigest()
    with store.staging(key) as tmp:
        for p in art.rglob("*"):
            if p.is_file():
                (tmp / p.relative_to(art)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, tmp / p.relative_to(art))
        store.commit(tmp, Manifest(key=key, kind="checkpoint", stage="sft", config={}, parents={}, code={}))
    store.set_ref("bench/served", key)
    return str(store_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: str, port: int, workers: int, threads: int | None, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": CODE}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--model", "bench/served", "--store", store,
           "--port", str(port), "--workers", str(workers), "--device", "cpu"]
    return subprocess.Popen(cmd, cwd=CODE, env=env, stdout=log, stderr=subprocess.STDOUT)


async def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    async with httpx.AsyncClient() as client:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with status {proc.returncode} before it answered /health")
            try:
                if (await client.get(f"{url}/health", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


async def one_request(client, url: str, seed: int, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first text, completion tokens) of one streaming request."""
    words = [WORDS[(seed * 7 + i) % len(WORDS)] for i in range(8)]
    body = {"messages": [{"role": "user", "content": " ".join(words)}], "max_tokens": max_tokens, "stream": True,
            "temperature": 1.0, "seed": seed, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    # no keep-alive: a connection the server closed while idle (uvicorn: 5 s) would fail the next request
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:
        async def run_client(c: int) -> list[tuple[float, int]]:
            return [await one_request(client, url, c * 1000 + i, max_tokens) for i in range(requests)]

        t0 = time.perf_counter()
        results = [r for per in await asyncio.gather(*(run_client(c) for c in range(clients))) for r in per]
        wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    return {"requests": len(results), "wall_s": round(wall, 3), "requests_per_s": round(len(results) / wall, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="the server's --workers")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server (default: torch's choice)")
    ap.add_argument("--depth", type=int, default=4, help="model layers (width = depth × 64)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary to train (at most; small text)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    for name in ("clients", "requests", "max_tokens", "workers", "depth"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be ≥ 1 (got {getattr(args, name)})")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        store = build_store(Path(tmp), args.depth, args.seq_len, args.vocab)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(Path(tmp) / "server.log", "w+") as log:
            proc = start_server(store, port, args.workers, args.threads, log)
            try:
                asyncio.run(wait_healthy(url, proc))
                asyncio.run(load(url, min(args.clients, 2), 1, 4))  # warm-up: first-call costs out of the figures
                result = asyncio.run(load(url, args.clients, args.requests, args.max_tokens))
            except BaseException:
                log.seek(0)
                sys.stderr.write(log.read()[-3000:])
                raise
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    result = {"code": CODE, "workers": args.workers, "clients": args.clients, "max_tokens": args.max_tokens,
              "depth": args.depth, **result}
    if args.json:
        print(json.dumps(result))
        return
    print(f"code {CODE}  workers {args.workers}  clients {args.clients}  depth {args.depth}  max_tokens {args.max_tokens}")
    print(f"requests {result['requests']} in {result['wall_s']:.2f} s: {result['requests_per_s']:.2f} requests/s, "
          f"{result['tokens_per_s']:.0f} tokens/s, time to first token p50 {result['ttft_p50_s']:.3f} s, "
          f"p95 {result['ttft_p95_s']:.3f} s")


if __name__ == "__main__":
    main()
