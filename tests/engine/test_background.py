"""A call on a thread: its value, its exception, and a wait that a cancel can end."""

from __future__ import annotations

import threading
import time

import pytest

from zeroavatar_blender.engine.background import BackgroundCall
from zeroavatar_blender.engine.errors import BadInputError


def test_value_and_timing_come_back():
    call = BackgroundCall(lambda: (time.sleep(0.2), 42)[1])
    assert call.result() == 42
    assert call.seconds >= 0.2


def test_the_exception_is_raised_in_the_caller_as_it_was():
    def fail():
        raise BadInputError("could not load the UNet", "re-download it")

    with pytest.raises(BadInputError, match="could not load the UNet"):
        BackgroundCall(fail).result()


def test_a_stop_ends_the_wait_and_leaves_the_call_to_finish():
    release = threading.Event()
    call = BackgroundCall(lambda: release.wait(10) and "done")
    started = time.perf_counter()
    with pytest.raises(InterruptedError):
        call.result(should_stop=lambda: time.perf_counter() - started > 0.3)
    assert time.perf_counter() - started < 2.0  # within a poll or two of the stop
    release.set()
    assert call.result() == "done"  # the thread was not killed: a later wait still gets the value
