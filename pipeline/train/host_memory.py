"""A process's memory between its phases: its resident set as ``/proc`` reports it, and the C heap,
where glibc keeps the blocks a training step freed (its activations, hundreds of MB) for reuse, so
they stay in the resident set after the run that needed them. ``trim_heap`` gives them back once a
run is over; the next run's first steps take them again."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None on another C library (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Return the C heap's free memory to the system (``malloc_trim(0)``: free pages anywhere in the
    heap, not only at its top). A few milliseconds; a no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def memory_figures(status: str | None = None) -> dict[str, int]:
    """Peak resident set (VmHWM) and, now, the resident set (VmRSS) and its anonymous and file-backed
    (shared, e.g. the memory-mapped decode cache and the libraries) parts, in bytes; ``status``: another
    process's ``/proc/PID/status`` text (default this process's; Linux only)."""
    fields = {}
    for line in (status or Path("/proc/self/status").read_text()).splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields
