"""Progress bars that suit where they are written.

`progress(...)` takes tqdm's arguments (an iterable and/or `total`, `desc`, `unit`, `unit_scale`,
`initial`, `disable`, `file`) and returns

- a tqdm bar when the stream (stderr by default) is a terminal: redrawn in place with `\\r`;
- otherwise (a pipe into the Prefect log, a file, a CI log) a `LineProgress`, which writes one whole,
  newline-terminated line -- ``desc: n/total (pct%) rate unit/s eta m:ss, postfix`` -- at most every
  `interval` seconds, and a final line (with the elapsed time) when it is closed. No `\\r`, so a log
  holds a few readable lines instead of thousands of run-together redraws.

Both have the interface the stages use: update(n), set_postfix(...), set_description_str(...),
close(), use as a context manager, and iteration over the wrapped iterable.

The interval is `$CHATFORGE_PROGRESS_SECONDS` (default 10 s); child processes inherit it.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator

INTERVAL_ENV = "CHATFORGE_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 10.0


def default_interval() -> float:
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.0, float(value)) if value.strip() else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             unit_scale: bool = False, initial: float = 0, disable: bool = False, file=None,
             interval: float | None = None):
    """A tqdm bar on a terminal, else a `LineProgress` (see the module docstring)."""
    file = sys.stderr if file is None else file
    if is_terminal(file):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial,
                    disable=disable, file=file, mininterval=0.5)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial,
                        disable=disable, file=file, interval=interval)


class LineProgress:
    """tqdm's interface, writing whole lines at most every `interval` seconds and one at close."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", unit_scale: bool = False, initial: float = 0, disable: bool = False, file=None,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self.initial = initial
        self.disable, self.file = disable, file
        self.interval = default_interval() if interval is None else interval
        self.clock = clock
        self.start = self.last_print = clock()
        self.postfix = ""
        self.closed = False

    # ---- tqdm's interface

    def update(self, n: float = 1) -> None:
        if self.disable or self.closed:
            return
        self.n += n
        now = self.clock()
        if now - self.last_print >= self.interval:
            self._print(now, final=False)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={_fmt(v)}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable:
            self._print(self.clock(), final=True)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LineProgress: iteration needs an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    # ---- the line

    def line(self, now: float | None = None, final: bool = False) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 0.0)
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else None
        parts = [f"{self._num(self.n)}/{self._num(self.total)} {self.unit}" if self.total else f"{self._num(self.n)} {self.unit}"]
        if self.total:
            parts.append(f"({100.0 * self.n / self.total:.0f}%)")
        if rate:
            parts.append(f"{self._num(rate)} {self.unit}/s")
        if final:
            parts.append(f"in {_interval(elapsed)}")
        elif rate and self.total and self.n < self.total:
            parts.append(f"eta {_interval((self.total - self.n) / rate)}")
        text = " ".join(parts)
        if self.postfix:
            text += f", {self.postfix}"
        return f"{self.desc}: {text}" if self.desc else text

    def _print(self, now: float, final: bool) -> None:
        self.last_print = now
        try:
            self.file.write(self.line(now, final) + "\n")
            self.file.flush()
        except (AttributeError, ValueError, OSError):  # a closed or odd stream: progress is never worth a crash
            pass

    def _num(self, x: float | None) -> str:
        if x is None:
            return "?"
        if self.unit_scale:
            from tqdm import tqdm

            return tqdm.format_sizeof(x)
        if float(x).is_integer():
            return f"{int(x):,}"
        return f"{x:,.3g}" if x < 100 else f"{x:,.0f}"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _interval(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
