"""`chatforge artifacts …` and `chatforge catalog …`: inspect and maintain the artifact store (no Prefect, no torch
unless a command needs it: `artifacts push --format transformers` exports a checkpoint)."""
from __future__ import annotations

import json
import os
import sys


def missing_data_hints() -> dict[str, str]:
    """Per stage, how to give it the data it lacked (shown with a suite that did not run)."""
    from tasks.registry import STAGES

    return {s.name: s.missing_data_hint for s in STAGES if s.missing_data_hint}


def cmd_artifacts(args) -> int:
    from artifacts.store import Store
    from flows.overrides import ConfigError

    store = Store(args.store)
    if args.acmd == "ls":
        damaged: list[tuple[str, str]] = []
        refs: dict[str, list[str]] = {}
        for ref, key in store.refs(damaged).items():
            refs.setdefault(key, []).append(ref)
        rows = store.list(damaged)
        _warn_skipped(damaged)
        if not rows:
            print(f"no artifacts in {store.url}")
        for m in rows:
            size = m.total_bytes() / 1e6
            print(f"{m.key[:12]}  {m.stage:<13} {m.kind:<10} {m.created[:19]}  {size:9.2f} MB  {', '.join(refs.get(m.key, []))}")
        return 0
    if args.acmd == "show":
        key = store.resolve(args.ref)
        if args.json:
            print(json.dumps(store.get(key).to_dict(), indent=1))
            return 0
        if not args.report:
            from artifacts.summary import describe

            print(describe(store, key, hints=missing_data_hints), end="")
            return 0
        m = store.get(key)
        reports = sorted(name for name in m.files if name.endswith(".md"))
        if not reports:
            raise ConfigError(f"{args.ref} ({m.stage}) has no markdown report: run without --report for its summary")
        for name in reports:
            print(f"## {m.stage} {m.key[:12]}: {name}\n\n" + (store.local_path(m.key) / name).read_text())
        return 0
    if args.acmd == "verify":
        keys = [store.resolve(r) for r in args.refs] if args.refs else store.keys()
        bad = 0
        for key in keys:
            problems = store.verify(key)
            if problems:
                bad += 1
                store.quarantine(key)
                print(f"CORRUPT {key}: {'; '.join(problems)} (moved to trash; the next run recomputes it)")
            else:
                print(f"ok      {key}")
        damaged = [] if args.refs else _damaged(store)  # after the corrupt artifacts left: what else cannot be read
        for path, reason in damaged:
            print(f"UNREADABLE {path}: {reason}")
        if damaged:
            print(f"{len(keys) - bad} ok, {bad} corrupt; {len(damaged)} unreadable store file(s) "
                  "(`chatforge artifacts gc --quarantine` moves them to quarantine/)")
        else:
            print(f"{len(keys) - bad} ok, {bad} corrupt")
        return 1 if bad or damaged else 0
    if args.acmd == "gc":
        return _gc(store, args)
    if args.acmd == "pull":
        from artifacts.models import pull

        key = pull(args.ref, store)
        print(f"{key}  {store.local_path(key)}")
        return 0
    if args.acmd == "push":
        from artifacts.models import push

        if args.format == "transformers":
            from flows.interop import push_transformers

            print(push_transformers(store, args.ref, args.target, private=args.private))
        else:
            print(push(args.ref, args.target, store, private=args.private))
        return 0
    if args.acmd == "query":
        from artifacts.catalog import Catalog, query

        cat = Catalog(store).refresh()
        _warn_skipped(cat.skipped)
        print(query(cat.con, args.sql))
        return 0
    raise AssertionError(args.acmd)


def _warn_skipped(skipped: list[tuple[str, str]]) -> None:
    """One line on stderr naming the first unreadable store file and counting the rest."""
    if skipped:
        path, reason = skipped[0]
        more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
        print(f"chatforge: warning: skipped {len(skipped)} unreadable store file(s): {path}: {reason}{more} "
              "(`chatforge artifacts verify` lists them, `chatforge artifacts gc --quarantine` moves them aside)",
              file=sys.stderr)


def _damaged(store) -> list[tuple[str, str]]:
    """(path, reason) of every store file that cannot be read: ledger rows, run files, refs, manifests, evals."""
    from artifacts.catalog import Catalog

    cat = Catalog(store).refresh()
    try:
        return cat.skipped
    finally:
        cat.close()


def _gc(store, args) -> int:
    def size(n: int) -> str:
        return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

    def age(seconds: float) -> str:
        return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} h"

    report = store.gc(dry_run=args.dry_run, unreferenced=not args.keep_unreferenced, wip=args.wip,
                      quarantine=args.quarantine, damaged=_damaged(store))
    for path, reason in report.damaged:
        if not args.quarantine:
            print(f"unreadable {path}: {reason} (kept; --quarantine moves it to quarantine/)")
    for src, dst in report.quarantined:
        print(("would quarantine " if args.dry_run else "quarantined ") + f"{src} -> {dst}")
    stuck = [p for p, _ in report.damaged if not any(p == src or p.startswith(src + "/") for src, _ in report.quarantined)]
    for path in stuck if args.quarantine else []:
        print(f"not moved {path}: a stage is computing its artifact now")
    for w in report.resumable:
        print(f"resumable {w.path}  {size(w.bytes)}, {age(w.age_seconds)} old "
              "(kept: a rerun of its stage resumes from it; --wip deletes it)")
    if report.kept_unreferenced:
        print(f"{report.kept_unreferenced}; once those files are fixed or moved aside (`gc --quarantine`), the next gc "
              "deletes the artifacts")
    for path in report.deleted:
        print(("would delete " if args.dry_run else "deleted ") + path)
    print(f"{len(report.deleted)} entries {'to delete' if args.dry_run else 'deleted'}")
    return 0


def cmd_catalog(args) -> int:
    from artifacts.catalog import export
    from artifacts.store import Store

    store = Store(args.store)
    if args.ccmd == "export":
        counts = export(store, args.file)
        if counts.get("skipped"):
            print(f"chatforge: warning: {counts['skipped']} unreadable store file(s) skipped; the file's `skipped` table "
                  "lists them and why", file=sys.stderr)
        print(f"wrote {os.path.abspath(args.file)}: " + ", ".join(f"{name} ({n:,} rows)" for name, n in counts.items()))
        return 0
    raise AssertionError(args.ccmd)
