"""Fresh memory for large messages and values, in transparent huge pages.

Memory this large usually comes fresh from the kernel, and faulting it in 4 KiB pages costs more
than the copy itself: on a 2-core VM a 64 MiB copy into a `bytearray` took about 48 ms, into a
private anonymous mapping advised to use 2 MiB pages about 12 ms (`benchmarks/codec.py`). So
large buffers are such mappings, and a large message is built as an uninitialised `bytes`
object (`PyBytes_FromStringAndSize(NULL, n)`, the C API's way to build one in place) whose pages
are advised to be huge before anything touches them; callers still get plain `bytes`. Where
the process may not map memory or call native code (the call raises), the plain path is used.

Copies of 16 MiB and more are split across threads (`copy_into`).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from typing import Any

import numpy as np

__all__ = ["BUFFER_ALIGNMENT", "address", "aligned_buffer", "fresh_buffer", "joined_bytes", "owned_copy"]

HUGEPAGE_MIN_BYTES = 4 * 2**20
"""Buffers and messages from this size on use huge pages."""
BUFFER_ALIGNMENT = 64
"""Tensor and array bytes start at multiples of this in a message's buffer section."""


def address(view: memoryview) -> int:
    """Where the view's first byte is in memory (to check alignment); -1 for read-only memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if not view.readonly else -1


def fresh_buffer(size: int) -> bytearray | mmap.mmap:
    """Writable zeroed memory for ``size`` bytes, in transparent huge pages when it is large."""
    if size < HUGEPAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return bytearray(size)
    try:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return bytearray(size)
    with contextlib.suppress(OSError):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


def aligned_buffer(size: int, offset: int) -> memoryview:
    """``size`` bytes of fresh writable memory placed so that byte ``offset`` sits on a
    `BUFFER_ALIGNMENT` boundary (for receiving a message whose buffer section starts there)."""
    buffer = fresh_buffer(size + BUFFER_ALIGNMENT)
    view = memoryview(buffer)
    pad = -(address(view) + offset) % BUFFER_ALIGNMENT
    return view[pad : pad + size]


def owned_copy(view: memoryview) -> bytearray | mmap.mmap:
    """Copy ``view`` into fresh writable memory that nothing else references (huge pages from 4 MiB on).

    ``torch.frombuffer`` and ``np.frombuffer`` keep the buffer alive for as long as the tensor
    or array that wraps it; such tensors cannot be resized in place (``resize_``).
    """
    if view.nbytes < HUGEPAGE_MIN_BYTES:
        return bytearray(view)
    buffer = fresh_buffer(view.nbytes)
    with memoryview(buffer) as target:
        copy_into(target, view)
    return buffer


def joined_bytes(parts: list[bytes | memoryview]) -> bytes:
    """``b"".join(parts)``, built in place in huge pages when the message is large (see the module docstring)."""
    size = sum(memoryview(part).nbytes for part in parts)
    if size < HUGEPAGE_MIN_BYTES:
        return b"".join(parts)
    native = _native_bytes()
    if native is None:
        return b"".join(parts)
    new_bytes, madvise = native
    try:
        data = new_bytes(None, size)
        start = int(np.frombuffer(data, dtype=np.uint8).ctypes.data)
        first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        last = (start + size) // _HUGE_PAGE * _HUGE_PAGE
        if last > first and _MADV_HUGEPAGE is not None:
            madvise(first, last - first, _MADV_HUGEPAGE)  # only advice: a failure changes nothing
        target = memoryview((ctypes.c_ubyte * size).from_address(start)).cast("B")
    except (OSError, RuntimeError):  # native calls refused here: join as usual from now on
        global _native_bytes_calls
        _native_bytes_calls = False
        return b"".join(parts)
    with target:
        position = 0
        for part in parts:
            with memoryview(part) as piece, piece.cast("B") as flat:
                copy_into(target[position : position + flat.nbytes], flat)
                position += flat.nbytes
    return data


_HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
_native_bytes_calls: Any = None
"""``(PyBytes_FromStringAndSize, madvise)`` as ctypes functions, or False where they cannot be used."""


def _native_bytes() -> Any:
    global _native_bytes_calls
    if _native_bytes_calls is None:
        try:
            new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
            new_bytes.restype = ctypes.py_object
            new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
            madvise = ctypes.CDLL(None, use_errno=True).madvise
            madvise.restype = ctypes.c_int
            madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (AttributeError, OSError, RuntimeError):
            _native_bytes_calls = False
        else:
            _native_bytes_calls = (new_bytes, madvise)
    return _native_bytes_calls or None


_SPLIT_COPY_MIN_BYTES = 16 * 2**20
_SPLIT_COPY_PIECE_BYTES = 8 * 2**20
_copy_threads: Any = None
"""Threads that copy the other pieces of a large copy: an executor, or False where this process
may not start threads."""


def copy_into(target: memoryview, source: memoryview) -> None:
    """``target[:] = source``; a copy of 16 MiB or more is split across the CPUs this process may use.

    Copying into fresh memory is bound by page faults, which the kernel serves on several cores
    at once; NumPy releases the GIL while it copies. Measured on 2 idle cores, alternating in one
    process (best GB/s of four runs): encoding 64 MiB 9.4 split against 7.1 on one thread,
    decoding 9.7 against 7.4; at 256 MiB 7.1 against 4.4 and 10.7 against 5.1. When other
    processes keep the cores busy the helpers gain nothing, and cost about as little.
    """
    size = source.nbytes
    helpers = 0
    if size >= _SPLIT_COPY_MIN_BYTES:
        helpers = min(_usable_cpus() - 1, 3, size // _SPLIT_COPY_PIECE_BYTES - 1)
    pool = _copy_pool() if helpers > 0 else None
    if pool is None:
        target[:] = source
        return
    dst = np.frombuffer(target, dtype=np.uint8)
    src = np.frombuffer(source, dtype=np.uint8)
    step = -(-size // (helpers + 1))
    step += -step % 4096  # pieces start on page boundaries
    futures = []
    try:
        for start in range(step, size, step):
            futures.append(pool.submit(np.copyto, dst[start : start + step], src[start : start + step]))
    except (OSError, RuntimeError):
        pass  # the pieces not handed over are copied below
    done = step * (len(futures) + 1)
    np.copyto(dst[:step], src[:step])
    if done < size:
        np.copyto(dst[done:], src[done:])
    for future in futures:
        future.result()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _copy_pool() -> Any:
    global _copy_threads
    if _copy_threads is None:
        from concurrent.futures import ThreadPoolExecutor

        pool: Any = ThreadPoolExecutor(max_workers=3, thread_name_prefix="nnsj-copy")
        try:
            pool.submit(int).result()  # starting a thread can be refused
        except (OSError, RuntimeError):
            pool.shutdown(wait=False)
            pool = False
        _copy_threads = pool
    return _copy_threads or None
