"""Start-up of a fully cached `chatforge run`: seconds from the command to its exit, by Prefect server path.

    python bench/startup.py                      # fill a temporary home up to the tokenizer, then time the paths
    python bench/startup.py --full --home DIR    # the whole DAG, in a home a `chatforge run --preset tiny` filled
    CHATFORGE_CODE=/path/to/older/checkout python bench/startup.py --home DIR   # the same, with that checkout's code

Paths, each timed --repeat times (the median is printed):
  temporary   PREFECT_API_URL='' : Prefect's temporary server for the run (the old default), its database warmed first
  no server   nothing running beforehand: what the first run of the day does (this checkout: it starts the
              background server, then it is stopped again before the next repeat; an older one: a temporary server)
  background  the background server the previous run left running (an older checkout: a temporary server again)

Each row: the median wall seconds, and the median CPU seconds of the run's process and what it waited for (the
temporary server's included; a background server's not: it outlives the run).

The code under test is CHATFORGE_CODE or this checkout: `python -m flows.cli` runs there, with PYTHONPATH set to
it. Prefect's home is a temporary directory; nothing on 127.0.0.1:4200 may answer (the CLI would attach to it).
Filling a home up to the tokenizer takes 1-2 minutes; the whole tiny DAG about 8 on 2 cores. Timings depend on
the machine's load: the load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CODE = Path(os.environ.get("CHATFORGE_CODE") or Path(__file__).resolve().parents[1]).resolve()


CPU: list[float] = []  # CPU seconds of each timed run's own process (not its server's): less load-dependent than wall


def cli(args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=CODE, env=env, capture_output=True, text=True,
                       timeout=3600)
    took, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    if r.returncode != 0:
        sys.exit(f"bench: `chatforge {' '.join(args)}` exited {r.returncode}:\n{r.stderr[-3000:]}")
    return took, r


def timed(args: list[str], env: dict) -> tuple[float, float]:
    """(wall s, CPU s) of a run that must find every stage cached."""
    took, r = cli(args, env)
    n = re.search(r"· (\d+) stages: (\d+) cached ·", r.stdout)
    if not n or n[1] != n[2]:
        sys.exit("bench: a timed run computed a stage (did the code change during the bench?):\n" + r.stdout[-2000:])
    return took, CPU[-1]


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", help="a chatforge home whose store already holds the run (default: a temporary one, filled)")
    ap.add_argument("--until", default="tokenizer", help="the DAG prefix to run (default: tokenizer)")
    ap.add_argument("--full", action="store_true", help="the whole DAG instead of --until")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if answers(4200):
        sys.exit("bench: something answers on 127.0.0.1:4200; the CLI would attach to it: stop it first")

    tmp = Path(tempfile.mkdtemp(prefix="chatforge-startup-"))
    home = Path(args.home).resolve() if args.home else tmp / "home"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env = {**base, "PYTHONPATH": str(CODE), "CHATFORGE_HOME": str(home), "PREFECT_HOME": str(tmp / "prefect"),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "CHATFORGE_SERVER_PORT": str(free_port())}
    env.pop("CHATFORGE_BACKGROUND_SERVER", None)
    run = ["run", "--preset", args.preset] + ([] if args.full else ["--until", args.until])
    background = (CODE / "flows" / "background.py").exists()

    def stop() -> None:
        if background:
            cli(["server", "--stop"], env)

    times: dict[str, list[tuple[float, float]]] = {"temporary": [], "no server": [], "background": []}
    load = [os.getloadavg()[0]]
    try:
        fill, _ = cli(run, {**env, "PREFECT_API_URL": ""})  # fills the store if needed; creates the temporary server's database
        if background:  # the background server's database, created once (as a first run ever does)
            cli(run, env)
            stop()
        for _ in range(args.repeat):
            times["temporary"].append(timed(run, {**env, "PREFECT_API_URL": ""}))
        for _ in range(args.repeat):
            stop()
            times["no server"].append(timed(run, env))
        for _ in range(args.repeat):
            times["background"].append(timed(run, env))
    finally:
        stop()
        shutil.rmtree(tmp, ignore_errors=True)
    load.append(os.getloadavg()[0])
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=CODE, capture_output=True, text=True).stdout.strip()
    result = {"code": str(CODE), "rev": rev, "background_server": background, "command": "chatforge " + " ".join(run),
              "fill_seconds": round(fill, 2), "repeat": args.repeat, "load_avg_1min": [round(x, 2) for x in load],
              "cpus": os.cpu_count(), "seconds": {k: [round(w, 2) for w, _ in v] for k, v in times.items()},
              "cpu_seconds": {k: [round(c, 2) for _, c in v] for k, v in times.items()},
              "median": {k: round(statistics.median(w for w, _ in v), 2) for k, v in times.items()}}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['command']}  (code {CODE} @ {rev}; {os.cpu_count()} CPUs, load {load[0]:.1f} → {load[1]:.1f})")
    print(f"{'path':<12} {'median s':>9} {'CPU s':>6}  runs (wall s)")
    for k, v in times.items():
        walls = [w for w, _ in v]
        print(f"{k:<12} {statistics.median(walls):>9.2f} {statistics.median(c for _, c in v):>6.2f}  "
              f"{' '.join(f'{w:.2f}' for w in walls)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
