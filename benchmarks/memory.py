"""Memory measurement helpers shared by the benchmark scripts."""

from __future__ import annotations


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``). Call it before reading the
    resident size at the start of a step: pages a previous step freed but the allocator kept would
    otherwise be reused silently and hide this step's peak."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
