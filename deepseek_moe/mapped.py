"""A model whose weights are memory-mapped from its safetensors files, kept within a resident size.

A big checkpoint loaded in its stored dtype (``checkpoint.load_pretrained``) allocates nothing:
its tensors are pages of the files. Every page a forward pass touches then counts in the
process's resident size (RSS) until the kernel takes it back, so evaluating or analysing the
16B model, whose bf16 weights (31 GiB) every batch touches, would show an RSS of the whole
model on a machine that cannot hold it. Schedulers and the OOM killer judge a process by that
number. ``ResidentLimit`` keeps it under a limit: after each decoder layer, when the resident
size is over, the weight files' pages are released from the process (``madvise(MADV_DONTNEED)``).
They stay in the page cache, so a later touch is a minor fault, not a read from disk, when the
machine has the memory.

Only pages the process never wrote are released: a private mapping whose page was written (a
weight changed in place) holds its own copy, and releasing it would undo the change, so such a
mapping is left alone. Linux only; elsewhere the limit does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from torch import nn

MADV_DONTNEED = 4
RESIDENT_FRACTION = 0.8  # of the command's memory budget; the rest for activations and caches


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    path: str
    rss: int  # bytes resident
    written: int  # bytes the process wrote (private copies); never released

    @property
    def size(self) -> int:
        return self.end - self.start


def supported() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self/smaps").is_file()


_statm: dict[int, int] = {}  # process id -> its open ``/proc/self/statm``


def resident_bytes() -> int:
    """The process's resident size now (``/proc/self/statm``, kept open: one read per call, as
    ``ResidentLimit`` checks after every layer); 0 where unknown."""
    try:
        pid = os.getpid()  # a forked child must not read its parent's file
        if pid not in _statm:
            for fd in _statm.values():  # the parent's, inherited
                os.close(fd)
            _statm.clear()
            _statm[pid] = os.open("/proc/self/statm", os.O_RDONLY)
        return int(os.pread(_statm[pid], 256, 0).split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def file_mappings(paths: Iterable[os.PathLike | str]) -> list[Mapping]:
    """The process's mappings of ``paths``, with their resident and written bytes (``smaps``)."""
    wanted = {str(Path(p).resolve()) for p in paths}
    found: list[Mapping] = []
    current: Optional[list] = None
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            if current is not None:
                found.append(Mapping(*current))
            current = None
            if len(head) == 6 and head[5].strip() in wanted:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                current = [lo, hi, head[5].strip(), 0, 0]
        elif current is not None and head:
            if head[0] == "Rss:":
                current[3] = int(head[1]) * 1024
            elif head[0] == "Anonymous:":
                current[4] = int(head[1]) * 1024
    if current is not None:
        found.append(Mapping(*current))
    return found


_libc = None


def release(mappings: Iterable[Mapping]) -> int:
    """Release the pages of the never-written ``mappings`` from the process; returns the resident
    bytes they held."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    freed = 0
    for m in mappings:
        if m.written or not m.rss:
            continue
        if _libc.madvise(m.start, m.size, MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise of {m.path}: {os.strerror(err)}")
        freed += m.rss
    return freed


class ResidentLimit:
    """Keep the process's resident size under ``limit`` bytes while ``model`` runs, by releasing
    the pages of its weight ``files`` after any decoder layer that ends over the limit.

    The check is one read of ``/proc/self/statm`` per layer; the release, when due, reads the
    process's mappings once. ``releases`` and ``released`` count what it did."""

    def __init__(self, model: nn.Module, files: Iterable[os.PathLike | str], limit: int):
        self.files = [str(f) for f in files]
        self.limit = int(limit)
        self.releases = 0
        self.released = 0
        layers = getattr(getattr(model, "model", model), "layers", None)
        modules = list(layers) if layers is not None else [model]
        self.handles = [m.register_forward_hook(self._after) for m in modules] if supported() else []

    def _after(self, module: nn.Module, args: object, output: object) -> None:
        self.check()

    def check(self) -> None:
        if resident_bytes() > self.limit:
            self.released += release(file_mappings(self.files))
            self.releases += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
