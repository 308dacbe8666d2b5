"""Show a job's events on a terminal: a one-line progress bar, or JSON lines for scripts."""

from __future__ import annotations

import json
import shutil
import sys
import time
from typing import Any, TextIO


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(round(s))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class TerminalProgress:
    """Event hook: redraws a bar for progress events, prints stage changes and messages."""

    def __init__(self, mode: str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self._bar_open = False
        self._last_line = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        if self.mode == "none":
            return
        if self.mode == "json":
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
            return
        kind = event["type"]
        if kind == "progress":
            self._progress(event)
            return
        text = {
            "stage": lambda e: f"[{e['stage']}] {e['message']}",
            "message": lambda e: f"{'warning: ' if e.get('level') == 'warning' else ''}{e['message']}",
            "error": lambda e: f"error: {e['message']}" + (f"\n  -> {e['hint']}" if e.get("hint") else ""),
            "result": lambda e: f"avatar bundle: {e['path']}",
            "export": lambda e: f"exported {e['format']}: {e['path']}",
            "done": lambda e: f"done: {e['status']}",
        }.get(kind)
        if text is not None:
            self._print(text(event))

    def _print(self, line: str) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
        self.stream.write(line + "\n")
        self.stream.flush()

    def _progress(self, e: dict[str, Any]) -> None:
        step, total = e["step"], max(1, e["total"])
        loss = f" loss {e['loss']:.4g}" if "loss" in e else ""
        info = f" {step}/{total}{loss} {_fmt_seconds(e.get('elapsed'))}<{_fmt_seconds(e.get('eta'))}"
        if self.mode == "lines":  # logs and pipes: a line now and then, not a bar
            now = time.time()
            if step == total or now - self._last_line > 5:
                self._last_line = now
                self._print(f"[{e['stage']}]{info}")
            return
        width = max(10, min(40, shutil.get_terminal_size((80, 20)).columns - len(info) - len(e["stage"]) - 6))
        filled = int(width * step / total)
        self.stream.write(f"\r[{e['stage']}] |{'#' * filled}{'.' * (width - filled)}|{info}\033[K")
        self.stream.flush()
        self._bar_open = True
        if step >= total:
            self.stream.write("\n")
            self._bar_open = False
