"""Prices: built-in < price file < --set cost.prices.X, the source each ledger row records, and bad price files
as one-line errors before anything runs."""
import os
import subprocess
import sys

import pytest

from artifacts import catalog, prices
from artifacts.ledger import DEFAULT_PRICES
from artifacts.store import Store
from flows.overrides import build_config
from tasks.runner import execute
from tasks.stage import StageDef, plan


def test_resolve_precedence_and_source():
    file_prices = {"H100": 2.49, "cpu": 0.05}
    assert prices.resolve("H100") == (DEFAULT_PRICES["H100"], "built-in")
    assert prices.resolve("H100", {}, file_prices, "/p.toml") == (2.49, "file:/p.toml")
    assert prices.resolve("H100", {"H100": 1.5}, file_prices, "/p.toml") == (1.5, "--set cost.prices.H100")
    assert prices.resolve("A100", {"H100": 1.5}, file_prices, "/p.toml") == (DEFAULT_PRICES["A100"], "built-in")
    assert prices.resolve("TPUv5", {}, file_prices, "/p.toml") == (0.0, "built-in")  # a type nobody lists costs 0


def test_price_file_default_location_and_explicit_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_HOME", str(tmp_path))
    assert prices.user_file() == ("", {})  # no file: the built-in table alone
    (tmp_path / "prices.toml").write_text("# my cloud\n[prices]\nH100 = 2.49\ncpu = 0\n")
    assert prices.user_file() == (str(tmp_path / "prices.toml"), {"H100": 2.49, "cpu": 0.0})
    other = tmp_path / "other.toml"
    other.write_text("[prices]\nA100 = 1\n")
    assert prices.user_file(other) == (str(other), {"A100": 1.0})
    monkeypatch.setenv("CHATFORGE_HOME", "s3://bucket/chatforge")
    assert prices.default_file() is None  # a remote store's home holds no local setting


@pytest.mark.parametrize("text, message", [
    ("[prices\nH100 = 2", "is not valid TOML (Expected ']'"),
    ("[prices\nH100 = 2", "(at line 1, column 8)): write [prices] then one line per device type, e.g. H100 = 2.49"),
    ("H100 = 2.49\n", "found H100; it holds only a [prices] table"),
    ("[other]\nx = 1\n", "found other; it holds only a [prices] table"),
    ("prices = 3\n", "found no [prices] table"),
    ("[prices]\nH100 = \"cheap\"\n", "prices.H100 = 'cheap' is not a price in $ per device-hour (a number ≥ 0, e.g. H100 = 2.49)"),
    ("[prices]\nH100 = -1\n", "prices.H100 = -1 is not a price"),
    ("[prices]\nH100 = nan\n", "prices.H100 = nan is not a price"),
    ("[prices]\nH100 = true\n", "prices.H100 = True is not a price"),
])
def test_bad_price_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(prices.PriceFileError) as e:
        prices.load(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(prices.PriceFileError, match="not found: create it"):
        prices.load(tmp_path / "missing.toml")


def _gpu_stage(name):
    def compute(cfg, ctx):
        ctx.device.update(type="H100", count=8, nodes=1)
        (ctx.out_dir / "out.txt").write_text(name)
        return {}
    return StageDef(name=name, kind="report", section="decontam", inputs=(), code=("artifacts.prices",), compute=compute)


def test_each_ledger_row_records_its_price_and_source(tmp_path):
    """One run, three device types priced by three layers; a later cache hit of the H100 stage saves its dollars."""
    store = Store(str(tmp_path / "store"))
    cfg = build_config("tiny", ["cost.prices.H100=2.0"])
    cfg = cfg.model_copy(update={"cost": cfg.cost.model_copy(update={"price_file": "/etc/p.toml", "file_prices": {"H100": 9.0, "cpu": 0.5}})})

    def cpu_stage(cfg_, ctx):
        (ctx.out_dir / "x").write_text("cpu")
        return {}

    stages = [_gpu_stage("gpu"), StageDef(name="cpuwork", kind="report", section="decontam", inputs=(),
                                          code=("artifacts.ledger",), compute=cpu_stage)]
    keys = plan(stages, cfg)
    for st in stages:
        execute(st, cfg, store, keys, "run-1", log=lambda m: None)
    execute(stages[0], cfg, store, keys, "run-2", log=lambda m: None)
    con = catalog.connect(store)
    rows = con.execute("select run_id, stage, device_type, devices, cache_hit, price_per_device_hour, price_source, "
                       "cost_usd > 0, saved_usd = (select cost_usd from stage_runs where run_id = 'run-1' and stage = 'gpu') "
                       "from stage_runs order by run_id, stage").fetchall()
    assert rows == [("run-1", "cpuwork", "cpu", 1, False, 0.5, "file:/etc/p.toml", True, False),
                    ("run-1", "gpu", "H100", 8, False, 2.0, "--set cost.prices.H100", True, False),
                    ("run-2", "gpu", "cpu", 1, True, 0.5, "file:/etc/p.toml", False, True)]


def cli(*args, home):
    env = {**os.environ, "CHATFORGE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120, env=env)


def test_cli_bad_price_file_fails_before_anything_runs(tmp_path):
    store = tmp_path / "store"
    bad = tmp_path / "bad.toml"
    bad.write_text("[prices]\nH100 = 'x'\n")
    r = cli("run", "--store", str(store), "--prices", str(bad), "--until", "tokenizer", home=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [f"chatforge: error: price file {bad}: prices.H100 = 'x' is not a price in $ per "
                                     "device-hour (a number ≥ 0, e.g. H100 = 2.49)"]
    assert not store.exists()  # nothing ran, nothing was written
    (tmp_path / "prices.toml").write_text("[prices\n")  # the default file is read too, and as strictly
    r = cli("stage", "tokenizer", "--store", str(store), home=tmp_path)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "prices.toml is not valid TOML" in r.stderr
    r = cli("run", "--store", str(store), "--prices", str(tmp_path / "none.toml"), "--dry-run", home=tmp_path)
    assert r.returncode == 1 and "none.toml not found" in r.stderr and not store.exists()
    # `chatforge server` puts the price file into its deployments' default config: read as strictly, at once
    r = cli("server", "--port", "9", "--prices", str(bad), home=tmp_path)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "prices.H100 = 'x' is not a price" in r.stderr
