"""The memory budget of a command: what this machine can give, checked before work starts.

Loading a model that does not fit must be a clear error before anything is allocated, never
the kernel's OOM killer half way through. The budget defaults to the memory the machine has
available now (``MemAvailable``, and a cgroup's limit when that is lower); ``--max-memory``
sets it. Sizes are written ``"20GiB"`` (2^30), ``"20GB"`` (10^9), ``"512MB"`` or bytes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

Size = Union[int, str]


class MemoryBudgetError(ValueError):
    """Work that needs more memory than the budget; the message says how much of each."""


def parse_size(size: Size, what: str = "size") -> int:
    """``"5GB"`` (10^9), ``"200MiB"`` (2^20), ``"10KB"`` or an int -> bytes (``what`` names the
    setting in the error)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
        if not m:
            raise ValueError(f"cannot parse {what} {size!r}; use e.g. '20GiB', '5GB', '200MB' or bytes")
        n = int(float(m.group(1)) * _UNITS[m.group(2) or "B"])
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return n


def format_size(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _cgroup_limit() -> Optional[int]:
    for path, parse in (("/sys/fs/cgroup/memory.max", lambda s: None if s == "max" else int(s)),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", int)):
        try:
            limit = parse(Path(path).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit is not None and limit < 2**60:  # cgroup v1 writes a huge number for "none"
            return limit
    return None


def available_bytes() -> int:
    """Memory this machine can give a new allocation now: ``MemAvailable`` (free memory plus the
    page cache that can be dropped), capped by a cgroup limit; total memory where neither is
    known."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return min(avail, limit) if limit is not None else avail


def budget_bytes(max_memory: Optional[Size] = None) -> int:
    """The budget: ``max_memory`` when given, else what the machine can give now."""
    return available_bytes() if max_memory is None else parse_size(max_memory, "max_memory")


def check_budget(need: int, what: str, max_memory: Optional[Size] = None,
                 budget: Optional[int] = None) -> None:
    """Raise ``MemoryBudgetError`` when ``need`` bytes exceed the budget (``budget`` when the caller
    has it, else ``budget_bytes(max_memory)``)."""
    budget = budget_bytes(max_memory) if budget is None else budget
    if need > budget:
        source = f"--max-memory {max_memory}" if max_memory is not None else "available on this machine now"
        raise MemoryBudgetError(f"{what} needs about {format_size(need)} but the memory budget is "
                                f"{format_size(budget)} ({source})")
