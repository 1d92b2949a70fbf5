"""Files written atomically: a reader, or a process killed mid-write, sees the old file or the new one,
never a torn one. Used for every file bptt writes (vocabularies, models, checkpoints, metrics).

This module imports nothing from bptt: the data layer and the storage layer both use it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

HASH_CHUNK = 1 << 24  # files are hashed 16 MiB at a time: never held whole in memory


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (where the platform allows it for directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temp_files(path: Path) -> None:
    """Remove the temp files that earlier writes of path left behind when their process was killed."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path atomically: temp file in the same directory, fsync, os.replace, fsync dir.

    On any exception the temp file is removed and an existing file at path is left untouched. A process
    killed mid-write leaves path either old or new, and maybe a temp file ".{name}.*.tmp": the next
    write of the same path removes such leftovers (one writer per path is assumed).
    """
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """atomic_write_bytes for a writer that writes a file by name (e.g. safetensors' save_file, which writes
    each tensor from its own memory: no serialised copy of the whole file is ever held): write(tmp) fills
    a temp file in the same directory, then fsync, os.replace, fsync dir, with the same guarantees."""
    atomic_write_all([(path, write)])


def atomic_write_all(files: list[tuple[str | os.PathLike, bytes | Callable[[Path], None]]]) -> None:
    """Write several files all or nothing, each given as its bytes or as a writer of a file by name (see
    atomic_write_file): every temp file written and fsynced first (an error there, e.g. a full disk or a name
    too long, leaves every path as it was and removes the temp files), then each renamed into place."""
    written: list[tuple[Path, Path]] = []
    replaced = 0
    try:
        for path, content in files:
            path = Path(path)
            _remove_stale_temp_files(path)
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
            written.append((tmp, path))
            if isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                content(tmp)
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, path in written:
            os.replace(tmp, path)
            replaced += 1
    except BaseException:
        for tmp, _ in written[replaced:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for parent in dict.fromkeys(path.parent for _, path in written):
        fsync_path(parent)


def temp_name_fits(path: str | os.PathLike) -> bool:
    """Whether the temp file of an atomic write of `path` (".{name}.XXXXXXXX.tmp") is a legal name there."""
    path = Path(path)
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    return len(os.fsencode(path.name)) + 14 <= limit


def remove_file(path: Path) -> None:
    """Unlink `path` if it is a file or a symlink (never a directory)."""
    if path.is_file() or path.is_symlink():
        path.unlink()


def remove_files_and_dir(directory: Path) -> None:
    """The files directly in `directory`, then the directory itself if that left it empty (subdirectories
    are kept, and with them the directory); a file or symlink given is unlinked."""
    if not directory.is_dir() or directory.is_symlink():
        remove_file(directory)
        return
    for path in sorted(directory.iterdir()):
        remove_file(path)
    if not any(directory.iterdir()):
        directory.rmdir()


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file, read HASH_CHUNK bytes at a time (memory does not grow with the file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Serialise obj (indent 2, sorted keys) and write it with atomic_write_bytes.

    Serialisation happens before anything touches the disk, so an unserialisable obj writes nothing.
    """
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
    atomic_write_bytes(path, data)


