"""Helpers shared by tests: a deterministic corpus, the --set lines for a small run, a free port, the CLI's
environment, a fake Hugging Face Hub."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (a fresh clone has no ../shared); these tests need its data")
    return SHARED_DATA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(api_url: str) -> dict:
    """This process's environment for a CLI subprocess, pointed at the Prefect server `api_url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return {**env, "PREFECT_API_URL": api_url, "PYTHONUNBUFFERED": "1"}


def fake_hub(root: Path, monkeypatch) -> Path:
    """Stand in for the Hugging Face Hub with a directory per repo under `root` (the Hub's layout): uploads
    copy into it, snapshot downloads copy out of it. Returns `root`."""
    import huggingface_hub

    def create_repo(self, repo_id, **kw):
        (root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, *, repo_id, folder_path, **kw):
        shutil.copytree(folder_path, root / repo_id, dirs_exist_ok=True)
        return type("Info", (), {"commit_url": f"hub://{repo_id}/commit/1"})()

    def snapshot_download(repo_id, revision=None, cache_dir=None, **kw):
        if not (root / repo_id).exists():
            import httpx

            response = httpx.Response(404, request=httpx.Request("GET", "https://hub.invalid"))
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found", response=response)
        dest = Path(cache_dir) / repo_id.replace("/", "--")
        shutil.copytree(root / repo_id, dest, dirs_exist_ok=True)
        return str(dest)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return root


def closing_summary(output: str) -> list[str]:
    """The lines of `chatforge run`'s closing summary (artifacts/summary.py), from its last header to the end:
    asserting on these also asserts that the summary is the last thing the run printed."""
    assert "── chatforge run " in output, output[-3000:]
    return output[output.rindex("── chatforge run "):].splitlines()


def summary_keys(stdout: str, store) -> dict[str, str]:
    """stage → full key of each stage in the table of a run's closing summary (its 12-character keys,
    resolved in `store`), in the order the stages ran."""
    import re

    from artifacts.store import Store

    rows = re.findall(r"^  (\w+)\s+(?:computed|cached|failed)\s.*\s([0-9a-f]{12})\b", stdout, re.M)
    return {stage: Store(str(store)).resolve(prefix) for stage, prefix in rows}


SYLLABLES = "ka to ri me su na lo vi de pa ru sho ten mi ga bel or an is ex ul".split()


def write_corpus(path: Path, docs: int, seed: int = 0) -> Path:
    """Deterministic pseudo-English jsonl: enough variety for BPE, and large enough to kill mid-stage."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    with open(path, "w") as f:
        for i in range(docs):
            sents = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + rng.choice(".!?")
                     for _ in range(rng.randint(3, 12))]
            f.write(json.dumps({"text": f"Doc {i}: " + " ".join(sents) + f" In {1700 + i % 300}, {rng.randint(0, 99999)}."}) + "\n")
    return path


def sets_for(corpus: Path, vocab: int = 1024) -> list[str]:
    """`--set` arguments for a small, fast config of every stage."""
    return [
        "--set", json.dumps([{"kind": "local", "paths": [str(corpus)]}], separators=(",", ":")).join(["data.sources=", ""]),
        "--set", "data.docs_per_shard=2048",
        "--set", "data.row_group_size=64",
        "--set", f"tokenizer.vocab_size={vocab}",
        "--set", "tokenizer.max_chars=3000000",
        "--set", "tokenizer.report_max_chars=200000",
        "--set", "tokenizer.reference_encodings=[]",
        *SMALL_BASE,
        *OFFLINE_EVALS,
        *SMALL_CHAT,
    ]


# Eval stages with no downloads (no CORE bundle, no Hub) and small budgets; tests point local_dir at files.
OFFLINE_EVALS = [
    "--set", "core_evalset.url=null", "--set", "chat_evalset.source=none", "--set", "chat_evalset.spellingbee_items=0",
    "--set", "base_eval.max_per_task=2", "--set", "base_eval.bpb_tokens=1024", "--set", "base_eval.batch_size=4",
    "--set", "base_eval.sample_tokens=4", "--set", "chat_eval.max_per_task=2", "--set", "chat_eval.max_new_tokens=8",
]


def _mixture(train: int, identity: bool = True) -> str:
    """A conversation mixture from the generated sources that need no download (RL: only problems with answers)."""
    entries = [{"source": "arithmetic", "count": train}] + ([{"source": "identity", "count": 8}] if identity else [])
    return json.dumps({"train": entries, "val": [{"source": "arithmetic", "split": "val", "count": 4}]}, separators=(",", ":"))


# mid, sft and rl of SMALL_BASE's model in a few seconds each, on offline generated conversations.
SMALL_CHAT = [
    "--set", f"mid_data={_mixture(48)}", "--set", f"sft_data={_mixture(24)}", "--set", f"rl_data={_mixture(8, identity=False)}",
    "--set", "mid.total_batch_size=512", "--set", "mid.device_batch_size=4", "--set", "mid.eval_tokens=512",
    "--set", "mid.num_iterations=4", "--set", "mid.checkpoint_every=2",
    "--set", "sft.examples_per_step=8", "--set", "sft.device_batch_size=4", "--set", "sft.eval_examples=4",
    "--set", "sft.num_iterations=3",
    "--set", "rl.examples_per_step=2", "--set", "rl.num_samples=2", "--set", "rl.max_new_tokens=8",
    "--set", "rl.device_batch_size=2", "--set", "rl.eval_examples=2", "--set", "rl.pass_k=2", "--set", "rl.num_iterations=2",
]


# A model small enough to train a few steps in seconds on one core.
SMALL_BASE = [
    "--set", "base.depth=2", "--set", "base.head_dim=32", "--set", "base.max_seq_len=64",
    "--set", "base.device_batch_size=4", "--set", "base.total_batch_size=512", "--set", "base.num_iterations=12",
    "--set", "base.eval_every=6", "--set", "base.eval_tokens=2048", "--set", "base.sample_every=12",
    "--set", "base.sample_tokens=4", "--set", "base.checkpoint_every=4", "--set", "base.loader_threads=1",
]




def small_bpe(text: str, vocab_size: int, repeat: int = 10):
    """A byte-level BPE with the real special tokens, trained in milliseconds on `text`."""
    from tokenizers import pre_tokenizers, trainers

    from model.config import SPECIAL_TOKENS
    from model.data.tokenizer import Tokenizer, _untrained

    hf = _untrained()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([text] * repeat, trainer=trainer)
    return Tokenizer(hf)


def train_inputs(root: Path, docs: int, vocab_size: int = 512) -> tuple[Path, Path]:
    """A dataset artifact dir (row groups of 64 docs) and a tokenizer trained on it, built in-process."""
    from model.config import DataConfig, LocalSource, TokenizerConfig
    from model.data.dataset import build
    from model.data.tokenizer import train as train_tokenizer

    corpus = write_corpus(root / "docs.jsonl", docs=docs)
    data, tok = root / "data", root / "tok"
    data.mkdir()
    tok.mkdir()
    build(DataConfig(sources=[LocalSource(paths=[str(corpus)])], row_group_size=64, val_fraction=0.05), data, download_dir=root / "dl")
    train_tokenizer(TokenizerConfig(vocab_size=vocab_size, reference_encodings=[], report_max_chars=50_000), data, tok, download_dir=None)
    return data, tok


def kill_9_when(path: Path, proc, timeout: float = 300) -> None:
    """Wait for `path` (a checkpoint the training process writes), then SIGKILL the process and every process below
    it (torchrun starts each worker in a session of its own). Fails if the process finishes first."""
    from flows.worker import descendants

    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def patched_engine(model, tok, *, delay: float = 0.0, force: str | None = None, no_end: bool = False,
                   fail: str | None = None):
    """The real `model.chat.engine.Engine` over `model` with its `forward_cached` changed: `delay` seconds per call,
    always the first token of `force`, never an end token (`no_end`), or RuntimeError(`fail`) at every decoding
    step after the prefill. The server then runs its real batcher over a model whose behaviour a test can time."""
    from model.chat.engine import Engine

    forward = model.forward_cached
    forced = tok.encode(force)[0] if force else None
    ends = [tok.special_id("<|assistant_end|>"), tok.bos_id]

    def patched(idx, kv_cache, last=None):
        time.sleep(delay)
        if fail and last is None:  # the prefill passes `last`; decoding steps do not
            raise RuntimeError(fail)
        logits = forward(idx, kv_cache, last)
        if forced is not None:
            logits[:] = float("-inf")
            logits[:, forced] = 0.0
        if no_end:
            logits[:, ends] = float("-inf")
        return logits

    model.forward_cached = patched
    return Engine(model, tok)


def opinionated_gpt(vocab: int, seq: int, *, n_layer: int = 2, n_head: int = 4, n_kv_head: int | None = None,
                    n_embd: int = 64, std: float = 0.3, seed: int = 0):
    """A GPT at random init whose zero-initialised head and output projections get normal(0, std) weights too
    (otherwise every logit is 0 and every choice ties), in eval mode: for tests of inference and scoring."""
    import torch

    from model.nn.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head or n_head,
                          n_embd=n_embd, sequence_len=seq))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                p.normal_(0, std)
    return model.eval()


def script_logits(monkeypatch, model, chain: dict[int, int]) -> None:
    """Make a model follow a Markov chain `previous token -> next token`: wraps its real `forward_cached` (the
    cache path still runs) and raises the chain's next token to logit 100 (the model's own are capped at ±15)."""
    import torch

    original = model.forward_cached

    def scripted(idx, kv_cache, last=None):
        logits = original(idx, kv_cache, last)
        prev = idx[:, -1] if last is None else idx[torch.arange(idx.size(0)), last]
        for r, p in enumerate(prev.tolist()):
            if p in chain:
                logits[r, chain[p]] = 100.0
        return logits

    monkeypatch.setattr(model, "forward_cached", scripted)


HF_TEXT = ("The quick brown fox jumps over the lazy dog. What is 12 times 7? It is 84. " * 4
           + "Paris is the capital of France; Berlin is the capital of Germany.")


def write_checkpoint(root: Path, stage: str = "sft", vocab: int = 300, n_kv_head: int = 2) -> Path:
    """A checkpoint artifact dir of a random 2-layer GPT (GQA, vocabulary not a multiple of 64) whose padded head
    rows are zero, as training leaves them."""
    import torch
    from safetensors.numpy import save_file

    from model.data.tokenizer import TOKEN_BYTES_FILE, TOKENIZER_FILE, token_byte_lengths
    from model.train.common import commit

    tok = small_bpe(HF_TEXT, vocab)
    tok_dir = root / "tok"
    tok_dir.mkdir(parents=True)
    tok._hf.save(str(tok_dir / TOKENIZER_FILE))
    save_file({"token_bytes": token_byte_lengths(tok._hf)}, str(tok_dir / TOKEN_BYTES_FILE))
    model = opinionated_gpt(tok.vocab_size, 96, n_kv_head=n_kv_head)
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] = 0
    out = root / "ckpt"
    commit(out, model, model.config.to_dict(), stage, 7, tok_dir)
    return out


class RetryingClient(httpx.Client):
    """A server on a loaded machine can answer 503 (its SQLite database busy) for a moment: ask again."""

    def request(self, *args, **kwargs) -> httpx.Response:
        deadline = time.time() + 60
        while True:
            try:
                r = super().request(*args, **kwargs)
                if r.status_code != 503 or time.time() > deadline:
                    return r
            except httpx.TransportError:
                if time.time() > deadline:
                    raise
            time.sleep(0.5)
