"""Atomic writes: a file is either all there or not there at all.

Atomic here means: the content goes to a temporary file in the target's own directory, is
flushed and fsynced, and ``os.replace`` then puts it in place (a rename within one directory), so
a reader, or a crash at any moment, sees the old file or the new one, never part of one. The file
gets the mode a plain write (``open(path, "w")``) would give under the process's umask, not the
0o600 of ``tempfile.mkstemp``. ``fsync_path`` makes a file's data, or a directory's entries after
a rename, durable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # works for files and (on POSIX) directories
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask: read from /proc where there is one, so it is never changed, even
    for a moment (``os.umask`` can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` (0o666) or ``mkdir`` (0o777) gives under the umask. ``tempfile``
    makes its files 0o600 and directories 0o700: atomic writes set this before renaming them in."""
    return (0o777 if directory else 0o666) & ~current_umask()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``; the file gets the
    mode a plain write would give (not ``mkstemp``'s 0o600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, normal_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (NaN allowed), written atomically; creates the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=True) + "\n")


def write_json(path: Path, obj: object) -> None:
    """``obj`` as sorted, indented JSON, fsynced: for a file inside a directory that is renamed
    into place as a whole (``replace_dir``), where the rename is what makes it atomic."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    fsync_path(path)


def replace_dir(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the complete directory ``tmp``. Directories cannot be exchanged
    atomically in portable code, so the old one is renamed aside first and restored if the
    second rename fails; it is deleted only once the new one is in place."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    try:
        fsync_path(path.parent)  # make the renames durable before the old copy goes
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
