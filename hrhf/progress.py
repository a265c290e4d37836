"""Progress of a run as structured events (stage, step, counter, metrics, ETA), written as text or JSON lines.

A ``Progress`` is also callable with a plain message, so it goes wherever the pipeline takes a log
function; ``as_progress`` wraps a plain log function (``print``, ``list.append``) into one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

Log = Callable[[str], None]  # a plain log function, or a Progress for structured events
FORMATS = ("text", "json")
LEVELS = ("info", "warning", "error")

# Keys every record may carry; anything else an event is given is a field of its own.
_RESERVED = ("time", "level", "stage", "step", "message", "done", "total", "unit", "elapsed_s", "eta_s")


def _text_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, ".4g") if isinstance(value, float) else str(value)


def duration(seconds: float) -> str:
    """Seconds as '42s', '3m05s' or '1h02m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_text(record: dict[str, Any]) -> str:
    """One human-readable line: '[step 1] training epoch 3/20 loss=0.1234 eta 1m20s'."""
    parts = [f"[step {record['step']}]"] if record.get("step") is not None else []
    if record.get("level", "info") != "info":
        parts.append(f"{record['level']}:")
    parts.append(record["stage"])
    if record.get("done") is not None:
        counter = f"{record['done']}/{record['total']}" if record.get("total") is not None else str(record["done"])
        parts.append(f"{record['unit']} {counter}" if record.get("unit") else counter)
    if record.get("message"):
        parts.append(record["message"])
    for key, value in record.items():
        if key not in _RESERVED:
            parts.append(f"{key}={_text_value(value)}")
    if record.get("eta_s") is not None:
        parts.append(f"eta {duration(record['eta_s'])}")
    return " ".join(parts)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN and infinities are not JSON
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def format_json(record: dict[str, Any]) -> str:
    """One JSON object on one line."""
    return json.dumps(_json_safe(record), allow_nan=False, default=str)


class Progress:
    """Receives progress events and writes each as one line of text or JSON.

    ``write`` takes each line (default: print to the current stdout, flushed). ``quiet`` drops every event
    but errors; ``final`` (the job's report) is written even then. ETA: the first event of a (stage, step)
    starts its clock, and later events of it extrapolate the rate so far to the rest of ``total``.
    """

    def __init__(
        self,
        fmt: str = "text",
        quiet: bool = False,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown log format {fmt!r}; formats: {', '.join(FORMATS)}")
        self.fmt = fmt
        self.quiet = quiet
        self.write = write
        self.clock = clock
        self._origins: dict[tuple[str, int | None], tuple[float, int]] = {}

    def event(
        self,
        stage: str,
        step: int | None = None,
        message: str | None = None,
        *,
        done: int | None = None,
        total: int | None = None,
        unit: str | None = None,
        level: str = "info",
        estimate: bool = True,
        **fields: Any,
    ) -> dict[str, Any]:
        """Record one event and write it; ``estimate=False`` for counters replayed after the fact (no ETA)."""
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}; levels: {', '.join(LEVELS)}")
        record: dict[str, Any] = {"time": round(time.time(), 3), "level": level, "stage": stage, "step": step}
        if message:
            record["message"] = message
        if done is not None:
            record.update(done=done, total=total, unit=unit)
            if estimate:
                record.update(self._timing(stage, step, done, total))
        record.update(fields)
        if not self.quiet or level == "error":
            self._emit(self.format(record))
        return record

    def _timing(self, stage: str, step: int | None, done: int, total: int | None) -> dict[str, float]:
        now, key = self.clock(), (stage, step)
        origin = self._origins.get(key)
        if origin is None or done < origin[1]:
            self._origins[key] = (now, done)
            return {}
        start, start_done = origin
        timing = {"elapsed_s": round(now - start, 1)}
        if total is not None and done > start_done and now > start:
            rate = (done - start_done) / (now - start)
            timing["eta_s"] = round(max(total - done, 0) / rate, 1)
        return timing

    def format(self, record: dict[str, Any]) -> str:
        """The record as a line in this reporter's format."""
        return format_json(record) if self.fmt == "json" else format_text(record)

    def final(self, report: dict[str, Any], markdown: str) -> None:
        """The job's last output, written even when quiet: the Markdown report, or one JSON record holding the report."""
        if self.fmt == "json":
            steps = report.get("steps") or [{}]
            record = {"time": round(time.time(), 3), "level": "info", "stage": "report",
                      "step": steps[-1].get("step"), "report": report}
            self._emit(format_json(record))
        else:
            self._emit(markdown.rstrip("\n"))

    def __call__(self, message: str) -> None:
        """A plain log message, as a run-level event."""
        self.event("run", None, message)

    def _emit(self, line: str) -> None:
        if self.write is not None:
            self.write(line)
        else:
            print(line, file=sys.stdout, flush=True)


def as_progress(log: Callable[[str], None] | None) -> Progress:
    """``log`` itself if it is a Progress, else a text Progress writing its lines to ``log`` (None: stdout)."""
    if isinstance(log, Progress):
        return log
    return Progress("text", write=log)
