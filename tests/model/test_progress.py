"""Progress bars: whole lines at a bounded rate into logs and files, tqdm on a terminal."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap

from tqdm import tqdm

from model import progress as P


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_whole_lines_at_a_bounded_rate_and_a_final_line():
    out, clock = io.StringIO(), Clock()
    bar = P.LineProgress(total=102_400, desc="base", unit="step", file=out, interval=10, clock=clock)
    for _ in range(102_400):  # 100 simulated seconds of very fast updates (1/1024 s apart: exact in binary)
        clock.t += 1 / 1024
        bar.update()
    bar.set_postfix(loss=3.14159, lr="1.00")
    bar.close()
    bar.close()  # closing twice prints once
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 10 <= len(lines) <= 11  # one per 10 s, plus the final line
    assert all(line.startswith("base: ") for line in lines)
    assert lines[0] == "base: 10,240/102,400 step (10%) 1,024 step/s eta 1:30"
    assert lines[-1] == "base: 102,400/102,400 step (100%) 1,024 step/s in 1:40, loss=3.142, lr=1.00"


def test_progress_picks_tqdm_on_a_terminal_and_lines_elsewhere(tmp_path):
    assert isinstance(P.progress(total=3, file=io.StringIO()), P.LineProgress)
    bar = P.progress(total=3, file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    with open(tmp_path / "log.txt", "w") as f:  # a redirected stderr
        with P.progress(total=5, desc="data", unit="doc", file=f) as bar:
            assert isinstance(bar, P.LineProgress)
            bar.update(5)
    assert (tmp_path / "log.txt").read_text().startswith("data: 5/5 doc (100%)")


def test_iteration_context_manager_description_and_disable():
    out, clock = io.StringIO(), Clock()
    seen = []
    for x in P.LineProgress(range(7), desc="decontam", unit="doc", file=out, interval=10, clock=clock):
        seen.append(x)
    assert seen == list(range(7)) and out.getvalue() == "decontam: 7/7 doc (100%) in 0:00\n"

    out = io.StringIO()
    with P.LineProgress(desc="data", unit="doc", file=out, clock=clock) as bar:
        bar.set_description_str("data local")
        clock.t += 2
        bar.update(4)
    assert out.getvalue() == "data local: 4 doc 2 doc/s in 0:02\n"  # no total: a count and a rate

    out = io.StringIO()
    with P.LineProgress(total=10, unit="B", unit_scale=True, file=out, clock=clock) as bar:
        bar.update(3_500_000)
    assert out.getvalue().startswith("3.50M/10.0 B")

    out = io.StringIO()
    with P.progress(total=10, desc="rank 1", disable=True, file=out) as bar:
        bar.update(10)
        bar.set_postfix(loss=1.0)
    assert out.getvalue() == ""


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(P.INTERVAL_ENV, "0.5")
    assert P.LineProgress(file=io.StringIO()).interval == 0.5
    monkeypatch.setenv(P.INTERVAL_ENV, "soon")
    assert P.LineProgress(file=io.StringIO()).interval == P.DEFAULT_INTERVAL
    monkeypatch.delenv(P.INTERVAL_ENV)
    assert P.default_interval() == 10.0


def test_a_child_process_bar_reaches_the_prefect_log_as_whole_lines():
    """What tasks/launch.py forwards from a stage's child process: its stderr is a pipe, so the bar writes lines."""
    from tasks.launch import _pump

    code = textwrap.dedent("""
        import time
        from model.progress import progress
        with progress(total=2000, desc="CORE", unit="item", interval=0.1) as bar:
            for _ in range(2000):
                time.sleep(0.0003)
                bar.update()
        print("done")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    logged: list[str] = []
    _pump(proc, logged.append, [], every=10.0)
    assert proc.wait() == 0
    bars = [line for line in logged if line.startswith("CORE:")]
    assert logged[-1] == "done" and bars[-1].startswith("CORE: 2,000/2,000 item (100%)")
    assert len(bars) >= 2 and all("\r" not in line for line in logged)  # every line forwarded, none rate-dropped
    assert len(bars) < 2000 // 10  # bounded by the interval, not by the number of updates
