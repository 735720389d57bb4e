"""A damaged store file never breaks a command: a torn ledger row, a garbage ref or manifest is skipped,
counted and named (`artifacts query` / `ls` warn in one line, `verify` lists them, `gc --quarantine` moves
them aside); gc lists the resumable work in progress of unfinished keys and deletes it only with --wip;
`--store` naming a file or a malformed URL is a one-line error."""
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from artifacts import catalog, ledger
from artifacts.errors import StoreError
from artifacts.manifest import Manifest
from artifacts.store import Store

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
A, B, C, W = "a" * 64, "b" * 64, "c" * 64, "d" * 64


def _row(run, stage, key=A):
    return ledger.LedgerRow(run_id=run, stage=stage, key=key, cache_hit=False, start=T0.isoformat(),
                            end=(T0 + timedelta(seconds=5)).isoformat(), wall_seconds=5.0, device_type="cpu",
                            devices=1, nodes=1, price_per_device_hour=0.0, preset="tiny")


def _commit(store, key, stage="data", parents=None):
    with store.lock(key):
        with store.staging(key) as tmp:
            (tmp / "f").write_text(key)
            return store.commit(tmp, Manifest(key=key, kind="dataset", stage=stage, config={}, parents=parents or {}, code={}))


def cli(*args, home):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CHATFORGE_HOME": str(home)})


def _one_line_error(r, needle: str) -> None:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("chatforge: error: "), r.stderr
    assert needle in r.stderr, r.stderr


@pytest.fixture
def store(tmp_path):
    store = Store(str(tmp_path / "store"))
    _commit(store, A)
    _commit(store, B, "tokenizer", parents={"data": A})
    store.set_ref("tokenizer/latest", B)
    ledger.append(store, _row("r1", "data"))
    ledger.append(store, _row("r1", "tokenizer", key=B))
    return store


def test_torn_ledger_row_query_works_and_names_it_verify_lists_it_gc_quarantines_it(store, tmp_path):
    torn = ledger.append(store, _row("r2", "data"))
    with open(torn, "r+b") as f:
        f.truncate(30)  # a row cut short mid-write
    home = tmp_path / "home"
    r = cli("artifacts", "query", "--store", store.url, "select run_id, count(*) as n from stage_runs group by run_id", home=home)
    assert r.returncode == 0 and "r1" in r.stdout and "r2" not in r.stdout, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("chatforge: warning: skipped 1 unreadable store file(s): ")
    assert torn in r.stderr and "truncated or invalid JSON" in r.stderr and "chatforge artifacts verify" in r.stderr

    r = cli("artifacts", "verify", "--store", store.url, home=home)
    assert r.returncode == 1 and f"UNREADABLE {torn}: truncated or invalid JSON" in r.stdout
    assert r.stdout.splitlines()[-1].startswith("2 ok, 0 corrupt; 1 unreadable store file(s)")

    r = cli("artifacts", "gc", "--dry-run", "--store", store.url, home=home)
    assert r.returncode == 0 and f"unreadable {torn}" in r.stdout and os.path.exists(torn)
    r = cli("artifacts", "gc", "--quarantine", "--store", store.url, home=home)
    moved = f"{store.root}/quarantine/ledger/r2/{os.path.basename(torn)}"
    assert r.returncode == 0 and f"quarantined {torn} -> {moved}" in r.stdout, r.stdout
    assert not os.path.exists(torn) and os.path.exists(moved)
    assert store.keys() == [A, B]  # nothing else was touched
    r = cli("artifacts", "query", "--store", store.url, "select count(*) from skipped", home=home)
    assert r.returncode == 0 and r.stderr == ""
    r = cli("artifacts", "verify", "--store", store.url, home=home)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "2 ok, 0 corrupt"


def test_garbage_ref_ls_works_and_names_it(store, tmp_path):
    bad = tmp_path / "store" / "refs" / "data" / "latest.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    (tmp_path / "store" / "refs" / "data" / "other.json").write_text(json.dumps({"key": "not a key"}))
    home = tmp_path / "home"
    r = cli("artifacts", "ls", "--store", store.url, home=home)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(A[:12]) and lines[1].startswith(B[:12]) and lines[1].endswith("tokenizer/latest")
    assert len(r.stderr.splitlines()) == 1 and "skipped 2 unreadable store file(s)" in r.stderr and str(bad) in r.stderr

    r = cli("artifacts", "show", "data/latest", "--store", store.url, home=home)
    _one_line_error(r, f"ref 'data/latest' is unreadable ({bad}: ")

    damaged: list = []
    assert store.refs(damaged) == {"tokenizer/latest": B}
    assert dict(damaged) == {str(bad): "truncated or invalid JSON (Expecting value: line 1 column 1 (char 0))",
                             f"{store.root}/refs/data/other.json": 'key: expected 64 hex digits, got "not a key"'}
    skipped = dict(catalog.Catalog(store).refresh().skipped)  # the catalog lists refs among the skipped files too
    assert set(skipped) == set(dict(damaged))


def test_garbage_manifest_is_skipped_by_ls_and_quarantined_with_its_artifact(store, tmp_path):
    _commit(store, C, "base")
    manifest = tmp_path / "store" / "artifacts" / C / "manifest.json"
    manifest.write_text('{"schema": 1, "key": ')
    home = tmp_path / "home"
    r = cli("artifacts", "ls", "--store", store.url, home=home)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2 and C[:12] not in r.stdout
    assert f"skipped 1 unreadable store file(s): {manifest}: truncated or invalid JSON" in r.stderr

    report = store.gc(dry_run=True)
    assert report.damaged == [(str(manifest), report.damaged[0][1])] and report.deleted == []
    assert report.kept_unreferenced.startswith("1 artifact(s) that no readable ref reaches were kept: 1 unreadable manifest")
    report = store.gc(quarantine=True)
    assert report.quarantined == [(store.artifact_dir(C), f"{store.root}/quarantine/artifacts/{C}")]
    assert (tmp_path / "store" / "quarantine" / "artifacts" / C / "f").read_text() == C
    assert store.keys() == [A, B]


def test_gc_keeps_what_an_unreadable_ref_may_name_until_it_is_set_aside(store, tmp_path):
    _commit(store, C, "base", parents={"tokenizer": B})  # only the torn ref below named it
    ref = tmp_path / "store" / "refs" / "base" / "latest.json"
    ref.parent.mkdir(parents=True)
    ref.write_text('{"key": "' + C[:20])
    report = store.gc()
    assert store.keys() == [A, B, C] and "1 unreadable ref may name them" in report.kept_unreferenced
    report = store.gc(quarantine=True)
    assert report.quarantined == [(str(ref), f"{store.root}/quarantine/refs/base/latest.json")]
    assert store.keys() == [A, B, C]  # still kept in the call that found the damage
    report = store.gc()
    assert store.keys() == [A, B] and report.kept_unreferenced == "" and report.damaged == []


def test_quarantine_on_an_object_store(tmp_path):
    store = Store(f"memory://damage-{tmp_path.name}")
    store.local_root = tmp_path / "local"
    _commit(store, A)
    store.set_ref("data/latest", A)
    with store.fs.open(store._p("refs", "data", "bad.json"), "wb") as f:
        f.write(b"[")
    with store.fs.open(store._p("ledger", "r1", "x.json"), "wb") as f:
        f.write(b'{"run_id": "r1"')
    cat = catalog.Catalog(store).refresh()
    damaged = cat.skipped
    assert [p.rsplit("/", 2)[-2:] for p, _ in damaged] == [["r1", "x.json"], ["data", "bad.json"]]
    report = store.gc(quarantine=True, damaged=damaged)
    assert sorted(dst.split("/quarantine/")[1] for _, dst in report.quarantined) == ["ledger/r1/x.json", "refs/data/bad.json"]
    assert store.fs.exists(store._p("quarantine", "ledger", "r1", "x.json"))
    assert store.refs() == {"data/latest": A} and catalog.Catalog(store).refresh().skipped == []


def test_gc_lists_resumable_work_in_progress_and_deletes_it_only_with_wip(store, tmp_path):
    home = tmp_path / "home"
    failed = store.wip_dir(C)  # a training stage that failed: its checkpoints let a rerun resume
    (failed / "step_000100").mkdir()
    (failed / "step_000100" / "model.safetensors").write_bytes(b"\0" * 2_500_000)
    old = time.time() - 3 * 3600
    os.utime(failed / "step_000100" / "model.safetensors", (old, old))
    os.utime(failed / "step_000100", (old, old))
    os.utime(failed, (old, old))
    finished = store.wip_dir(A)  # committed since: nothing to resume
    (finished / "ckpt").write_bytes(b"x")

    r = cli("artifacts", "gc", "--dry-run", "--store", store.url, home=home)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "1 entries to delete"
    assert f"would delete {finished}" in r.stdout
    assert f"resumable {failed}  2.5 MB, 3.0 h old (kept: a rerun of its stage resumes from it; --wip deletes it)" in r.stdout
    [w] = store.gc().resumable
    assert (w.key, w.bytes, w.committed, w.locked) == (C, 2_500_000, False, False) and 3 * 3600 <= w.age_seconds < 3 * 3600 + 60
    assert failed.exists() and not finished.exists()

    with store.lock(C):  # a rerun is resuming from it now: even --wip leaves it alone
        report = store.gc(wip=True)
        assert report.deleted == [] and report.resumable == [] and failed.exists()
    r = cli("artifacts", "gc", "--wip", "--store", store.url, home=home)
    assert r.returncode == 0 and f"deleted {failed}" in r.stdout and not failed.exists()
    assert store.keys() == [A, B]


def test_store_that_is_a_file_or_a_malformed_url_is_one_line(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    home = tmp_path / "home"
    for args in (("artifacts", "ls"), ("artifacts", "query", "select 1"), ("artifacts", "gc", "--dry-run"), ("report",)):
        _one_line_error(cli(*args, "--store", str(f), home=home), f"store '{f}' is a file, not a directory")
    _one_line_error(cli("artifacts", "ls", "--store", "s3:/bucket/x", home=home), "looks like a malformed URL")
    assert f.read_text() == "keep me"
    for url, needle in (("s3://", "names no bucket"), ("s3:///x", "names no bucket"), (f"file://{f}", "is a file"),
                        ("http:/x", "malformed URL")):
        with pytest.raises(StoreError, match=needle):
            Store(url)
    assert Store(str(tmp_path / "new")).keys() == []  # a directory that does not exist yet is fine


def test_bad_sql_is_one_line_naming_duckdbs_message(store, tmp_path):
    r = cli("artifacts", "query", "--store", store.url, "select from where", home=tmp_path / "home")
    _one_line_error(r, "chatforge: error: query failed: Parser Error: syntax error")


def test_a_torn_run_file_is_one_line_for_stage_run(tmp_path):
    """`chatforge stage NAME --run RUN` on a run whose record was cut short: one line naming the file, exit 1."""
    import subprocess
    import sys

    runs = tmp_path / "store" / "runs"
    runs.mkdir(parents=True)
    (runs / "r1.json").write_text('{"run_id": "r1", "conf')
    r = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "tokenizer", "--run", "r1", "--store", str(tmp_path / "store")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "CHATFORGE_HOME": str(tmp_path)})
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("chatforge: error: run file") and "r1.json is unreadable" in r.stderr and "Traceback" not in r.stderr
