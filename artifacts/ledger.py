"""The ledger: one small JSON file per stage execution, append-only (no shared file, no lock).

Rows are written for computes, cache hits (cost 0) and failures alike: a failed stage burned
device time too. DuckDB reads them as the `stage_runs` table (catalog.py).
"""
from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field

from .store import Store

# The built-in $ per device-hour. GPU prices follow nanochat's figure of ~$24/h for an 8×H100 node; CPU is
# counted as free (a laptop). A price file or `--set cost.prices.<device>=<usd>` overrides them (prices.py).
DEFAULT_PRICES = {"H100": 3.0, "H200": 3.5, "A100": 1.8, "cpu": 0.0}


@dataclass
class LedgerRow:
    run_id: str
    stage: str
    key: str
    cache_hit: bool
    start: str
    end: str
    wall_seconds: float
    device_type: str
    devices: int
    nodes: int
    price_per_device_hour: float
    price_source: str = "built-in"  # where the price came from: 'built-in', 'file:<path>', '--set cost.prices.<type>'
    status: str = "completed"  # completed | failed
    preset: str = ""
    error: str = ""
    metrics: dict = field(default_factory=dict)

    @property
    def device_hours(self) -> float:
        return 0.0 if self.cache_hit else self.wall_seconds / 3600 * self.devices * self.nodes

    @property
    def cost_usd(self) -> float:
        return self.device_hours * self.price_per_device_hour

    def to_dict(self) -> dict:
        d = asdict(self)
        d["device_hours"] = self.device_hours
        d["cost_usd"] = self.cost_usd
        return d


def append(store: Store, row: LedgerRow) -> str:
    path = store._p("ledger", row.run_id, f"{row.start.replace(':', '')}-{row.stage}-{uuid.uuid4().hex[:8]}.json")
    store.write_json(path, row.to_dict())
    return path


def record_run(store: Store, run_id: str, info: dict) -> None:
    """The config and origin of a run, so `chatforge stage NAME --run RUN` can reuse its config."""
    store.write_json(store._p("runs", f"{run_id}.json"), {"run_id": run_id, **info})


def read_run(store: Store, run_id: str) -> dict:
    return store.read_json(store._p("runs", f"{run_id}.json"))
