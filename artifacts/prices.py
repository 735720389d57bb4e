"""Dollars per device-hour, and where each price came from.

Three layers, later ones win: the built-in table (`ledger.DEFAULT_PRICES`), the user's price file
(`$CHATFORGE_HOME/prices.toml`, or `--prices FILE` on `chatforge run` / `chatforge stage`), then the
run's explicit overrides (`--set cost.prices.H100=2.49`). The file is read once, by the CLI, before
anything runs, and its prices travel inside the run's config (`cost.price_file`, `cost.file_prices`):
a stage dispatched to another machine charges what the user saw, and runs/<run>.json keeps it.
Every ledger row stores the price it used and its source ('built-in', 'file:<path>',
'--set cost.prices.<type>').
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

from .ledger import DEFAULT_PRICES
from .store import DEFAULT_ROOT

FILE_NAME = "prices.toml"
EXAMPLE = "[prices] then one line per device type, e.g. H100 = 2.49"


class PriceFileError(ValueError):
    """A price file that cannot be used; the message names the file, the problem and the fix."""


def default_file() -> Path | None:
    """`$CHATFORGE_HOME/prices.toml` (~/.cache/chatforge without it); None when CHATFORGE_HOME is a remote URL."""
    home = os.environ.get("CHATFORGE_HOME") or DEFAULT_ROOT
    if "://" in home:
        if not home.startswith("file://"):
            return None  # a price file is the user's local setting, not something read from a bucket
        home = home[len("file://"):]
    return Path(home).expanduser() / FILE_NAME


def load(path: str | Path) -> dict[str, float]:
    """The `[prices]` table of a TOML file: device type -> $ per device-hour (numbers ≥ 0)."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise PriceFileError(f"price file {p} not found: create it ({EXAMPLE}) or drop --prices") from None
    except OSError as e:
        raise PriceFileError(f"price file {p} cannot be read ({e.strerror or e}): fix its permissions or drop --prices") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        msg = " ".join(str(e).split())
        raise PriceFileError(f"price file {p} is not valid TOML ({msg}): write {EXAMPLE}") from None
    extra = sorted(k for k in doc if k != "prices")
    if extra or not isinstance(doc.get("prices"), dict):
        found = f"found {', '.join(extra)}" if extra else "found no [prices] table"
        raise PriceFileError(f"price file {p}: {found}; it holds only a [prices] table: write {EXAMPLE}")
    out: dict[str, float] = {}
    for device, price in doc["prices"].items():
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not price >= 0 or price == float("inf"):
            raise PriceFileError(f"price file {p}: prices.{device} = {price!r} is not a price in $ per device-hour "
                                 f"(a number ≥ 0, e.g. {device} = 2.49)")
        out[str(device)] = float(price)
    return out


def user_file(path: str | Path | None = None) -> tuple[str, dict[str, float]]:
    """(the file's absolute path, its prices) for `--prices PATH`, else the default file when it exists, else ('', {})."""
    if path is None:
        path = default_file()
        if path is None or not path.is_file():
            return "", {}
    p = Path(path).expanduser().resolve()
    return str(p), load(p)


def resolve(device_type: str, overrides: dict[str, float] | None = None, file_prices: dict[str, float] | None = None,
            price_file: str = "") -> tuple[float, str]:
    """(price per device-hour, its source) for one device type. A type no layer lists costs 0 ('built-in')."""
    if overrides and device_type in overrides:
        return float(overrides[device_type]), f"--set cost.prices.{device_type}"
    if file_prices and device_type in file_prices:
        return float(file_prices[device_type]), f"file:{price_file}"
    return float(DEFAULT_PRICES.get(device_type, 0.0)), "built-in"
