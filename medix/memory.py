"""Process memory: keep the peak RSS of a CPU run close to what its tensors need."""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value


def return_freed_memory_to_the_os() -> bool:
    """Fix glibc malloc's mmap threshold at its default 128 KiB, so that every larger allocation (activations,
    gradients, logits) is its own mapping and goes back to the OS when freed. By default glibc raises the threshold
    (up to 32 MiB) each time such a block is freed, after which these blocks come from the heap and stay resident:
    on the default run the update's activations then stay in RSS into validation (measured: peak 3.58 GB without,
    2.31 GB with, for the same rollout and update). Returns whether it took effect (False off glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
