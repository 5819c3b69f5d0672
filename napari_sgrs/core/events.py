"""Typed messages from the trainer to whoever watches it (terminal, napari panel, tests).

The trainer appends one JSON object per line to ``RUN/events.jsonl`` and flushes it, so a
separate process (the napari panel) can follow a run by reading new lines. Every event has
``kind``, ``step`` and ``time`` (unix seconds); the other fields depend on the kind.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class EventKind(str, Enum):
    STARTED = "started"        # total, device, method, config
    PROGRESS = "progress"      # loss, loss_sup, loss_unsup, weight, total, eta_s, steps_per_s, device, memory_mb
    #                            (+ loss_anchor: sgrs with --pseudo-anchor labels)
    VALIDATION = "validation"  # dice (mean foreground Dice on the validation split), per_case
    REGIONS = "regions"        # disregarded/consistent/inconsistent shares; accuracy inside each on validation
    CHECKPOINT = "checkpoint"  # path, sha256, best (bool)
    STOPPED = "stopped"        # reason; a checkpoint was written first
    FINISHED = "finished"      # path of the final checkpoint
    ERROR = "error"            # message (one line)


@dataclass
class Event:
    kind: EventKind
    step: int
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        payload = {"kind": self.kind.value, "step": self.step, "time": round(self.time, 3)}
        payload.update(self.data)
        return json.dumps(payload, default=_jsonable)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Event":
        d = dict(d)
        kind = EventKind(d.pop("kind"))
        step = int(d.pop("step", 0))
        t = float(d.pop("time", 0.0))
        return cls(kind=kind, step=step, data=d, time=t)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return obj.value
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class EventWriter:
    """Appends events to a JSON-lines file; a writer with path None only forwards to listeners."""

    def __init__(self, path: Path | None, listeners: list | None = None):
        self.path = Path(path) if path is not None else None
        self.listeners = list(listeners or [])
        self._fh = open(self.path, "a", encoding="utf-8") if self.path is not None else None

    def emit(self, kind: EventKind, step: int, **data: Any) -> Event:
        event = Event(kind=kind, step=step, data=data)
        if self._fh is not None:
            self._fh.write(event.to_json() + "\n")
            self._fh.flush()
        for listener in self.listeners:
            listener(event)
        return event

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_events(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Read the complete lines appended since byte ``offset``; returns (events, new offset).

    A partly written last line is left for the next call, so a reader polling a live run never
    sees half an event.
    """
    path = Path(path)
    if not path.exists():
        return [], offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for line in chunk[: end + 1].splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line from a killed writer: skip it, keep following
    return events, offset + end + 1
