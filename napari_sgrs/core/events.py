"""Typed messages from the trainer to whoever watches it (terminal, napari panel, tests).

The trainer appends one JSON object per line to ``RUN/events.jsonl`` and flushes it, so a
separate process (the napari panel) can follow a run by reading new lines. Every event has
``kind``, ``step`` and ``time`` (unix seconds); the other fields depend on the kind.

Reading gives back the :class:`Event` that was written, equal field for field:
:func:`read_events` reads a whole file, :class:`EventFollower` the lines appended since its
last call. A file from another version of sgrs still reads: fields this version does not know
stay in :attr:`Event.data`, and a kind it does not know reads as :attr:`EventKind.UNKNOWN`.
A line that is not an event (torn by a writer killed mid-line) is skipped.
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
    VALIDATION = "validation"  # dice (mean foreground Dice on the validation split), per_case
    REGIONS = "regions"        # disregarded/consistent/inconsistent shares; accuracy inside each on validation;
    #                            scope "calibration": the review calibration (reliability.ReviewCalibration)
    CHECKPOINT = "checkpoint"  # path, sha256, best (bool)
    STOPPED = "stopped"        # reason; a checkpoint was written first
    FINISHED = "finished"      # path of the final checkpoint
    ERROR = "error"            # message (one line)
    #: Read back only, never written: a kind this version does not know (say, from a newer
    #: trainer). Its name stays in ``data["kind"]``, so writing the event again keeps it.
    UNKNOWN = "unknown"


#: The fields every event has; the rest of a line is the kind's own data.
_COMMON = ("kind", "step", "time")


@dataclass
class Event:
    kind: EventKind
    step: int
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        payload: dict[str, Any] = {"kind": self.kind.value, "step": self.step, "time": round(self.time, 3)}
        if self.kind is EventKind.UNKNOWN and "kind" in self.data:
            payload["kind"] = self.data["kind"]
        payload.update((k, v) for k, v in self.data.items() if k not in _COMMON)
        return json.dumps(payload, default=_jsonable)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Event":
        """The event of one parsed line. Raises ValueError for what is no event (not an object,
        a step or time that is not a number); an unknown kind reads as :attr:`EventKind.UNKNOWN`."""
        if not isinstance(d, dict):
            raise ValueError(f"an event is a JSON object, not {type(d).__name__}")
        data = {k: v for k, v in d.items() if k not in _COMMON}
        name = d.get("kind")
        try:
            kind = EventKind(name)
        except ValueError:
            kind = EventKind.UNKNOWN
            if "kind" in d:
                data["kind"] = name
        try:
            step, t = int(d.get("step", 0)), float(d.get("time", 0.0))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"bad step or time in an event: {exc}") from None
        return cls(kind=kind, step=step, data=data, time=t)

    @classmethod
    def from_json(cls, line: str | bytes) -> "Event":
        """The event of one line of ``events.jsonl``; ValueError if it is none (a torn line)."""
        return cls.from_dict(json.loads(line))


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
        self._fh = None
        if self.path is not None:
            torn = _ends_without_newline(self.path)
            self._fh = open(self.path, "a", encoding="utf-8")
            if torn:
                # A writer killed mid-line left a fragment: end it, so that this run's first event
                # is a line of its own instead of the unreadable tail of that fragment.
                self._fh.write("\n")

    def emit(self, kind: EventKind, step: int, **data: Any) -> Event:
        """Write one event and hand it to the listeners. The event handed on is the one a reader
        of the file gets back (JSON types, time to the millisecond), so both see the same."""
        line = Event(kind=kind, step=step, data=data).to_json()
        event = Event.from_json(line)
        if self._fh is not None:
            self._fh.write(line + "\n")
            self._fh.flush()
        for listener in self.listeners:
            listener(event)
        return event

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _ends_without_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _parse_lines(chunk: bytes) -> list[Event]:
    events = []
    for line in chunk.splitlines():
        if not line.strip():
            continue
        try:
            events.append(Event.from_json(line))
        except ValueError:  # json's decode errors are ValueErrors too
            continue  # a torn line from a killed writer: skip it, keep reading
    return events


def read_events(path: str | os.PathLike) -> list[Event]:
    """Every event in an ``events.jsonl`` ([] when there is no such file).

    Only complete lines count: a last line without its newline is being written, or was torn by
    a writer killed mid-line, and is not an event yet."""
    return EventFollower(path).poll()


class EventFollower:
    """Follows a growing ``events.jsonl``: each :meth:`poll` returns the events appended since
    the last one. A partly written last line is left for the next poll, so a reader polling a
    live run never sees half an event.

    ``from_end``: start at the file's current end (follow a resumed run's new events only).
    """

    def __init__(self, path: str | os.PathLike, from_end: bool = False):
        self.path = Path(path)
        self.offset = 0
        if from_end:
            try:
                self.offset = self.path.stat().st_size
            except FileNotFoundError:
                pass

    def poll(self) -> list[Event]:
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self.offset:
                    self.offset = 0  # a new file in its place: read it from the start
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        return _parse_lines(chunk[: end + 1])
