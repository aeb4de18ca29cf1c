"""glibc's malloc set up for PyTorch on CPU: a batch's activations reuse memory, not fresh pages.

By default glibc serves large allocations with fresh ``mmap`` pages (above a threshold that it
moves with the allocation history, up to 32 MiB) and hands freed heap tops back to the kernel. A
ResNet batch allocates tens of MiB per layer, so each batch can pay its page faults again, and the
speed of the same pass swings with whatever the process allocated before: prediction and full
fine-tuning ran markedly slower after some reads than after others (benchmarks/inference.py,
benchmarks/full_finetune.py measure it). Keeping freed memory in the
heap makes both steady and fast. The price is that a process keeps its peak memory until it
exits, which suits a run worker; the webserver and daemon never call this.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # allocations below this come from the heap; heap tops below it are kept

_tuned = False


def keep_freed_memory_for_reuse() -> bool:
    """Tune glibc's malloc as above, once per process; False where there is no glibc to tune."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _tuned = bool(
            libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)
            and libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
        )
    except (OSError, AttributeError):  # musl (Alpine) and other C libraries have no mallopt
        return False
    return _tuned
