"""Events read back as the Event objects the trainer wrote; other versions' files and torn lines read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from napari_sgrs.core.events import Event, EventFollower, EventKind, EventWriter, read_events

ROOT = Path(__file__).parents[2]

# One event of every kind the trainer writes, with the fields it writes (numpy scalars and paths
# included, as the trainer hands them over).
WRITTEN = {
    EventKind.STARTED: dict(total=40, device="cpu", method="sgrs", config={"patch_size": [16, 16, 16]},
                            note="training 3 classes"),
    EventKind.PROGRESS: dict(loss=np.float32(0.5), loss_sup=0.25, loss_unsup=np.float64(0.125), weight=0.1,
                             total=40, eta_s=12.5, steps_per_s=3.0, device="cpu", memory_mb=None),
    EventKind.VALIDATION: dict(dice=0.75, per_case={"c0": 0.5, "c1": 1.0}),
    EventKind.REGIONS: dict(scope="batch", disregarded=0.25, consistent=0.5, inconsistent=0.25),
    EventKind.CHECKPOINT: dict(path=Path("run/checkpoints/last.safetensors"), sha256="ab" * 32, best=False),
    EventKind.STOPPED: dict(reason="STOP file", path=None),
    EventKind.FINISHED: dict(path="run/checkpoints/last.safetensors", best_dice=np.float32(0.75)),
    EventKind.ERROR: dict(message="loss became NaN at step 3"),
}


def test_every_kind_the_trainer_writes_has_a_case_here():
    assert set(WRITTEN) == set(EventKind) - {EventKind.UNKNOWN}


def test_every_kind_reads_back_as_the_event_written(tmp_path):
    heard = []
    writer = EventWriter(tmp_path / "events.jsonl", listeners=[heard.append])
    written = [writer.emit(kind, step, **fields) for step, (kind, fields) in enumerate(WRITTEN.items())]
    writer.close()
    read = read_events(tmp_path / "events.jsonl")
    assert read == written == heard
    assert [e.kind for e in read] == list(WRITTEN) and all(type(e) is Event for e in read)
    progress = read[1]
    assert progress.step == 1 and type(progress.data["loss"]) is float and progress.data["loss"] == 0.5
    assert read[4].data["path"] == str(Path("run/checkpoints/last.safetensors"))
    # and once more through the file: writing a read event gives the same line
    again = tmp_path / "again.jsonl"
    again.write_text("".join(e.to_json() + "\n" for e in read))
    assert again.read_text() == (tmp_path / "events.jsonl").read_text()


def _lines(path: Path, *objects, tail: str = "") -> None:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects) + tail)


def test_a_newer_or_older_writer_reads(tmp_path):
    path = tmp_path / "events.jsonl"
    _lines(path,
           {"kind": "progress", "step": 4, "time": 1.5, "loss": 0.5, "grad_norm": 2.0},   # a field added later
           {"kind": "epoch", "step": 5, "time": 2.0, "epoch": 1},                        # a kind added later
           {"kind": "finished", "step": 6},                                              # no time (older)
           {"step": 7, "time": 3.0})                                                     # no kind at all
    progress, epoch, finished, kindless = read_events(path)
    assert progress == Event(EventKind.PROGRESS, 4, {"loss": 0.5, "grad_norm": 2.0}, 1.5)
    assert epoch == Event(EventKind.UNKNOWN, 5, {"kind": "epoch", "epoch": 1}, 2.0)
    assert finished == Event(EventKind.FINISHED, 6, {}, 0.0)
    assert kindless == Event(EventKind.UNKNOWN, 7, {}, 3.0)
    # an unknown kind is written back under its own name, so a newer reader still knows it
    assert json.loads(epoch.to_json())["kind"] == "epoch" and Event.from_json(epoch.to_json()) == epoch


@pytest.mark.parametrize("bad", [
    '{"kind": "progress", "step": 3, "lo',        # torn mid-line, then the next run's events
    "[1, 2]", "42", "null", '"started"',          # JSON, but no event
    '{"kind": "progress", "step": "three"}', '{"kind": "progress", "step": null}', '{"kind": "error", "time": []}',
    "my own notes",
])
def test_a_line_that_is_no_event_is_skipped(tmp_path, bad):
    path = tmp_path / "events.jsonl"
    _lines(path, {"kind": "started", "step": 0, "time": 1.0}, bad, {"kind": "finished", "step": 2, "time": 2.0})
    assert [(e.kind, e.step) for e in read_events(path)] == [(EventKind.STARTED, 0), (EventKind.FINISHED, 2)]


def test_a_torn_last_line_is_no_event_until_it_is_complete(tmp_path):
    path = tmp_path / "events.jsonl"
    line = json.dumps({"kind": "checkpoint", "step": 2, "time": 2.0, "best": True})
    _lines(path, {"kind": "started", "step": 0, "time": 1.0}, tail=line[:-1])      # a writer killed mid-line
    assert [e.kind for e in read_events(path)] == [EventKind.STARTED]
    follower = EventFollower(path)
    assert [e.kind for e in follower.poll()] == [EventKind.STARTED]
    assert follower.poll() == []
    with open(path, "a") as fh:                                                   # a live writer finishes it
        fh.write(line[-1] + "\n")
    assert follower.poll() == [Event(EventKind.CHECKPOINT, 2, {"best": True}, 2.0)]


def test_a_resumed_run_after_a_torn_line_loses_none_of_its_events(tmp_path):
    path = tmp_path / "events.jsonl"
    _lines(path, {"kind": "started", "step": 0, "time": 1.0}, tail='{"kind": "progress", "st')
    writer = EventWriter(path)
    started = writer.emit(EventKind.STARTED, 3, total=10)
    writer.close()
    assert read_events(path) == [Event(EventKind.STARTED, 0, {}, 1.0), started]


def test_the_follower_reads_each_event_once(tmp_path):
    path = tmp_path / "events.jsonl"
    follower = EventFollower(path)
    assert follower.poll() == []                                                  # no file yet
    writer = EventWriter(path)
    first = writer.emit(EventKind.STARTED, 0, total=3)
    assert follower.poll() == [first] and follower.poll() == []
    later = [writer.emit(EventKind.PROGRESS, s, loss=1.0 / s) for s in (1, 2)]
    resumed = EventFollower(path, from_end=True)                                  # a resumed run's new events only
    last = writer.emit(EventKind.FINISHED, 3, path="x")
    writer.close()
    assert follower.poll() == later + [last] and resumed.poll() == [last]
    _lines(path, {"kind": "started", "step": 0, "time": 5.0})                     # a new, shorter file in its place
    assert follower.poll() == [Event(EventKind.STARTED, 0, {}, 5.0)]


def test_the_documented_kinds_are_the_written_kinds():
    docs = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    listings = [re.findall(r"`(\w+)`", m) for m in re.findall(r"Event kinds[^:]*:(.*?)\.\s", docs, re.S)]
    assert listings and all(kinds == [k.value for k in WRITTEN] for kinds in listings), listings
