"""Process resources of a run: NumPy's BLAS threads, and the C heap (returning freed memory, one arena).

BLAS threads.
The solver's matrices are small to medium (up to a few thousand rows); OpenBLAS splits even
those across threads, and when the cores are busy with anything else its worker threads wait
for one another: a 179 x 179 Cholesky that takes 0.2 ms on one thread took 400 ms with two
threads on a loaded 2-core machine, and the solve of ResNet-50 took 5-27 s instead of 0.5-0.9 s.
So :func:`limit_blas_threads` runs the passes on ``UDFC_BLAS_THREADS`` threads (default 1;
0 leaves the BLAS as configured) and restores the previous count afterwards.

Only OpenBLAS (what NumPy's wheels ship) is controlled, found among the libraries this process
has loaded; with any other BLAS, or off Linux, this is a no-op.

Freed memory. glibc keeps most freed memory for reuse instead of giving it back: after the ORT
session of a 100 MB model was freed, the process still held 250 MB it no longer used, and the
next passes' peak stacked on top. :func:`release_memory` (``malloc_trim``) returns it at the
points where a large structure was just dropped; a no-op where there is no glibc.
:func:`share_one_malloc_arena` (taken by the command line) keeps every thread on one heap, so
that what one thread frees another can reuse.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import InvalidConfigError

__all__ = ["limit_blas_threads", "blas_thread_controls", "release_memory", "share_one_malloc_arena", "reuse_freed_memory",
           "narrow_heap_blocks", "no_numpy_hugepages",
           "worker_threads", "elementwise_in_threads",
           "THREADS_ENV", "peak_rss_mb", "DEFAULT_BLAS_THREADS"]

DEFAULT_BLAS_THREADS = 1
# Symbol prefixes of OpenBLAS builds: plain, 64-bit-integer, and the one NumPy's wheels bundle.
_PREFIXES = ("scipy_openblas", "openblas")
_SUFFIXES = ("64_", "")

_controls: tuple | None = None
_searched = False


def blas_thread_controls():
    """``(get, set)`` for the loaded OpenBLAS's thread count, or None when there is none to control."""
    global _controls, _searched
    if _searched:
        return _controls
    _searched = True
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in _PREFIXES:
            for suffix in _SUFFIXES:
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    set_.restype, set_.argtypes = None, [ctypes.c_int]
                    _controls = (get, set_)
                    return _controls
    return None


def _wanted_threads() -> int:
    text = os.environ.get("UDFC_BLAS_THREADS", "")
    try:
        return max(0, int(text)) if text.strip() else DEFAULT_BLAS_THREADS
    except ValueError:
        return DEFAULT_BLAS_THREADS


@contextlib.contextmanager
def limit_blas_threads(threads: int | None = None) -> Iterator[None]:
    """Run the body with at most ``threads`` BLAS threads (default: ``UDFC_BLAS_THREADS``, else 1; 0: unchanged)."""
    threads = _wanted_threads() if threads is None else threads
    controls = blas_thread_controls() if threads > 0 else None
    if controls is None:
        yield
        return
    get, set_ = controls
    before = get()
    if before <= threads:
        yield
        return
    set_(threads)
    try:
        yield
    finally:
        set_(before)


_libc_functions: dict[str, object] = {}
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def _libc_function(name: str, restype, argtypes):
    """A glibc function by name, or None where there is no such function (no glibc)."""
    if name not in _libc_functions:
        fn = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = getattr(libc, name, None)
            if fn is not None:
                fn.restype, fn.argtypes = restype, argtypes
        except OSError:
            fn = None
        _libc_functions[name] = fn
    return _libc_functions[name]


_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap once :func:`reuse_freed_memory` is set (glibc's own
#: limit moves between 128 kB and this, its largest).
HEAP_BLOCK_BYTES = 32 << 20
#: ... and :func:`narrow_heap_blocks` lowers it to this for the synthetic sampler.
SAMPLER_HEAP_BLOCK_BYTES = 8 << 20
#: Free memory at the top of the heap is given back by itself only above this (else by release_memory).
HEAP_TRIM_BYTES = 256 << 20
_heap_blocks: list[int] = []  # the block limit reuse_freed_memory set, if it did


def _mallopt(param: int, value: int) -> bool:
    """glibc ``mallopt(param, value)``; False where it failed or there is no glibc."""
    mallopt = _libc_function("mallopt", ctypes.c_int, [ctypes.c_int, ctypes.c_int])
    return mallopt is not None and bool(mallopt(param, value))


def release_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``).

    Not while the command line keeps freed blocks for reuse (:func:`reuse_freed_memory`, until the
    sampler narrows it): the next pass then takes them instead of new pages, and the peak stays
    the solve's (ResNet-50-size p30-w8a8: 83k page faults down to 56k, the same peak).
    No garbage collection: the large arrays and sessions are freed by reference counting, and a
    full collection costs 15-50 ms.
    """
    if _heap_blocks == [HEAP_BLOCK_BYTES]:
        return
    trim = _libc_function("malloc_trim", ctypes.c_int, [ctypes.c_size_t])
    if trim is not None:
        trim(0)


def share_one_malloc_arena() -> bool:
    """Make every thread of this process allocate from one heap (glibc ``M_ARENA_MAX=1``); False without glibc.

    glibc gives each new thread an arena of its own, and memory freed in one arena is not reused
    by another: with two threads solving ResNet-50's units (:mod:`udfc_onnx.compensate`) while the
    old weights were freed elsewhere, the run's peak was 340 MB instead of 262 MB with one arena,
    at the same speed (the threads allocate few, large blocks). glibc fixes the arena limit the
    first time a thread needs one, so this is a setting for the whole process, taken once by the
    command line at its start; code that imports the package keeps its own malloc settings.
    """
    return _mallopt(_M_ARENA_MAX, 1)


def reuse_freed_memory() -> bool:
    """Serve blocks up to 32 MB from the heap, and keep freed heap memory for reuse; False without glibc.

    The weights read at the load and the solve's weight-sized arrays (1-20 MB, by the hundred)
    were each a mapping of its own under glibc's default (above its moving threshold), unmapped
    when freed, and the heap's top was trimmed as soon as a little was free there: every new block
    of that size was new pages, zero-filled by the kernel on first touch. With blocks up to 32 MB
    on the heap and no automatic trim below 256 MB, freed blocks are reused, and
    :func:`release_memory` leaves them on the heap for the next pass.
    ResNet-50-size p30-w8a8, alternating with the default (``tools/ab_time.py``): 4-6 % less time
    at a 3-5 MB higher peak. The synthetic sampler lowers the limit (:func:`narrow_heap_blocks`).
    A setting of the whole process, taken by the command line.
    """
    made = _mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES) and _mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_BYTES)
    if made:
        _heap_blocks[:] = [HEAP_BLOCK_BYTES]
    return made


def narrow_heap_blocks() -> bool:
    """Where :func:`reuse_freed_memory` is in force, give blocks above 8 MB their own mappings again.

    For the synthetic sampler: its many ORT sessions and activation batches of 8-32 MB, kept on
    the heap, fragmented it and raised the peak of resnet56_nm p50-w4a8 from 1.8 to 2.1 GB; with
    8 MB the peak is lower than with glibc's default. Returns whether the limit was lowered.
    """
    if not _heap_blocks or _heap_blocks[0] <= SAMPLER_HEAP_BLOCK_BYTES:
        return False
    if not _mallopt(_M_MMAP_THRESHOLD, SAMPLER_HEAP_BLOCK_BYTES):
        return False
    _heap_blocks[:] = [SAMPLER_HEAP_BLOCK_BYTES]
    return True


def no_numpy_hugepages() -> bool:
    """Stop NumPy asking the kernel for 2 MB pages for its large arrays; False where it cannot.

    NumPy madvises every array of 4 MB and more for transparent huge pages. Where the kernel's THP
    defrag mode compacts memory for such requests before the page fault returns (``madvise``, as
    here, or ``always``), a run that allocates and frees many weight-sized arrays stalls in the
    kernel: the ResNet-50-size p30-w8a8 run took 1.34 s with them and 1.08 s without (system time
    0.61 s against 0.38 s; medians of 8 interleaved runs), at the same peak memory. Like
    :func:`share_one_malloc_arena` it is a setting of the whole process, taken by the command line;
    code that imports the package keeps NumPy's default.
    """
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            setter = getattr(__import__(module, fromlist=["_set_madvise_hugepage"]), "_set_madvise_hugepage")
        except (ImportError, AttributeError):
            continue
        setter(False)
        return True
    return False


#: Environment variable: threads for the compressor's NumPy work (independent units, large
#: elementwise passes); default: the CPUs this process may use, at most 2; 1 runs it all in turn.
THREADS_ENV = "UDFC_THREADS"
_MAX_DEFAULT_THREADS = 2


def worker_threads() -> int:
    """Threads for NumPy work that releases the GIL: ``UDFC_THREADS``, else min(2, usable CPUs).

    Raises InvalidConfigError for a value that is not a whole number.
    """
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise InvalidConfigError(f"{THREADS_ENV} must be a whole number, got {value!r}") from None
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(_MAX_DEFAULT_THREADS, cpus))


def elementwise_in_threads(fn, *arrays, min_size: int = 1 << 14):
    """``fn(*arrays)`` for an elementwise ``fn`` of equal-length 1-D arrays, in slices on
    :func:`worker_threads` threads (NumPy's ufuncs release the GIL). Each element is computed as
    in one call, so the result is the same bit for bit; below ``min_size`` elements, one call."""
    n = len(arrays[0])
    threads = min(worker_threads(), max(1, n // min_size))
    if threads == 1:
        return fn(*arrays)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="udfc-elementwise") as pool:
        parts = list(pool.map(lambda i: fn(*(a[bounds[i]:bounds[i + 1]] for a in arrays)), range(threads)))
    return np.concatenate(parts)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far in MB (``VmHWM``), or None where /proc has no such line."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
