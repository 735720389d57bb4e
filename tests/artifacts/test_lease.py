"""Leases in the store (artifacts/lease.py): exclusive, renewed while held, taken over once their holder stops
renewing; on a local directory and on S3 (moto's server on 127.0.0.1, through s3fs's conditional puts)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from artifacts.lease import Lease, backend_for
from artifacts.store import Store

ROOT = Path(__file__).resolve().parents[2]
TTL = 0.6


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint (moto in server mode, in a thread of this process) and the environment that reaches it."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:%d" % server.get_host_and_port()[1], "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("leases-test")
    yield fs, env
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(fsspec filesystem, lease path, env for a child process) on each backend."""
    if request.param == "local":
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), str(tmp_path / "leases" / "k.json"), {}
    fs, env = request.getfixturevalue("s3")
    return fs, f"leases-test/{request.node.name}/k.json", env


def test_backend_choice(place):
    fs, path, _ = place
    assert backend_for(fs).atomic  # both local and S3 take a lease with an atomic create


def test_exclusive_then_free_after_release(place):
    fs, path, _ = place
    a, b = Lease(fs, path, ttl=TTL), Lease(fs, path, ttl=TTL)
    assert a.try_acquire()
    assert not b.try_acquire() and not b.try_acquire()
    a.release()
    assert b.try_acquire()
    assert not a.try_acquire()
    b.release()


def test_a_renewed_lease_is_never_taken_over(place):
    fs, path, _ = place
    ttl = 2 * TTL  # a loaded machine may delay a heartbeat a little; a lifetime's worth would fail the test
    holder, waiter = Lease(fs, path, ttl=ttl), Lease(fs, path, ttl=ttl)
    with holder.held():
        deadline = time.monotonic() + 2.5 * ttl  # without renewals the waiter would win after one lifetime
        while time.monotonic() < deadline:
            assert not waiter.try_acquire()
            time.sleep(ttl / 6)
        assert holder.token is not None and not holder.lost and holder._renewals >= 5
    assert waiter.try_acquire()  # released on exit
    waiter.release()


def test_a_silent_holder_expires_and_learns_it_lost(place):
    fs, path, _ = place
    dead, waiter = Lease(fs, path, ttl=TTL), Lease(fs, path, ttl=TTL)
    assert dead.try_acquire()  # and never renews: a holder that died
    waits = []
    t0 = time.monotonic()
    waiter.acquire(on_wait=lambda: waits.append(1), timeout=10 * TTL)
    assert TTL <= time.monotonic() - t0 < 5 * TTL and waits == [1]
    assert not dead.renew() and dead.lost  # its lease was taken over: a late renewal is refused
    dead.release()  # releasing a lost lease removes nothing
    assert not Lease(fs, path, ttl=TTL).try_acquire()
    waiter.release()


def test_many_contenders_one_winner(place):
    fs, path, _ = place
    leases = [Lease(fs, path, ttl=30) for _ in range(8)]
    won, gate = [], threading.Barrier(len(leases))

    def contend(lease):
        gate.wait()
        if lease.try_acquire():
            won.append(lease)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1
    won[0].release()


def test_a_killed_holder_process_lets_go_after_the_ttl(place):
    fs, path, env = place
    url = path if not env else f"s3://{path}"
    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import fsspec, time; from artifacts.lease import Lease; fs, p = fsspec.core.url_to_fs(%r); "
            "cm = Lease(fs, p, ttl=%r).held(); cm.__enter__(); print('held', flush=True); time.sleep(60)") % (url, TTL)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout.readline().strip() == "held"
        waiter = Lease(fs, path, ttl=TTL)
        time.sleep(2 * TTL)
        assert not waiter.try_acquire()  # alive and renewing: not taken over
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        waiter.acquire(timeout=10 * TTL)
        waiter.release()
    finally:
        child.kill()


def test_store_lock_holds_across_machines_on_s3(s3, tmp_path):
    """Two Store objects with separate local disks (two machines) on one bucket: the second waits for the first."""
    fs, _ = s3
    stores = [Store("s3://leases-test/store") for _ in range(2)]
    for i, st in enumerate(stores):
        st.local_root = tmp_path / f"machine{i}"  # no shared flock: only the lease in the bucket can serialize them
    key = "ab" * 32
    order, waited = [], []
    inside = threading.Event()

    def first():
        with stores[0].lock(key, lease_seconds=TTL):
            inside.set()
            order.append("first in")
            time.sleep(3 * TTL)  # longer than the ttl: the heartbeat keeps it
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(10)
    with stores[1].lock(key, on_wait=lambda: waited.append(1), lease_seconds=TTL):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"] and waited == [1]
    assert not fs.exists(f"leases-test/store/leases/{key}.json")  # released, not left to expire
