"""Engine errors that end a job with a clear message and a meaningful exit code."""

from __future__ import annotations

from .. import protocol


class EngineError(Exception):
    """An expected failure: the message names the problem, the hint says what to do."""

    code = protocol.EXIT_FAILED

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  -> {self.hint}" if self.hint else self.message


class BadInputError(EngineError):
    code = protocol.EXIT_BAD_INPUT


class NoPersonError(EngineError):
    code = protocol.EXIT_NO_PERSON


class MissingModelError(EngineError):
    code = protocol.EXIT_MISSING_MODEL


class CancelledError(EngineError):
    code = protocol.EXIT_CANCELLED


class OutputError(EngineError):
    code = protocol.EXIT_IO


class BusyError(EngineError):
    code = protocol.EXIT_BUSY


class NeedsChoiceError(EngineError):
    code = protocol.EXIT_NEEDS_CHOICE
