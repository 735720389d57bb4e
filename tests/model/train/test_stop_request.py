"""SIGTERM agreement folded into the step's one all-reduce: flag, sum over ranks, settle."""
from __future__ import annotations

import signal

from model.train.common import StopRequest


def test_a_signal_after_the_flag_is_kept_for_the_next_step():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop = StopRequest()
        assert stop.flag("cpu").item() == 0.0
        stop._handler()  # arrives after this step's flag was read
        assert not stop.settle(0.0)  # every rank agreed on "go on" for this step
        assert stop.flag("cpu").item() == 1.0 and stop.settle(1.0)  # and on "stop" at the next
        assert StopRequest().settle(1.0)  # another rank's request is this rank's too
    finally:
        signal.signal(signal.SIGTERM, previous)
