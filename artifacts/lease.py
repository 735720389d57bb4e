"""Leases: the per-key lock that holds across machines sharing one store.

`Store.lock` takes an flock on this machine's disk (released by the kernel if the holder dies). That
is enough on one machine, but workers on several machines that share an object store each have their
own disk; for them the lock is a small object in the store itself, `leases/<key>.json`:

- **Taking it** is an atomic create: on S3 (s3fs) a conditional put, `If-None-Match: *`, which S3 and
  most S3-compatible servers (MinIO, Ceph, moto) refuse with 412 when the object exists; on a local or
  mounted filesystem a create under a short flock. Other fsspec backends get a check-then-write
  followed by a read-back, which narrows but does not close the window in which two writers both take
  a free lease (the gap is named in the README).
- **Holding it** is a heartbeat thread rewriting the object every `ttl / 4` seconds, each time as a
  compare-and-swap on the version it last wrote (`If-Match: <etag>` on S3).
- **A dead holder** stops renewing. A waiter that sees the *same version* for `ttl` seconds of its own
  monotonic clock takes the lease over with a compare-and-swap on that version, so exactly one of
  several waiters wins and nobody compares clocks across machines (skew does not matter).
- **A holder that stalled** longer than `ttl` (a frozen VM) finds its next renewal refused: the lease is
  marked `lost` and a warning is logged; the worst outcome is one duplicated, identical compute of the key,
  never a half artifact (commits are atomic).

Prefect's global concurrency limits (tasks/locks.py) give the same exclusion through the Prefect API when
one is configured; the lease is what every writer of the store honours, Prefect or not.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Iterator

# A holder renews every LEASE_SECONDS / 4; a waiter takes over after LEASE_SECONDS without a renewal.
LEASE_SECONDS = float(os.environ.get("CHATFORGE_LEASE_SECONDS", 60))


# ---------------------------------------------------------------- backends: create / read / swap / remove

class _S3:
    """Conditional writes through s3fs: If-None-Match to create, If-Match on the ETag to renew and release."""

    atomic = True

    def __init__(self, fs):
        self.fs = fs

    def _call(self, method: str, path: str, **kw):
        bucket, key, _ = self.fs.split_path(path)
        return self.fs.call_s3(method, Bucket=bucket, Key=key, **kw)

    @staticmethod
    def _refused(e: BaseException, gone: bool) -> bool:
        """Whether an error means "the condition did not hold": the object exists or changed, a concurrent
        conditional write won (409), or, where `gone` counts, it no longer exists. A missing bucket, a denied
        request or a network error is none of these and is raised."""
        if isinstance(e, FileExistsError):
            return True
        cause = e.__cause__ or e
        code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return True
        return gone and code in ("NoSuchKey", "404")

    def create(self, path: str, body: bytes) -> str | None:
        try:
            return self._call("put_object", path, Body=body, IfNoneMatch="*")["ETag"]
        except OSError as e:
            if self._refused(e, gone=False):
                return None
            raise

    def read(self, path: str) -> tuple[dict, str] | None:
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(path)

        async def get():  # body and ETag from one response: the version we read is the version we saw
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            data, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        return _parse(data), etag

    def swap(self, path: str, body: bytes, token: str) -> str | None:
        try:
            return self._call("put_object", path, Body=body, IfMatch=token)["ETag"]
        except OSError as e:
            if self._refused(e, gone=True):
                return None
            raise

    def remove(self, path: str, token: str) -> None:
        try:
            self._call("delete_object", path, IfMatch=token)
        except OSError as e:
            if self._refused(e, gone=True):
                return
            seen = self.read(path)  # a server without conditional deletes: check, then delete
            if seen is not None and seen[1] == token:
                self.fs.rm_file(path)


class _Local:
    """A local or mounted filesystem: each read-modify-write runs under a short flock on a sidecar file
    (flock works across NFS clients on Linux); the token is a nonce stored in the body."""

    atomic = True

    def __init__(self, fs=None):
        pass

    @contextlib.contextmanager
    def _mutex(self, path: str) -> Iterator[None]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.mutex", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read(self, path: str) -> tuple[dict, str] | None:
        try:
            with open(path, "rb") as f:
                body = _parse(f.read())
        except FileNotFoundError:
            return None
        return body, body.get("nonce", "")

    def _write(self, path: str, body: bytes) -> str:
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
        return _parse(body)["nonce"]

    def create(self, path: str, body: bytes) -> str | None:
        with self._mutex(path):
            return None if os.path.exists(path) else self._write(path, body)

    def read(self, path: str) -> tuple[dict, str] | None:
        with self._mutex(path):
            return self._read(path)

    def swap(self, path: str, body: bytes, token: str) -> str | None:
        with self._mutex(path):
            seen = self._read(path)
            return self._write(path, body) if seen is not None and seen[1] == token else None

    def remove(self, path: str, token: str) -> None:
        with self._mutex(path):
            seen = self._read(path)
            if seen is not None and seen[1] == token:
                os.unlink(path)


class _Generic:
    """Any other fsspec backend: check, write, read back. Not atomic (see the module docstring)."""

    atomic = False

    def __init__(self, fs):
        self.fs = fs

    def read(self, path: str) -> tuple[dict, str] | None:
        try:
            body = _parse(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        return body, body.get("nonce", "")

    def _put(self, path: str, body: bytes) -> str | None:
        self.fs.pipe_file(path, body)
        seen = self.read(path)  # a concurrent writer that wrote after us wins; we see it here
        nonce = _parse(body)["nonce"]
        return nonce if seen is not None and seen[1] == nonce else None

    def create(self, path: str, body: bytes) -> str | None:
        return None if self.fs.exists(path) else self._put(path, body)

    def swap(self, path: str, body: bytes, token: str) -> str | None:
        seen = self.read(path)
        return self._put(path, body) if seen is not None and seen[1] == token else None

    def remove(self, path: str, token: str) -> None:
        seen = self.read(path)
        if seen is not None and seen[1] == token:
            self.fs.rm_file(path)


def _parse(data: bytes) -> dict:
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    # a torn or foreign object is still a lease someone holds: it expires like any other
    return body if isinstance(body, dict) else {"holder": "unreadable"}


def backend_for(fs):
    protocols = [fs.protocol] if isinstance(fs.protocol, str) else list(fs.protocol)
    if any(p in ("file", "local") for p in protocols):
        return _Local(fs)
    if "s3" in protocols and hasattr(fs, "call_s3"):
        return _S3(fs)
    return _Generic(fs)


# ---------------------------------------------------------------- the lease

class Lease:
    """An exclusive, expiring claim on `path` in `fs`. Use `with lease.held(on_wait):` around the work."""

    def __init__(self, fs, path: str, ttl: float = LEASE_SECONDS, log: Callable[[str], None] = print):
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.backend = backend_for(fs)
        self.path = path
        self.ttl = float(ttl)
        self.log = log
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.token: str | None = None  # the version we last wrote, while we hold it
        self.lost = False
        self._renewals = 0
        self._seen: tuple[str, float] | None = None  # (version, monotonic time we first saw it) of someone else's lease
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._mu = threading.Lock()  # renewals and release never interleave

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({
            "holder": self.holder, "nonce": uuid.uuid4().hex, "renewals": self._renewals, "ttl": self.ttl,
            # for people reading the object; decisions use the version and the waiter's own clock only
            "written": now, "expires": now + self.ttl,
        }).encode()

    # -- one attempt, no waiting
    def try_acquire(self) -> bool:
        """Take the lease if it is free or its holder stopped renewing `ttl` seconds ago (as seen by us)."""
        token = self.backend.create(self.path, self._body())
        if token is None:
            current = self.backend.read(self.path)
            if current is None:  # released between our create and our read: try once more
                token = self.backend.create(self.path, self._body())
            else:
                body, version = current
                now = time.monotonic()
                if self._seen is None or self._seen[0] != version:
                    self._seen = (version, now)  # a renewal (or a new holder): the clock starts again
                    return False
                if now - self._seen[1] < self.ttl:
                    return False
                token = self.backend.swap(self.path, self._body(), version)  # take over an expired lease
                if token is not None:
                    silent = now - self._seen[1]
                    self.log(f"lease {self.path}: took over from {body.get('holder', '?')}, silent for {silent:.0f} s")
        if token is None:
            return False
        self.token, self.lost, self._seen = token, False, None
        return True

    def acquire(self, on_wait: Callable[[], None] | None = None, timeout: float | None = None) -> None:
        """Block until the lease is ours. `on_wait` is called once, when we first have to wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = max(0.05, min(2.0, self.ttl / 10))
        waited = False
        while not self.try_acquire():
            if not waited and on_wait:
                on_wait()
            waited = True
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"lease {self.path} still held after {timeout} s")
            time.sleep(poll)

    def renew(self) -> bool:
        """Rewrite the lease as a compare-and-swap on our last version. False (and `lost`): someone took it."""
        with self._mu:
            if self.token is None:
                return False
            self._renewals += 1
            token = self.backend.swap(self.path, self._body(), self.token)
            if token is None:
                self.token, self.lost = None, True
                self.log(f"lease {self.path} was taken over while held (this process stalled for more than "
                         f"{self.ttl:.0f} s?): another worker may compute the same key; the commit stays atomic")
                return False
            self.token = token
            return True

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=self.ttl)
            self._beat = None
        with self._mu:
            if self.token is not None:
                try:
                    self.backend.remove(self.path, self.token)
                except Exception as e:  # noqa: BLE001 - the work is done; an unreleased lease merely expires
                    self.log(f"lease {self.path}: not released ({type(e).__name__}: {e}); it expires in {self.ttl:.0f} s")
                self.token = None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self.renew():
                    return
            except Exception as e:  # noqa: BLE001 - a network blip: keep trying until the lease is refused
                self.log(f"lease {self.path}: renewal failed ({type(e).__name__}: {e}); retrying")

    @contextlib.contextmanager
    def held(self, on_wait: Callable[[], None] | None = None) -> Iterator["Lease"]:
        """Acquire, renew in a daemon thread while the body runs, release on exit (also on error)."""
        self.acquire(on_wait)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-heartbeat {self.path}", daemon=True)
        self._beat.start()
        try:
            yield self
        finally:
            self.release()
