"""The artifact store: the source of truth for every stage output.

Layout under the root (a local directory or any fsspec URL):

    artifacts/<key>/...            committed artifacts; manifest.json is written last
    refs/<stage>/<name>.json       human names -> keys
    ledger/<run_id>/<row>.json     one row per stage execution (see ledger.py)
    runs/<run_id>.json             the config a run was started with
    wip/<key>/                     work in progress of long stages (resume)
    leases/<key>.json              who computes a key now (remote stores: the lock across machines)
    tmp/<key>.<nonce>/             staging of a stage being computed (local stores)
    trash/                         replaced or corrupt artifacts, emptied by gc
    quarantine/                    unreadable files set aside by `gc --quarantine` (same relative paths), kept

A directory without a manifest does not exist: on a local root the staging directory is renamed
into place in one step; on an object store the manifest is uploaded after every file.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import fsspec
from fsspec.registry import known_implementations

from .errors import ArtifactCorrupt, ArtifactMissing, StoreError
from .keys import file_sha256, is_key, stream_sha256
from .manifest import Manifest

DEFAULT_ROOT = "~/.cache/chatforge"
LOCAL_PROTOCOLS = ("file", "local")
# Cache hits re-hash artifacts up to this size (flipped bytes keep sizes); larger ones are size-checked.
VERIFY_ON_READ_BYTES = int(os.environ.get("CHATFORGE_VERIFY_MAX_BYTES", 256 << 20))
# Object stores whose URL must start with a bucket name (s3://bucket/path).
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
_LOOKS_LIKE_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:/")  # `s3:/bucket`: a URL missing a slash, not a directory


def default_url() -> str:
    return os.environ.get("CHATFORGE_HOME") or DEFAULT_ROOT


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Store:
    def __init__(self, url: str | None = None):
        url = str(url or default_url())
        scheme = url.split("://", 1)[0] if "://" in url else "file"
        if scheme not in known_implementations and scheme not in LOCAL_PROTOCOLS:
            raise StoreError(
                f"unknown store scheme {scheme!r} in {url!r}: use a local path or an fsspec URL "
                "(file://, memory://, s3://, gs://, ...)"
            )
        if "://" not in url and _LOOKS_LIKE_URL.match(url):
            raise StoreError(f"store {url!r} looks like a malformed URL (a scheme needs `://`, e.g. s3://bucket/path); "
                             "use ./ before a local directory whose name has a colon")
        if scheme in BUCKET_PROTOCOLS and not re.match(r"[^/\s]", url.split("://", 1)[1]):
            raise StoreError(f"store URL {url!r} names no bucket: use {scheme}://BUCKET[/PATH]")
        try:
            self.fs, path = fsspec.core.url_to_fs(os.path.expanduser(url) if scheme == "file" else url)
        except ImportError as e:
            raise StoreError(f"store {url!r} needs an fsspec backend that is not installed: {e}") from None
        self.url = url
        self.local = any(p in LOCAL_PROTOCOLS for p in ([self.fs.protocol] if isinstance(self.fs.protocol, str) else self.fs.protocol))
        self.root = path.rstrip("/") or "/"
        if self.local and os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"store {url!r} is a file, not a directory: name a directory (created when missing) "
                             "or an fsspec URL (s3://bucket/path) with --store / CHATFORGE_HOME")
        # Staging, locks and pulled copies of a remote store live on local disk.
        if self.local:
            self.local_root = Path(self.root)
        else:
            import hashlib

            self.local_root = Path(os.path.expanduser(DEFAULT_ROOT)) / "remote" / hashlib.sha256(url.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ------------------------------------------------------------------ paths
    def _p(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def artifact_dir(self, key: str) -> str:
        return self._p("artifacts", key)

    def ensure_writable(self) -> None:
        """Fail fast, before any compute, when the root cannot be written."""
        probe = self._p("tmp", f".probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self._p("tmp"), exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
            self.local_root.mkdir(parents=True, exist_ok=True)
        except (OSError, PermissionError) as e:
            raise StoreError(
                f"store {self.url!r} is not writable ({e.__class__.__name__}: {e.strerror or e}): "
                "fix its permissions or choose another with --store / CHATFORGE_HOME"
            ) from None

    # ------------------------------------------------------------------ json helpers
    def read_json(self, path: str):
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_json(self, path: str, obj) -> None:
        """Write small JSON atomically (tmp + rename locally; object stores write whole objects)."""
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self.local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "wb") as f:
                f.write(data)

    # ------------------------------------------------------------------ reading
    def manifest(self, key: str) -> Manifest | None:
        """The committed manifest of `key`, or None. Checks that every file exists with its size."""
        path = self._p("artifacts", key, "manifest.json")
        try:
            m = Manifest.from_dict(self.read_json(path))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactCorrupt(f"artifact {key[:12]}: unreadable manifest ({e}): `chatforge artifacts verify` sets it aside to be recomputed") from None
        problems = self._check(key, m, hashes=m.total_bytes() <= VERIFY_ON_READ_BYTES)
        if problems:
            raise ArtifactCorrupt(f"artifact {key[:12]} ({m.stage}) is corrupt: {problems[0]}")
        return m

    def _check(self, key: str, m: Manifest, hashes: bool) -> list[str]:
        problems = []
        if m.key != key:
            problems.append(f"manifest names key {m.key[:12]}")
        base = self.artifact_dir(key)
        for rel, info in sorted(m.files.items()):
            path = f"{base}/{rel}"
            try:
                size = self.fs.size(path)
            except FileNotFoundError:
                problems.append(f"{rel}: missing")
                continue
            if size != info["size"]:
                problems.append(f"{rel}: size {size} != {info['size']}")
            elif hashes and self._sha256(path) != info["sha256"]:
                problems.append(f"{rel}: sha256 mismatch")
        return problems

    def _sha256(self, path: str) -> str:
        with self.fs.open(path, "rb") as f:
            return stream_sha256(f)

    def get(self, key: str) -> Manifest:
        m = self.manifest(key)
        if m is None:
            raise ArtifactMissing(f"no artifact {key[:12]} in {self.url}: run the stage that makes it (`chatforge run --until STAGE`)")
        return m

    def verify(self, key: str) -> list[str]:
        """Full check (sizes and sha256 of every file). Empty list = intact."""
        try:
            m = Manifest.from_dict(self.read_json(self._p("artifacts", key, "manifest.json")))
        except FileNotFoundError:
            return ["no manifest"]
        except (ValueError, KeyError, TypeError) as e:
            return [f"unreadable manifest: {e}"]
        return self._check(key, m, hashes=True)

    def keys(self) -> list[str]:
        """Keys of committed artifacts (those with a manifest)."""
        try:
            paths = self.fs.glob(self._p("artifacts", "*", "manifest.json"))
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").split("/")[-2] for p in paths)

    def list(self, damaged: list[tuple[str, str]] | None = None) -> list[Manifest]:
        """The manifests of committed artifacts, oldest first. An unreadable manifest is skipped; its
        (path, reason) is appended to `damaged` when given."""
        out = []
        for key in self.keys():
            path = self._p("artifacts", key, "manifest.json")
            try:
                m = self._read_manifest(path, key)
            except FileNotFoundError:
                continue  # removed since the listing
            except Unreadable as e:
                if damaged is not None:
                    damaged.append((path, str(e)))
                continue
            out.append(m)
        return sorted(out, key=lambda m: m.created)

    def _read_manifest(self, path: str, key: str) -> Manifest:
        """A manifest file parsed and checked (Unreadable with the reason; FileNotFoundError when gone)."""
        with self.fs.open(path, "rb") as f:
            doc = load_json(f.read())
        try:
            m = Manifest.from_dict(doc)
            if not all(isinstance(v, t) for v, t in ((m.key, str), (m.stage, str), (m.kind, str), (m.created, str),
                                                     (m.files, dict), (m.parents, dict))):
                raise ValueError("a field has the wrong type")
            m.total_bytes()
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise Unreadable(f"not a manifest ({type(e).__name__}: {e})") from None
        if m.key != key:
            raise Unreadable(f"manifest names key {str(m.key)[:12]!r}, its directory is {key[:12]}")
        return m

    def local_path(self, key: str) -> Path:
        """A local directory holding the artifact's files (a pulled, verified copy for remote stores)."""
        m = self.get(key)
        if self.local:
            return Path(self.artifact_dir(key))
        dest = self.local_root / "artifacts" / key
        if not (dest / "manifest.json").exists():
            tmp = self.local_root / "tmp" / f"pull-{key}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            for rel in m.files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get(f"{self.artifact_dir(key)}/{rel}", str(tmp / rel))
                if file_sha256(tmp / rel) != m.files[rel]["sha256"]:
                    shutil.rmtree(tmp)
                    raise ArtifactCorrupt(f"artifact {key[:12]}: {rel} sha256 mismatch after download: run `chatforge artifacts verify`")
            (tmp / "manifest.json").write_text(json.dumps(m.to_dict(), indent=1, sort_keys=True))
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, dest)
            except OSError:  # a concurrent pull won the race
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def staging(self, key: str) -> Iterator[Path]:
        """A fresh local directory to compute into; removed on exit unless committed (renamed away)."""
        tmp = self.local_root / "tmp" / f"{key}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, staging: Path, manifest: Manifest) -> Manifest:
        """Hash the staged files, write the manifest last, and publish under the manifest's key."""
        files = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            rel = path.relative_to(staging).as_posix()
            if rel == "manifest.json":
                raise StoreError("a stage may not write its own manifest.json")
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        manifest.files = files
        manifest.created = manifest.created or _now()
        manifest.host = manifest.host or socket.gethostname()
        key = manifest.key
        if self.local:
            with open(staging / "manifest.json", "wb") as f:
                f.write(json.dumps(manifest.to_dict(), indent=1, sort_keys=True).encode())
                f.flush()
                os.fsync(f.fileno())
            dest = Path(self.artifact_dir(key))
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                self._to_trash(key)
            os.rename(staging, dest)
        else:
            dest = self.artifact_dir(key)
            if self.fs.exists(f"{dest}/manifest.json"):
                self.fs.rm(f"{dest}/manifest.json")  # invalidate first: the old files are being replaced
            for rel in files:
                self.fs.put_file(str(staging / rel), f"{dest}/{rel}")
            self.write_json(f"{dest}/manifest.json", manifest.to_dict())
        return manifest

    def _to_trash(self, key: str) -> None:
        src = self.artifact_dir(key)
        dst = self._p("trash", f"{key}.{uuid.uuid4().hex[:8]}")
        self.fs.makedirs(self._p("trash"), exist_ok=True)
        if self.local:
            os.rename(src, dst)
        else:
            self.fs.mv(src, dst, recursive=True)

    def quarantine(self, key: str) -> None:
        """Take a corrupt artifact out of service (kept in trash/ until gc) so that it is recomputed."""
        if self.fs.exists(self.artifact_dir(key)):
            self._to_trash(key)

    # ------------------------------------------------------------------ locks
    @contextlib.contextmanager
    def lock(self, key: str, on_wait=None, lease_seconds: float | None = None, log=print) -> Iterator[None]:
        """An exclusive lock per key, for every writer of this store.

        On this machine: an flock, released by the kernel if the holder dies (kill -9). A local store's
        locks live under its root, so a shared filesystem (NFS) carries them to other machines too. A
        remote store (s3://, gs://, ...) is shared by machines with separate disks: there the key is also
        leased in the store itself (artifacts/lease.py: an atomic create where the backend has one, as S3 does,
        a heartbeat, and expiry `lease_seconds` after the holder stops renewing). `log` gets the lease's news (taken over, lost) from any thread.
        """
        waiting = _Once(on_wait)
        with open(self._lock_path(key), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waiting()
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if self.local:
                    yield
                else:
                    from .lease import LEASE_SECONDS, Lease

                    lease = Lease(self.fs, self._p("leases", f"{key}.json"), ttl=lease_seconds or LEASE_SECONDS, log=log)
                    with lease.held(on_wait=waiting):
                        self.fs.invalidate_cache()  # what the previous holder committed must not hide behind a listing
                        yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def is_locked(self, key: str) -> bool:
        path = self.local_root / "locks" / f"{key}.lock"
        if not path.exists():
            return False
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    # ------------------------------------------------------------------ refs
    def set_ref(self, ref: str, key: str) -> None:
        stage, name = _split_ref(ref)
        self.write_json(self._p("refs", stage, f"{name}.json"), {"key": key, "updated": _now()})

    def refs(self, damaged: list[tuple[str, str]] | None = None) -> dict[str, str]:
        """Every ref -> key. A ref file that cannot be read (torn, hand-edited) is skipped; its (path, reason)
        is appended to `damaged` when given."""
        try:
            paths = self.fs.glob(self._p("refs", "*", "*.json"))
        except FileNotFoundError:
            return {}
        out = {}
        for p in sorted(paths):
            stage, name = p.rstrip("/").split("/")[-2:]
            try:
                with self.fs.open(p, "rb") as f:
                    out[f"{stage}/{name[:-5]}"] = ref_key(f.read())
            except FileNotFoundError:
                continue  # removed since the listing
            except Unreadable as e:
                if damaged is not None:
                    damaged.append((p, str(e)))
        return out

    def resolve(self, ref_or_key: str) -> str:
        """A full key from a ref (`tokenizer/latest`), a key, or a unique key prefix (≥ 6 hex chars)."""
        if "/" in ref_or_key:
            stage, name = _split_ref(ref_or_key)
            path = self._p("refs", stage, f"{name}.json")
            try:
                with self.fs.open(path, "rb") as f:
                    return ref_key(f.read())
            except FileNotFoundError:
                known = ", ".join(sorted(self.refs())) or "none yet"
                raise ArtifactMissing(f"unknown ref {ref_or_key!r} in {self.url} (known: {known})") from None
            except Unreadable as e:
                raise StoreError(f"ref {ref_or_key!r} is unreadable ({path}: {e}): rerun its stage to set it again, or "
                                 "name the artifact by key (`chatforge artifacts ls`); `chatforge artifacts gc --quarantine` "
                                 "sets the file aside") from None
        prefix = ref_or_key.lower()
        if len(prefix) < 6 or any(c not in "0123456789abcdef" for c in prefix):
            raise StoreError(f"{ref_or_key!r} is neither a ref (stage/name) nor a key (at least 6 hex characters)")
        matches = [k for k in self.keys() if k.startswith(prefix)]
        if len(matches) != 1:
            what = "no artifact" if not matches else f"{len(matches)} artifacts"
            raise ArtifactMissing(f"{what} with key prefix {ref_or_key!r} in {self.url}: see `chatforge artifacts ls`")
        return matches[0]

    # ------------------------------------------------------------------ work in progress
    def wip_dir(self, key: str) -> Path:
        """Local directory for a long stage's resumable checkpoints, keyed like its artifact."""
        path = self.local_root / "wip" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def wip_entries(self) -> list["WipEntry"]:
        """The work-in-progress directories on this machine (wip/<key>), oldest first."""
        out = []
        folder = self.local_root / "wip"
        if not folder.is_dir():
            return out
        keys = set(self.keys())
        for d in folder.iterdir():
            if not d.is_dir():
                continue
            size, newest = 0, d.stat().st_mtime
            for base, _, names in os.walk(d):
                for name in names:
                    try:
                        st = os.stat(os.path.join(base, name))
                    except OSError:
                        continue  # removed while walking
                    size += st.st_size
                    newest = max(newest, st.st_mtime)
            out.append(WipEntry(d.name, str(d), size, newest, self.is_locked(d.name), d.name in keys))
        return sorted(out, key=lambda w: w.modified)

    # ------------------------------------------------------------------ gc
    def gc(self, dry_run: bool = False, unreferenced: bool = True, wip: bool = False, quarantine: bool = False,
           damaged: list[tuple[str, str]] | tuple = ()) -> "GcReport":
        """Remove staging/trash leftovers, manifest-less directories, the work in progress of finished keys and
        (optionally) artifacts no ref reaches; with `wip`, also the resumable work in progress of keys that are
        not committed (a failed or stopped stage's checkpoints); with `quarantine`, move unreadable files (the
        refs and manifests found here, plus `damaged`: e.g. the catalog's skipped ledger rows) to quarantine/.
        Nothing locked (being computed) is touched. With `dry_run`, only report."""
        report = GcReport()
        found: dict[str, str] = dict(damaged)
        bad_refs: list[tuple[str, str]] = []
        refs = self.refs(bad_refs)
        bad_manifests: list[tuple[str, str]] = []
        manifests = {m.key: m for m in self.list(bad_manifests)}
        found.update(bad_refs + bad_manifests)
        report.damaged = sorted(found.items())
        doomed: list[str] = []
        keys = set(self.keys())
        for folder in (self.local_root / "tmp", self.local_root / "trash"):
            if not folder.exists():
                continue
            for entry in folder.iterdir():
                if entry.name.startswith(".probe") or not self.is_locked(entry.name.split(".")[0]):
                    doomed.append(str(entry))
        if not self.local and self.fs.exists(self._p("trash")):
            doomed += self.fs.ls(self._p("trash"), detail=False)
        try:
            dirs = self.fs.ls(self._p("artifacts"), detail=False)
        except FileNotFoundError:
            dirs = []
        for d in dirs:
            key = d.rstrip("/").split("/")[-1]
            if key not in keys and not self.is_locked(key):
                doomed.append(d)
        if unreferenced:
            live = self._reachable(set(refs.values()) & keys, manifests)
            unreached = [self.artifact_dir(k) for k in sorted(keys - live) if not self.is_locked(k)]
            if unreached and (bad_refs or bad_manifests):
                # what an unreadable ref names, or an unreadable manifest's parents, is unknown: deleting now
                # could delete what they keep alive
                what = " and ".join(f"{n} unreadable {kind}{'s' if n > 1 else ''}" for n, kind in
                                    ((len(bad_refs), "ref"), (len(bad_manifests), "manifest")) if n)
                report.kept_unreferenced = (f"{len(unreached)} artifact(s) that no readable ref reaches were kept: "
                                            f"{what} may name them")
            else:
                doomed += unreached
        for w in self.wip_entries():
            if w.locked:
                continue  # a stage is computing (or resuming) this key now
            if w.committed or wip:
                doomed.append(w.path)  # finished: resume state no longer needed; or asked for
            else:
                report.resumable.append(w)
        if quarantine:
            report.quarantined = self._quarantine_plan([p for p, _ in report.damaged])
            moved = [src for src, _ in report.quarantined]
            doomed = [d for d in doomed if not any(d == m or d.startswith(m + "/") for m in moved)]
        report.deleted = doomed
        if dry_run:
            return report
        for src, dst in report.quarantined:
            self._move(src, dst)
        for path in doomed:
            if not (self.local or path.startswith(str(self.local_root))):
                self.fs.rm(path, recursive=True)
            elif Path(path).parent == self.local_root / "wip":
                with self._try_flock(Path(path).name) as free:  # a rerun that starts now keeps its checkpoints
                    if free:
                        shutil.rmtree(path, ignore_errors=True)
            elif os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                Path(path).unlink(missing_ok=True)
        return report

    def _quarantine_plan(self, paths: list[str]) -> list[tuple[str, str]]:
        """(source, destination under quarantine/) of each unreadable file; a file of an artifact takes its whole
        directory along (the artifact cannot be trusted: it is recomputed), unless the key is being computed."""
        plan: dict[str, str] = {}
        prefix = self.root.rstrip("/") + "/"
        for path in paths:
            if not path.startswith(prefix):
                continue  # not a file of this store: never moved
            rel = path[len(prefix):]
            parts = rel.split("/")
            if parts[0] == "artifacts" and len(parts) > 2:
                if self.is_locked(parts[1]):
                    continue
                rel = "/".join(parts[:2])
            if parts[0] == "quarantine":
                continue
            src = prefix + rel
            dst = self._p("quarantine", rel)
            if self.fs.exists(dst):
                dst = f"{dst}.{uuid.uuid4().hex[:8]}"
            plan[src] = dst
        return sorted(plan.items())

    def _move(self, src: str, dst: str) -> None:
        parent = dst.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        try:
            if self.local:
                os.rename(src, dst)
            else:
                self.fs.mv(src, dst, recursive=self.fs.isdir(src))
        except FileNotFoundError:
            pass  # gone since it was found: nothing to set aside

    def _lock_path(self, key: str):
        """The file whose flock is `key`'s lock on this machine (created with its directory)."""
        path = self.local_root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def _try_flock(self, key: str) -> Iterator[bool]:
        """Hold `key`'s lock if it is free (True), without waiting; False when a stage holds it."""
        with open(self._lock_path(key), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _reachable(self, roots: set[str], manifests: dict[str, Manifest]) -> set[str]:
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            m = manifests.get(key)
            if m is not None:
                todo += [k for k in m.parents.values() if isinstance(k, str)]
        return seen


@dataclass
class WipEntry:
    """A work-in-progress directory: a long stage's resumable checkpoints for `key`."""

    key: str
    path: str
    bytes: int
    modified: float  # the newest file's mtime (seconds since the epoch)
    locked: bool  # a stage computes the key now
    committed: bool  # the key is committed: nothing left to resume

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.modified)


@dataclass
class GcReport:
    deleted: list[str] = field(default_factory=list)  # deleted, or to delete with dry_run
    resumable: list[WipEntry] = field(default_factory=list)  # work in progress kept (gc --wip deletes it)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # unreadable store files: (path, reason)
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (from, to) moved, or to move with dry_run
    kept_unreferenced: str = ""  # why artifacts no ref reaches were kept this time ('' when they were not)


class Unreadable(ValueError):
    """A store file that cannot be parsed (torn, empty, hand-edited): the message is the reason."""


def load_json(raw: bytes):
    """Parsed JSON, or Unreadable naming why not (in the words `verify` and the catalog's `skipped` table use)."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise Unreadable("not UTF-8 text") from None
    except RecursionError:
        raise Unreadable("JSON nested too deeply") from None
    except ValueError as e:
        raise Unreadable(f"{'empty file' if not raw.strip() else 'truncated or invalid JSON'} ({e})") from None


def ref_key(raw: bytes) -> str:
    """The key a ref file names, or Unreadable."""
    doc = load_json(raw)
    if not isinstance(doc, dict):
        raise Unreadable(f"expected a JSON object with a key, got {type(doc).__name__}")
    key = doc.get("key")
    if not is_key(key):
        raise Unreadable(f"key: expected 64 hex digits, got {json.dumps(key)[:60]}")
    return key


class _Once:
    """Call `fn` (if any) the first time only: a waiter is told once, whichever lock made it wait."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn:
            fn()


def _split_ref(ref: str) -> tuple[str, str]:
    parts = ref.split("/")
    if len(parts) != 2 or not all(p and p.replace("-", "").replace("_", "").replace(".", "").isalnum() for p in parts):
        raise StoreError(f"bad ref {ref!r}: refs look like `stage/name`, e.g. `tokenizer/latest`")
    return parts[0], parts[1]

