"""The per-key lock the stage runner takes before computing: one writer per key, on every machine.

Two layers, taken in this order by everyone (so they cannot deadlock):

1. **Prefect's global concurrency limits**, when a Prefect API is configured and the key can be computed on
   several machines (a remote store, or `execution.pools` on): one limit of one slot per key, named
   `chatforge-key-<key>`, created if missing. The Prefect server hands the slot to one holder at a time and
   queues the rest; the holder's client renews a server-side lease on the slot, so a holder that dies gives
   the slot back when that lease expires (at least 60 s, plus the server's 15 s sweep). It only excludes
   writers that talk to the same Prefect API.
2. **The store's own lock** (`Store.lock`): an flock on this machine, plus, for a remote store, a lease
   object in the store (artifacts/lease.py), which every writer of the store honours, whichever Prefect
   server (or none) it reports to.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from artifacts.store import Store
from model.config import ExecutionConfig

PREFECT_LEASE_MIN_SECONDS = 60  # the Prefect API refuses a slot lease shorter than this


def limit_name(key: str) -> str:
    return f"chatforge-key-{key}"


def prefect_api() -> str | None:
    """The configured Prefect API, or None (then `chatforge run` uses a temporary server only it can see)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


@contextlib.contextmanager
def hold(store: Store, key: str, execution: ExecutionConfig, on_wait: Callable[[], None] | None = None,
         log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold every lock that applies to `key`; `on_wait` is called once if any of them makes us wait."""
    told = []

    def waiting() -> None:
        if not told and on_wait:
            told.append(1)
            on_wait()

    with contextlib.ExitStack() as stack:
        if prefect_api() and (not store.local or execution.pool_names() is not None):
            stack.enter_context(prefect_slot(key, execution.lease_seconds, waiting))
        stack.enter_context(store.lock(key, on_wait=waiting, lease_seconds=execution.lease_seconds, log=log))
        yield


@contextlib.contextmanager
def prefect_slot(key: str, lease_seconds: float, on_wait: Callable[[], None]) -> Iterator[None]:
    """One slot of the key's global concurrency limit (limit 1), the limit created on first use. A waiter is
    queued by Prefect: it asks again after the server's Retry-After (at most the server's
    PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS, 30 s by default, after the slot frees)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = limit_name(key)
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
            busy = limit.active_slots >= limit.limit
        except ObjectNotFound:
            busy = False
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another worker created it a moment ago
                pass
    if busy:
        on_wait()  # only the message: `concurrency` below is what waits
    # strict: a limit deleted under us fails loudly instead of running unlocked; a renewal blip must not stop
    # hours of training (the store's lock still holds the key)
    with concurrency(name, occupy=1, lease_duration=max(PREFECT_LEASE_MIN_SECONDS, lease_seconds), strict=True,
                     raise_on_lease_renewal_failure=False):
        yield
