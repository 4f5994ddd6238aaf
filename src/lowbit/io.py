"""Files that are whole or absent: atomic writes, file-set commits, folder locks, hashes.

Imports nothing of lowbit, so config, plan, export and checkpoints can all use it.

- ``atomic_write_bytes`` / ``atomic_write_text``: one file through a temp file, fsync and a
  rename: readers see the old file or the new one, never a part.
- ``FileSet``: several files that belong together (an export's ``.onnx`` and its sidecars).
  They are written into a staging folder beside the targets, fsynced, and committed by a
  journal written atomically into that folder (the commit point), then renamed into place one
  by one, the root file (``.onnx``) last. A writer that fails before the journal leaves the
  old set; one that fails during the renames puts the old files back (they were hard-linked
  into the staging folder first); one killed during the renames is finished by the next
  ``recover`` (every writer and every lowbit reader of that folder runs it first), so the set a
  lowbit reader sees is always the complete old one or the complete new one.
- ``folder_lock``: ``fcntl.flock`` on the folder itself (no lock file to leave behind):
  commits and reads of one folder take turns. A staging folder is flocked by its writer for its
  lifetime, so ``recover`` knows a dead writer's leftovers (unlocked) from a live one's.

See docs/reliability.md for the guarantee and the tests that hold lowbit to it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

STAGE_PREFIX = ".lowbit-stage-"
LEGACY_PREFIX = ".lowbit-export-"  # temp folders of lowbit versions before FileSet
TMP_SUFFIX = ".lowbit-tmp"
JOURNAL = "JOURNAL"  # roll forward: the new set is committed
ROLLBACK = "ROLLBACK"  # roll back: a live writer failed during the renames
_BACKUP = "old."


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (one place for tests to inject ENOSPC)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


class MissingFileError(FileNotFoundError, ValueError):
    """A file or folder the caller named does not exist (a bad argument and an OS error)."""


class IsADirectoryPathError(IsADirectoryError, ValueError):
    """A path that must name a file names a directory."""


def _check_folder(path: Path) -> Path:
    folder = _folder(path)
    if not folder.is_dir():
        raise MissingFileError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not "
                               "exist; create it first")
    if path.is_dir():
        raise IsADirectoryPathError(f"cannot write {str(path)!r}: it is a directory; name a "
                                    "file")
    return folder


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the target folder, fsync, then rename: no half-written file
    ever; on any failure the old file (if any) stays and the temp file is removed."""
    path = Path(path)
    folder = _check_folder(path)
    tmp = folder / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # marks it live for `recover`
        _write_all(fd, data)
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        _fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, shared: bool = False) -> Iterator[None]:
    """Hold ``fcntl.flock`` on ``folder`` (exclusive unless ``shared``)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when a live process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _read_journal(stage: Path, name: str) -> list[dict[str, object]] | None:
    try:
        entries = json.loads((stage / name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return entries if isinstance(entries, list) else None


def _roll_forward(stage: Path, folder: Path, entries: list[dict[str, object]]) -> None:
    for entry in entries:
        staged = stage / str(entry["name"])
        if staged.exists():
            os.replace(staged, folder / str(entry["name"]))


def _roll_back(stage: Path, folder: Path, entries: list[dict[str, object]]) -> None:
    for entry in reversed(entries):
        final = folder / str(entry["name"])
        backup = stage / (_BACKUP + str(entry["name"]))
        if entry["backup"]:
            if backup.exists():
                os.replace(backup, final)
        elif not (stage / str(entry["name"])).exists():
            final.unlink(missing_ok=True)  # ours: it did not exist before the commit


def _finish(stage: Path, folder: Path) -> None:
    """Complete or undo whatever commit ``stage`` records, then remove it."""
    rollback = _read_journal(stage, ROLLBACK)
    if rollback is not None:
        _roll_back(stage, folder, rollback)
    else:
        forward = _read_journal(stage, JOURNAL)
        if forward is not None:
            _roll_forward(stage, folder, forward)
    _fsync_dir(folder)
    shutil.rmtree(stage, ignore_errors=True)


def recover(folder: str | os.PathLike, *, locked: bool = False,
            keep: Path | None = None) -> list[Path]:
    """Finish or discard the commits of dead writers in ``folder``; return what was cleaned.

    Call with the folder lock held (``locked=True``) or let it take the lock. Live writers'
    staging folders (flocked) and ``keep`` are left alone.
    """
    folder = Path(folder)
    with contextlib.ExitStack() as stack:
        if not locked:
            stack.enter_context(folder_lock(folder))
        cleaned: list[Path] = []
        for entry in sorted(folder.iterdir()):
            name = entry.name
            if entry == keep or not (name.startswith((STAGE_PREFIX, LEGACY_PREFIX))
                                     or name.endswith(TMP_SUFFIX)):
                continue
            fd = _try_lock(entry)
            if fd is None:
                continue  # a live writer's
            try:
                if not os.access(folder, os.W_OK):
                    raise PermissionError(
                        errno.EACCES, f"folder {str(folder)!r} holds an interrupted write "
                        f"({name}) that needs write permission to finish", str(folder))
                if entry.is_dir():
                    _finish(entry, folder)
                else:
                    entry.unlink(missing_ok=True)
                cleaned.append(entry)
            finally:
                os.close(fd)
        return cleaned


class FileSet:
    """Files written together and committed all at once (see the module docstring).

    ``targets`` are the final paths, all in one folder; the LAST one is renamed last (the
    root file that names the others, e.g. the ``.onnx``)::

        with FileSet([params, weights, onnx]) as fs:
            fs.write_bytes(params, b"...")
            torch_writes_to(fs.staged(onnx))
            fs.commit()

    Leaving the block without ``commit`` (an exception) discards the staged files.
    """

    def __init__(self, targets: Sequence[str | os.PathLike]) -> None:
        self.targets = [Path(t) for t in targets]
        if not self.targets:
            raise ValueError("`targets` must name at least one file")
        folders = {_folder(t).resolve() for t in self.targets}
        if len(folders) != 1:
            raise ValueError(f"`targets` must share one folder, got {sorted(map(str, folders))}")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"`targets` must be distinct files, got {names}")
        self.folder = _folder(self.targets[0])
        self.stage: Path | None = None
        self._stage_fd: int | None = None
        self.committed = False

    def open(self) -> FileSet:
        """Create the staging folder (what ``with`` does); pair with ``close``."""
        return self.__enter__()

    def close(self) -> None:
        """Discard whatever was staged and not committed (what leaving ``with`` does)."""
        self.__exit__(None, None, None)

    def __enter__(self) -> FileSet:
        for target in self.targets:
            _check_folder(target)
        name = f"{STAGE_PREFIX}{self.targets[-1].name}-{os.getpid()}-{secrets.token_hex(4)}"
        stage = self.folder / name
        os.mkdir(stage)
        self.stage = stage
        self._stage_fd = os.open(stage, os.O_RDONLY)
        fcntl.flock(self._stage_fd, fcntl.LOCK_EX)  # live until closed (or killed)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.stage is not None and self.stage.exists():
                shutil.rmtree(self.stage, ignore_errors=True)
        finally:
            if self._stage_fd is not None:
                os.close(self._stage_fd)
                self._stage_fd = None

    def staged(self, target: str | os.PathLike) -> Path:
        """Where to write ``target`` before the commit."""
        target = Path(target)
        if self.stage is None:
            raise ValueError("FileSet.staged() needs the `with FileSet(...)` block")
        if target.name not in {t.name for t in self.targets}:
            raise ValueError(f"{str(target)!r} is not one of this set's targets "
                             f"{[str(t) for t in self.targets]}")
        return self.stage / target.name

    def write_bytes(self, target: str | os.PathLike, data: bytes) -> None:
        fd = os.open(self.staged(target), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)

    def commit(self) -> None:
        """Make the staged files the set, atomically for lowbit readers."""
        assert self.stage is not None  # internal: only reachable inside the with block
        stage = self.stage
        for target in self.targets:
            staged = stage / target.name
            if not staged.is_file():
                raise ValueError(f"FileSet.commit(): {target.name!r} was never written")
            fd = os.open(staged, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with folder_lock(self.folder):
            recover(self.folder, locked=True, keep=stage)
            for target in self.targets:
                _check_folder(target)  # e.g. the .onnx path became a directory meanwhile
            entries: list[dict[str, object]] = []
            for target in self.targets:
                final = self.folder / target.name
                backup = final.exists()
                if backup:
                    try:
                        os.link(final, stage / (_BACKUP + target.name))
                    except OSError:
                        shutil.copy2(final, stage / (_BACKUP + target.name))
                entries.append({"name": target.name, "backup": backup})
            journal = json.dumps(entries).encode()
            self._write_journal(JOURNAL, journal)  # the commit point
            try:
                for target in self.targets:
                    os.replace(stage / target.name, self.folder / target.name)
                _fsync_dir(self.folder)
            except BaseException:
                self._write_journal(ROLLBACK, journal)
                _roll_back(stage, self.folder, entries)
                _fsync_dir(self.folder)
                raise
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            self.committed = True

    def _write_journal(self, name: str, data: bytes) -> None:
        assert self.stage is not None
        tmp = self.stage / f"{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.stage / name)
        _fsync_dir(self.stage)


@contextlib.contextmanager
def reading(folder: str | os.PathLike) -> Iterator[None]:
    """Read a file set of ``folder`` with no commit in flight: finishes dead writers' commits
    first (where the folder is writable), then holds the folder lock while the caller reads."""
    folder = Path(folder)
    with folder_lock(folder):
        recover(folder, locked=True)
        yield
