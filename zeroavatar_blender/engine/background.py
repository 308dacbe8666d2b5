"""One function run on a thread while the caller waits for it and keeps listening: its result,
or its exception.

Why: loading Stable Diffusion and the ControlNet takes seconds to tens of seconds (12 s on an
H100), and a cancel must be heard meanwhile. (It once overlapped the problem build and the body
distillation; optimise.load_guidance says why it no longer does.) The loader must not draw from
torch's global random generator; the diffusion loader does not (checked in test_optimise).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BackgroundCall(Generic[T]):
    def __init__(self, fn: Callable[[], T], name: str = "background") -> None:
        self._fn = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self.seconds = 0.0  # the call's own duration
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self._value = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as it was raised
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - started

    def result(self, should_stop: Callable[[], bool] | None = None) -> T:
        """The function's value (its exception is raised here). ``should_stop`` is asked every
        0.1 s while waiting; when it says yes, ``InterruptedError`` is raised and the thread is
        left to finish on its own (a daemon: it does not keep the process alive)."""
        while self._thread.is_alive():
            self._thread.join(0.1)
            if self._thread.is_alive() and should_stop is not None and should_stop():
                raise InterruptedError("stopped while waiting for a background call")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
