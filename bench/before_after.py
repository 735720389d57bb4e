"""Before and after, side by side in one run: each benchmark runs under an older commit's code and this checkout's.

    python bench/before_after.py                       # every benchmark, before = the commit issue 15 started from
    python bench/before_after.py --only decode serve   # a subset
    python bench/before_after.py --before HEAD~3 --list

The benchmark scripts are always this checkout's; only the code they import (and the server or CLI they
start) changes: the older commit is unpacked with `git archive` under ~/.cache/chatforge-bench/<sha> and
handed to the script as CHATFORGE_CODE. Each script prints one JSON object of figures (`--json`); the table
shows both and after ÷ before. The two sides run one after the other, never at once, so they do not compete
for cores; on a busy machine run it twice and trust only what repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "dd83e28"  # main when issue 15 (throughput) started

# name: (script and its arguments, {figure in the JSON: (label, higher is better)})
BENCHES: dict[str, tuple[list[str], dict[str, tuple[str, bool]]]] = {}


def register(name: str, argv: list[str], figures: dict[str, tuple[str, bool]]) -> None:
    BENCHES[name] = (argv, figures)


register("train", ["bench/train_profile.py", "--json", "--threads", "1", "--steps", "10"], {
    "train_tokens_per_s": ("training tokens/s, 1 thread (d2, seq 512, 4,096-token steps)", True),
    "train_tokens_per_cpu_s": ("training tokens per CPU second, 1 thread", True),
})
register("train_compiled", ["bench/train_profile.py", "--json", "--threads", "1", "--steps", "10", "--compile", "on"], {
    "train_tokens_per_s": ("training tokens/s, 1 thread, compiled", True),
    "train_tokens_per_cpu_s": ("training tokens per CPU second, 1 thread, compiled", True),
})
register("train_stage", ["bench/train_profile.py", "--json", "--stage", "--threads", "1", "--steps", "40",
                         "--eval-every", "20"], {
    "outside_pct": ("% of a base stage (40 steps) outside training steps", False),
    "wall_s": ("base stage wall seconds", False),
})
register("decode", ["bench/engine_speed.py", "--json"], {
    "decode_b1": ("decode tokens/s, batch 1", True),
    "decode_b8": ("decode tokens/s, batch 8", True),
})
register("serve", ["bench/serve_load.py", "--json", "--clients", "64"], {
    "tokens_per_s": ("server tokens/s, 64 streaming clients, 2 workers", True),
    "requests_per_s": ("server requests/s", True),
    "ttft_p50_s": ("time to first token p50 (s)", False),
    "ttft_p95_s": ("time to first token p95 (s)", False),
})
register("eval", ["bench/eval_speed.py", "--json"], {
    "core_items_per_s": ("CORE items/s", True),
    "categorical_items_per_s": ("chat categorical items/s", True),
    "generative_items_per_s": ("chat generative items/s", True),
})
register("startup", ["bench/startup.py", "--json", "--repeat", "2"], {
    "median.no server": ("cached `chatforge run --until tokenizer`, no server before (s)", False),
    "median.background": ("the same, a later run (s)", False),
})


def figure(result: dict, key: str):
    """`key` in the script's JSON; a dotted key looks into nested objects."""
    for part in key.split("."):
        result = result.get(part) if isinstance(result, dict) else None
    return result


def unpack(ref: str) -> Path:
    """The tree of `ref`, unpacked once under ~/.cache/chatforge-bench/<sha>."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True,
                         text=True)
    if sha.returncode:
        raise SystemExit(f"error: {ref!r} is not a commit of this repository: pass --before SHA (e.g. {BEFORE})")
    target = Path.home() / ".cache" / "chatforge-bench" / sha.stdout.strip()
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as tar:
            subprocess.run(["git", "archive", sha.stdout.strip()], cwd=ROOT, stdout=tar, check=True)
            tar.seek(0)
            with tarfile.open(fileobj=tar) as t:
                t.extractall(target, filter="data")
        (target / ".complete").touch()
    return target


def measure(argv: list[str], code: Path, timeout: float) -> dict:
    env = {**os.environ, "CHATFORGE_CODE": str(code), "PYTHONPATH": str(code),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(lines[-1])


def show(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and abs(value) < 10:
        return f"{value:.3g}"
    return f"{value:,.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=BEFORE, help=f"the commit to compare with (default {BEFORE})")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these benchmarks")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark and side (default 1800)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and their commands, run nothing")
    args = ap.parse_args()
    names = args.only or list(BENCHES)
    if args.list:
        for name in names:
            print(f"{name:<15} python {' '.join(BENCHES[name][0])}")
        return 0
    old = unpack(args.before)
    print(f"before: {args.before} ({old})   after: this checkout ({ROOT})")
    print(f"{'figure':<52} {'before':>10} {'after':>10} {'after/before':>13}")
    for name in names:
        argv, figures = BENCHES[name]
        t0 = time.perf_counter()
        sides = [measure(argv, old, args.timeout), measure(argv, ROOT, args.timeout)]
        for side, result in zip(("before", "after"), sides):
            if "error" in result:
                print(f"  {name} {side}: {result['error']}")
        for key, (label, _higher) in figures.items():
            a, b = (figure(s, key) for s in sides)
            ratio = f"{b / a:.2f}×" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "—"
            print(f"{label:<52} {show(a):>10} {show(b):>10} {ratio:>13}")
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
