"""Sandbox speed: seconds per HumanEval program, the bubblewrap sandbox next to the one it replaced (issue 13).

    python bench/sandbox_speed.py                       # 164 canonical solutions, both sandboxes
    python bench/sandbox_speed.py --sequential 40 --workers 4 --old-rev 9e0de9e

The programs are the 164 canonical HumanEval solutions built as the chat eval builds them
(model.evals.chat_tasks.humaneval_program), from ../shared/data/eval/humaneval.jsonl. The old sandbox
(subprocess + rlimits + audit hook + `unshare --net`) is loaded from git (`git show REV:model/evals/sandbox.py`)
into a module of its own, so the comparison needs no copy of it in the tree. Rows:
- sequential: the first --sequential programs one after another, median and mean seconds per program
  (as a single evaluation worker sees it), interleaved program by program with a bare `python -I -c pass`
  (the floor both stand on);
- parallel: all programs through a pool of --workers threads (as chat_eval runs them), wall seconds per
  program and the pass count, which must be 164 / 164 for the new sandbox.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.evals import sandbox  # noqa: E402
from model.evals.chat_tasks import humaneval_program  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "eval" / "humaneval.jsonl"


def old_sandbox(rev: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{rev}:model/evals/sandbox.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"sandbox_{rev}")
    module.__file__ = f"<git {rev}:model/evals/sandbox.py>"
    sys.modules[module.__name__] = module  # dataclasses look their module up while building Outcome
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def programs() -> list[str]:
    if not DATA.is_file():
        sys.exit(f"{DATA} is absent: this benchmark needs the shared HumanEval file")
    with open(DATA, encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    return [humaneval_program(item, item["canonical_solution"]) for item in items]


def sequential(runs: dict, progs: list[str], timeout: float) -> dict[str, list[float]]:
    """Seconds per program for each runner, interleaved program by program so a load that changes on a shared
    machine weighs on every runner alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for p in progs:
        for name, run in runs.items():
            start = time.perf_counter()
            run(p, timeout=timeout)
            times[name].append(time.perf_counter() - start)
    return times


def parallel(run, progs: list[str], workers: int, timeout: float) -> tuple[float, int]:
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(lambda p: run(p, timeout=timeout), progs))
    return time.perf_counter() - start, sum(o.passed for o in outcomes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-rev", default="9e0de9e", help="git revision holding the old model/evals/sandbox.py")
    ap.add_argument("--sequential", type=int, default=40, help="programs timed one after another")
    ap.add_argument("--workers", type=int, default=4, help="threads for the parallel pass (chat_eval's default)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-program limit (generous: this times, not judges)")
    args = ap.parse_args()

    progs = programs()
    old = old_sandbox(args.old_rev)
    sandbox.run_program(progs[0])  # probes bwrap once, outside the timings
    print(f"{len(progs)} canonical HumanEval programs; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}; "
          f"{sandbox.isolation()['bubblewrap']}, seccomp {sandbox.isolation()['seccomp']}")

    bare = "bare python -I -c pass"
    runs = {bare: lambda p, timeout: subprocess.run([sys.executable, "-I", "-c", "pass"], timeout=timeout),
            "old: subprocess + audit hook": old.run_program, "new: bubblewrap + seccomp": sandbox.run_program}
    seq = sequential(runs, progs[:args.sequential], args.timeout)
    rows = {}
    for name, run in runs.items():
        wall, passed = parallel(run, progs, args.workers, args.timeout) if name != bare else (0, 0)
        rows[name] = (statistics.median(seq[name]), statistics.mean(seq[name]), wall / len(progs), passed)
    print(f"{'':<34} {'sequential median':>18} {'mean':>8} {f'{args.workers} workers, per program':>24} {'passed':>9}")
    for name, (median, mean, per, passed) in rows.items():
        tail = f"{per:>22.3f} s {passed:>5}/{len(progs)}" if per else f"{'-':>24} {'-':>9}"
        print(f"{name:<34} {median:>16.3f} s {mean:>6.3f} s {tail}")
    _, (old_median, *_), (new_median, *_) = rows.values()
    print(f"new / old, sequential median: {new_median / old_median:.2f}x")


if __name__ == "__main__":
    main()
