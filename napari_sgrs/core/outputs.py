"""Where sgrs may write, and how: the output rules shared by every command.

- Files appear atomically (:func:`atomic_write_bytes`): a temp file beside the target, fsynced,
  renamed over it; a kill leaves the old file or the new one, never a torn one.
- An output is never an input: :func:`check_not_input` refuses an output path that is, contains
  or is inside an input (symlinks resolved).
- A file sgrs did not write is never overwritten or deleted: :class:`WrittenFiles` keeps, per
  output folder, the names and sha256 of the files sgrs wrote there (``.sgrs-written.json``),
  and only those, unchanged since, may be replaced or removed.
- ``evaluate --json`` replaces only an earlier sgrs evaluation (:func:`check_json_output`).

Nothing here imports torch, so the CLI can check outputs before it loads a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

from .errors import InputError, ResourceError, os_reason

__all__ = ["MANIFEST_NAME", "WrittenFiles", "atomic_write_bytes", "check_json_output", "check_not_input",
           "file_sha256", "is_temp_of", "remove_stale_temp_files"]

MANIFEST_NAME = ".sgrs-written.json"
_MAX_JSON_BYTES = 64 << 20  # an sgrs manifest or evaluation is far smaller; larger is not ours
_UMASK = os.umask(0)
os.umask(_UMASK)


# --------------------------------------------------------------------------- atomic writes

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename. Raises ResourceError on a full
    or read-only disk and leaves any previous file at ``path`` untouched."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run folder is meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _pause_for_fault_tests()
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise ResourceError(f"cannot write {path}: {os_reason(exc)}; free space or choose another output folder "
                            f"(the previous file there, if any, is unchanged)") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _pause_for_fault_tests() -> None:
    # Test hook: SGRS_TEST_SLOW_CHECKPOINT=<seconds> holds every atomic write between its
    # complete temp file and the rename, so tests/core/test_faults.py can kill -9 mid-write.
    delay = os.environ.get("SGRS_TEST_SLOW_CHECKPOINT")
    if delay:
        import time

        time.sleep(float(delay))


# tempfile.mkstemp's random part: 8 characters of this alphabet
_TEMP_PATTERN = r"^\.{name}\.[a-z0-9_]{{8}}\.tmp$"


def remove_stale_temp_files(folder: Path, names: Iterable[str]) -> list[Path]:
    """Delete the temp files that :func:`atomic_write_bytes` left in ``folder`` for one of
    ``names`` when its writer was killed (``.<name>.<8 random characters>.tmp``, regular files only); any
    other file, whatever its name, stays. A live writer's temp file has the same form: call it
    only while holding the folder's lock."""
    patterns = [re.compile(_TEMP_PATTERN.format(name=re.escape(n))) for n in names]
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if entry.is_file(follow_symlinks=False) and any(p.match(entry.name) for p in patterns):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def is_temp_of(file_name: str, names: Iterable[str]) -> bool:
    """True for the temp-file name that :func:`atomic_write_bytes` gives a write of one of ``names``."""
    return any(re.match(_TEMP_PATTERN.format(name=re.escape(n)), file_name) for n in names)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- outputs vs inputs

def read_json(path: str | os.PathLike, max_bytes: int, what: str, fix: str):
    """The content of the JSON file ``path``. InputError, one line naming the file, ``what`` it
    should be and the ``fix``, when it is larger than ``max_bytes`` (checked before reading),
    unreadable, or not JSON."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size <= max_bytes:
            text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); {fix}") from exc
    if size > max_bytes:
        raise InputError(f"{path}: {size} bytes is no {what}; {fix}")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); {fix}") from exc


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def check_not_input(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                    what: str = "--out") -> None:
    """Refuse ``output`` when it is, contains, or is inside one of ``inputs`` (option name ->
    path; None entries are skipped), symlinks resolved: sgrs never writes into its inputs."""
    out = _real(output)
    for flag, given in inputs.items():
        if given is None:
            continue
        source = _real(given)
        if out == source:
            relation = "is"
        elif source in out.parents:
            relation = "is inside"
        elif out in source.parents:
            relation = "contains"
        else:
            continue
        raise InputError(f"{what} {output} {relation} the input {flag} {given}; sgrs never writes into its "
                         f"inputs: choose {what} outside them")


# --------------------------------------------------------------------------- what sgrs wrote

class WrittenFiles:
    """The files that ``by`` (e.g. ``"sgrs predict"``) wrote into ``folder``.

    ``FOLDER/.sgrs-written.json`` maps each file's path relative to ``folder`` to its sha256
    (None while the write is under way). A file may be replaced or removed by sgrs only when it
    is listed and unchanged (:meth:`owns`); the manifest never names a file to act on, it only
    vouches for paths that the caller computed, so a forged one cannot aim sgrs elsewhere.
    """

    def __init__(self, folder: str | os.PathLike, by: str):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        self.by = by

    def _load(self) -> dict[str, str | None]:
        try:
            if self.path.is_symlink() or self.path.stat().st_size > _MAX_JSON_BYTES:
                return {}
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # missing or damaged: nothing counts as sgrs's
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            return {}
        return {k: v for k, v in files.items() if isinstance(k, str) and (v is None or isinstance(v, str))}

    def _key(self, path: Path) -> str:
        return Path(path).relative_to(self.folder).as_posix()

    def owns(self, path: str | os.PathLike, _files: dict | None = None) -> bool:
        """True when ``path`` (inside the folder) is a regular file that sgrs wrote and nobody
        changed since (a write that was under way when its process died counts as sgrs's)."""
        path = Path(path)
        files = self._load() if _files is None else _files
        key = self._key(path)
        if key not in files or path.is_symlink() or not path.is_file():
            return False
        return files[key] is None or file_sha256(path) == files[key]

    def check(self, targets: Iterable[str | os.PathLike], choose: str = "another --out") -> None:
        """Refuse, before anything is written, when a target exists and is not sgrs's own."""
        files = self._load()
        for target in targets:
            target = Path(target)
            if (target.exists() or target.is_symlink()) and not self.owns(target, files):
                raise InputError(f"{target} exists and was not written by {self.by} (or was changed since); "
                                 f"sgrs never overwrites such a file: move it away or choose {choose}")

    def expect(self, targets: Iterable[str | os.PathLike]) -> None:
        """Record that these files are about to be written (before writing them)."""
        files = self._load()
        for target in targets:
            files[self._key(Path(target))] = None
        self._save(files)

    def record(self, written: Iterable[str | os.PathLike]) -> None:
        """Record the sha256 of files just written."""
        files = self._load()
        for path in written:
            files[self._key(Path(path))] = file_sha256(path)
        self._save(files)

    def remove(self, paths: Iterable[str | os.PathLike]) -> list[Path]:
        """Delete those of ``paths`` that sgrs owns; returns them. The others are left alone."""
        files = self._load()
        removed = []
        for path in map(Path, paths):
            if self.owns(path, files):
                path.unlink()
                files.pop(self._key(path), None)
                removed.append(path)
        self._save(files)
        return removed

    def _save(self, files: dict) -> None:
        atomic_write_bytes(self.path, (json.dumps({"written_by": self.by, "files": files}, indent=1) + "\n")
                           .encode("utf-8"))


# --------------------------------------------------------------------------- evaluation JSON

def _is_evaluation_json(path: Path) -> bool:
    """An evaluation report as sgrs writes it (metrics.EvaluationReport.to_dict)."""
    try:
        if path.is_symlink() or path.stat().st_size > _MAX_JSON_BYTES:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and isinstance(data.get("definitions"), dict) and "hd95" in data["definitions"]
            and isinstance(data.get("cases"), list) and isinstance(data.get("summary"), dict))


def check_json_output(path: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                      what: str = "--json") -> None:
    """A JSON report path: not an input nor inside one, not a folder, in a folder that exists,
    and replacing at most an earlier sgrs evaluation JSON."""
    path = Path(path)
    check_not_input(path, inputs, what)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name such as {path / 'evaluation.json'}")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{what} {path}: the folder {parent} does not exist; create it or choose another {what}")
    if (path.exists() or path.is_symlink()) and not _is_evaluation_json(path):
        raise InputError(f"{what} {path} exists and is not an sgrs evaluation report; sgrs never overwrites "
                         f"such a file: move it away or choose another {what}")
