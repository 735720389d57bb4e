"""Preflight checks (model/preflight.py) and the config's bounds: what cannot fit is refused in one line naming the
field, before anything is allocated; what fits is let through."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from annotated_types import Le, Lt

from helpers import write_corpus
from model import preflight
from model.config import BaseConfig, DataConfig, LocalSource, Section, TokenizerConfig
from model.errors import InputError
from model.nn.gpt import GPT, GPTConfig
from model.preflight import GiB, MemoryEstimate, check_training_memory, training_memory

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the config's bounds

def _sections() -> list[type]:
    out, todo = [], [Section]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def test_every_integer_field_has_an_upper_bound():
    unbounded = []
    for cls in _sections():
        for name, field in cls.model_fields.items():
            args = typing.get_args(field.annotation) or (field.annotation,)
            if int in args and bool not in args and not any(isinstance(m, (Le, Lt)) for m in field.metadata):
                unbounded.append(f"{cls.__name__}.{name}")
    assert unbounded == []


def test_the_presets_are_within_the_bounds():
    from flows.presets import PRESETS

    for name, make in PRESETS.items():
        cfg = make()
        type(cfg).model_validate(cfg.model_dump(mode="json"))  # every bound and cross-field rule holds


# ---------------------------------------------------------------- training memory

@pytest.mark.parametrize("depth, vocab, n_kv_head", [(20, 65536, None), (4, 1000, 2), (32, 65536, None), (2, 4096, 1)])
def test_the_parameter_count_is_the_models(depth, vocab, n_kv_head):
    cfg = GPTConfig.from_base(BaseConfig(depth=depth, head_dim=64, n_kv_head=n_kv_head), vocab)
    with torch.device("meta"):
        model = GPT(cfg)
    assert training_memory(cfg, 1, 1, 4).params == model.num_params()


def test_the_real_presets_fit_the_gpus_they_are_run_on():
    """Err towards allowing: nanochat's d20 (32 × 2048 tokens a pass) and d32 (8 × 2048) train on 80 GB H100s."""
    d20 = GPTConfig.from_base(BaseConfig(depth=20), 65536)
    d32 = GPTConfig.from_base(BaseConfig(depth=32), 65536)
    assert training_memory(d20, 32, 2048, 2).total_bytes < 75 * GiB
    assert training_memory(d32, 8, 2048, 2).total_bytes < 75 * GiB


@pytest.mark.parametrize("depth, n_kv_head, batch, seq, vocab", [(2, None, 4, 64, 1000), (4, 1, 2, 32, 4096)])
def test_the_estimate_is_below_what_a_step_keeps(depth, n_kv_head, batch, seq, vocab):
    """One CPU step (fp32) of the real model and optimizers: the tensors autograd keeps for the backward pass (not the
    weights), and the optimizer's state, are at least what the estimate counts; gradients are exactly its count."""
    from model.nn.optim import build_optimizers

    bcfg = BaseConfig(depth=depth, head_dim=64, n_kv_head=n_kv_head, max_seq_len=seq)
    cfg = GPTConfig.from_base(bcfg, vocab)
    model = GPT(cfg)
    optimizers = build_optimizers(model, bcfg)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    idx = torch.randint(0, vocab, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, idx)
    loss.backward()
    for opt in optimizers:
        opt.step()
    est = training_memory(cfg, batch, seq, 4)
    assert est.activation_bytes <= sum(kept.values())
    assert est.weight_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert est.grad_bytes == sum(p.grad.numel() * 4 for p in model.parameters())
    state = sum(t.numel() * t.element_size() for opt in optimizers for st in opt.state.values() for t in st.values()
                if torch.is_tensor(t) and t.dim() > 0)
    assert est.optimizer_bytes <= state


def _free(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(preflight, "available_memory", lambda device: (int(gib * GiB), f"cuda:0 has {gib} GiB free"))


def test_a_model_too_deep_for_the_device_names_depth(monkeypatch):
    _free(monkeypatch, 80)
    cfg = GPTConfig.from_base(BaseConfig(depth=64), 65536)
    with pytest.raises(InputError) as e:
        check_training_memory("base", cfg, 32, 2048, "cuda", batch_field="base.device_batch_size",
                              seq_field="base.max_seq_len", model_field="base.depth=64")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("base.depth=64 needs ~") and "at device_batch_size=32, max_seq_len=2048" in msg
    assert msg.endswith("but cuda:0 has 80 GiB free: lower base.depth")  # the weights alone do not fit


def test_a_batch_too_large_names_batch_and_sequence(monkeypatch):
    _free(monkeypatch, 80)
    cfg = GPTConfig.from_base(BaseConfig(depth=20), 65536)
    assert check_training_memory("base", cfg, 32, 2048, "cuda", batch_field="base.device_batch_size").params == 560_988_160
    with pytest.raises(InputError) as e:
        check_training_memory("base", cfg, 128, 2048, "cuda", batch_field="base.device_batch_size",
                              seq_field="base.max_seq_len", model_field="base.depth=20")
    assert str(e.value).endswith("lower base.depth or base.device_batch_size (or base.max_seq_len)")


def test_a_fine_tuning_stage_names_its_batch_and_checks_only_the_state_when_rows_are_unknown(monkeypatch):
    _free(monkeypatch, 10)
    cfg = GPTConfig.from_base(BaseConfig(depth=20), 65536)  # ~7 GiB of weights, gradients and optimizer state
    with pytest.raises(InputError) as e:
        check_training_memory("mid", cfg, 32, 2048, "cuda", batch_field="mid.device_batch_size")
    assert "mid of its input checkpoint (depth 20, width 1280)" in str(e.value)
    assert str(e.value).endswith(": lower mid.device_batch_size")
    check_training_memory("sft", cfg, 32, 0, "cuda", batch_field="sft.device_batch_size")  # state only: fits
    _free(monkeypatch, 4)
    with pytest.raises(InputError, match="fine-tune on a device with more memory"):
        check_training_memory("sft", cfg, 32, 0, "cuda", batch_field="sft.device_batch_size")


def test_cpu_processes_share_the_memory(monkeypatch):
    _free(monkeypatch, 1)
    cfg = GPTConfig.from_base(BaseConfig(depth=2, head_dim=32, max_seq_len=64), 512)
    one = check_training_memory("base", cfg, 4, 64, "cpu", batch_field="base.device_batch_size")
    procs = int(GiB // one.total_bytes) + 1
    with pytest.raises(InputError, match=f"in each of {procs} processes"):
        check_training_memory("base", cfg, 4, 64, "cpu", batch_field="base.device_batch_size", procs=procs)


def test_this_machine_reports_its_memory():
    free, where = preflight.available_memory(torch.device("cpu"))
    assert 0 < free and where.startswith("this machine has ")
    assert MemoryEstimate(1, 2, 3, 4, 5).total_bytes == 2 + 3 + 5


def test_the_base_entry_point_refuses_before_building_the_model(tmp_path):
    """depth 256 on this machine: one `base: error:` line naming base.depth, in seconds, nothing written."""
    from helpers import train_inputs

    data, tok = train_inputs(tmp_path, docs=200)
    cfg = BaseConfig(depth=256, head_dim=32, max_seq_len=64, device_batch_size=4, total_batch_size=512, device="cpu")
    spec = tmp_path / "spec.json"
    (tmp_path / "out").mkdir()
    spec.write_text(json.dumps({"config": cfg.model_dump(mode="json"), "dataset_dir": str(data), "tokenizer_dir": str(tok),
                                "out_dir": str(tmp_path / "out"), "wip_dir": str(tmp_path / "wip"),
                                "metrics_path": str(tmp_path / "metrics.json")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "model.train.base", str(spec)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("base: error: base.depth=256 needs ~") and r.stderr.strip().endswith(": lower base.depth")
    assert not any((tmp_path / "out").iterdir()) and not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------- tokenizer vocabulary

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from model.data.dataset import build

    root = tmp_path_factory.mktemp("preflight-data")
    corpus = write_corpus(root / "docs.jsonl", docs=200)
    (root / "data").mkdir()
    build(DataConfig(sources=[LocalSource(paths=[str(corpus)])], row_group_size=64), root / "data", download_dir=root / "dl")
    return root / "data"


def test_the_text_bound_is_above_the_bytes_fed(dataset):
    from model.data.dataset import iter_texts

    fed = sum(len(t.encode()) for t in iter_texts(dataset, "train"))
    bound = preflight.text_bytes_bound(dataset, max_chars=10**9, doc_cap=10**6)
    assert fed <= bound < 1.1 * fed
    assert preflight.text_bytes_bound(dataset, max_chars=1000, doc_cap=10**6) == 4000  # max_chars caps it
    assert preflight.text_bytes_bound(dataset.parent / "no-such-dataset", 10, 10) == 0


def test_a_vocabulary_the_text_cannot_give_is_refused_before_training(dataset, tmp_path):
    from model.data.tokenizer import train

    bound = preflight.text_bytes_bound(dataset, 10**9, 10_000) + 265
    preflight.check_tokenizer_vocab(TokenizerConfig(vocab_size=min(bound, 1 << 20)), dataset)  # the bound itself passes
    with pytest.raises(InputError) as e:
        train(TokenizerConfig(vocab_size=bound + 1, reference_encodings=[]), dataset, tmp_path, download_dir=None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"tokenizer.vocab_size={bound + 1} is more than BPE can learn")
    assert msg.endswith("lower tokenizer.vocab_size (to well under " + f"{bound:,}) or give the data stage more text")
    assert not any(tmp_path.iterdir())


def test_an_absurd_vocabulary_past_the_config_is_an_error_not_an_abort(dataset, tmp_path):
    """The BPE trainer aborts the process (SIGABRT, Rust backtrace) on vocab_size=10**12; the check runs first even
    when the config's own bound is bypassed."""
    code = ("import sys; from pathlib import Path; from model.config import TokenizerConfig; "
            "from model.data.tokenizer import train; from model.errors import InputError\n"
            "cfg = TokenizerConfig.model_construct(**{**TokenizerConfig().model_dump(), 'vocab_size': 10**12})\n"
            "try:\n    train(cfg, Path(sys.argv[1]), Path(sys.argv[2]), None)\n"
            "except InputError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(dataset), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("tokenizer.vocab_size=1000000000000 is more than BPE can learn")
