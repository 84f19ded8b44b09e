"""Process-wide choices every command makes once at start: how freed memory is kept, and which
floating-point type the CPU computes fastest in.

Memory. glibc hands every freed block above 32 MB back to the operating system and page-faults
it in again on the next touch. A training step frees and reallocates the same big tensors every
step (the MoE layer's expert weight gradients above all: at the 16B shape 2.2 GB per layer), so
by default each step pays first-touch page faults for all of them, which costs the MoE layer far
more than a dense FFN of the same activated FLOPs. ``keep_freed_memory`` tells glibc to serve big
blocks from the heap and never trim it, so the allocator recycles them.

Compiled kernels. bf16 GEMMs on the CPU are oneDNN kernels compiled for each new shape (about
0.4 ms, ten times a small GEMM) and kept in a cache of 1024 shapes by default. The MoE layer's
per-expert GEMMs change shape with the routing every step; the loop backend rounds their row
counts to a block, and ``configure_process`` widens the cache so that those shapes, once
compiled, stay compiled.

Arithmetic. CPUs differ: with AMX or AVX512-BF16 a bf16 GEMM runs several times faster than fp32;
without them bf16 is several times slower. ``fastest_cpu_dtype`` measures both once per process
and ``resolve_dtype`` turns a ``--dtype`` choice (``auto``, ``float32``, ``bfloat16``) into the
dtype of autocast (``None`` for plain fp32).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import time
from typing import Optional

import torch

DTYPES = ("auto", "float32", "bfloat16")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def keep_freed_memory() -> bool:
    """Keep freed memory in the process (glibc only; elsewhere a no-op). Returns whether it took.

    ``M_MMAP_MAX = 0``: big blocks come from the heap rather than from their own mappings, which
    free() would unmap. ``M_TRIM_THRESHOLD = -1`` (the largest size): the heap's free top is never
    given back. Peak memory is unchanged; the process just keeps what it once needed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 8192  # compiled shapes kept (the default is 1024)


def configure_process() -> None:
    """What every command does first: keep freed memory (``keep_freed_memory``) and widen
    oneDNN's cache of compiled kernels (unless ``$ONEDNN_PRIMITIVE_CACHE_CAPACITY`` says otherwise;
    oneDNN reads it when it compiles its first kernel, so this must come before any bf16 work)."""
    keep_freed_memory()
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(ONEDNN_CACHE_CAPACITY))


def _matmul_seconds(dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up: kernel selection, packing buffers
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def cpu_matmul_speeds(n: int = 512, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an n x n x n matmul in fp32 and bf16 on this CPU (best of ``repeats``)."""
    flops = 2 * n ** 3
    return {name: flops / _matmul_seconds(dt, n, repeats) / 1e9
            for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}


# bf16 must beat fp32 by this factor to be chosen: it rounds more, so a tie goes to fp32.
BF16_MARGIN = 1.5


# Pins what ``auto`` means on the CPU (float32 or bfloat16) without measuring: for machines that
# must agree (a test suite, runs to compare across hosts).
AUTO_DTYPE_ENV = "DEEPSEEK_MOE_CPU_DTYPE"


@functools.cache
def fastest_cpu_dtype() -> torch.dtype:
    """bf16 where this CPU multiplies it at least ``BF16_MARGIN`` times faster than fp32, else fp32
    (``$DEEPSEEK_MOE_CPU_DTYPE`` overrides the measurement)."""
    pinned = os.environ.get(AUTO_DTYPE_ENV)
    if pinned:
        if pinned not in ("float32", "bfloat16"):
            raise ValueError(f"${AUTO_DTYPE_ENV} must be float32 or bfloat16, got {pinned!r}")
        return getattr(torch, pinned)
    speeds = cpu_matmul_speeds()
    return torch.bfloat16 if speeds["bfloat16"] >= BF16_MARGIN * speeds["float32"] else torch.float32


def resolve_dtype(choice: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``--dtype choice`` on ``device``; None means plain fp32.

    ``auto``: on the CPU the measured faster one (``fastest_cpu_dtype``); on a GPU bf16 where it
    is supported.
    """
    if choice not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {choice!r}")
    if choice == "auto":
        if device.type == "cpu":
            dt = fastest_cpu_dtype()
        elif device.type == "cuda":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        else:
            dt = torch.float32
        return None if dt == torch.float32 else dt
    return None if choice == "float32" else torch.bfloat16


def autocast(dtype: Optional[torch.dtype], device: torch.device):
    """The autocast context for a ``resolve_dtype`` result (disabled for None)."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def machine(device: Optional[torch.device] = None) -> dict[str, object]:
    """Where a result was computed: torch's version, the processor (or GPU) and the threads.
    Losses of the same run differ in their last digits between processors (their kernels sum in
    different orders), so results kept for comparison say where they came from."""
    info: dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if device is not None and device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        return info
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info["device"] = cpu
    return info


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model, fullgraph=True)`` with every MoE layer's experts on the
    ``grouped_mm`` backend: no host synchronisation anywhere, so no graph break. Parameters are
    shared with ``model`` (train and save ``model`` itself)."""
    from .moe.experts import GroupedExperts

    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.backend = "grouped_mm"
    return torch.compile(model, fullgraph=True)
