"""Keep freed memory for reuse instead of handing it back to the operating system after every batch.

glibc (the C library of most Linux systems) serves each allocation above 32 MB — one layer's activations for a
batch at 288 px — with fresh pages from the kernel and returns them when the tensor is freed, so every training
step and every batch of occluded images faults all its memory in again. On 2 CPU cores that kernel work took a
quarter of training's CPU time and more than half of `cxrfast interpret`'s; switching it off made training 1.4x
and interpretation 3.2x faster with identical results (docs/benchmarks.md, "Memory reuse"). The price: the process
keeps its peak memory until it exits, which suits a command that does one job.

The `cxrfast` command does this at start. From Python, call `keep_freed_memory()` once, before training. A process
that serves for days calls `give_back_freed_memory()` between jobs (`cxrfast serve`, after each upload): the reuse
within a job stays, and the peak of one huge image is not kept for good.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# "default" keeps the C library's own behaviour; keep_freed_memory sets "reuse", which worker processes inherit
SETTING_VARIABLE = "CXRFAST_MALLOC"


def keep_freed_memory() -> bool:
    """Tell glibc to serve large allocations from its heap and never shrink it; True if it took effect.

    Does nothing (and returns False) on other C libraries (macOS, Windows, musl) or when the environment variable
    CXRFAST_MALLOC is "default".
    """
    if os.environ.get(SETTING_VARIABLE, "").lower() == "default":
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # M_MMAP_MAX 0: no allocation gets pages of its own, so freed blocks stay in the heap for the next batch;
    # M_TRIM_THRESHOLD -1: the heap is never shrunk, so its top is not handed back and faulted in again
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, -1) != 1:
        return False
    os.environ[SETTING_VARIABLE] = "reuse"
    return True


def keep_freed_memory_as_parent_did() -> bool:
    """In a worker process (distributed training): reuse freed memory if the process that started it does."""
    return os.environ.get(SETTING_VARIABLE) == "reuse" and keep_freed_memory()


def give_back_freed_memory() -> bool:
    """Hand the free memory that `keep_freed_memory` keeps back to the system (glibc's malloc_trim); True if it ran.

    For a long-running process between two jobs: `cxrfast serve` after each upload, as four 64-megapixel uploads
    left it holding 1225 MiB for good instead of 774 (docs/benchmarks.md); about 3 ms a call. Does nothing where
    freed memory is not kept (other C libraries, CXRFAST_MALLOC=default, a script that never turned it on)."""
    trim = _libc_function("malloc_trim") if os.environ.get(SETTING_VARIABLE) == "reuse" else None
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


@functools.cache
def _libc_function(name: str):
    """glibc's `name`, or None on other C libraries (macOS, Windows, musl lack mallopt and malloc_trim)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
