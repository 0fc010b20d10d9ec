"""Make Paddle use the whole CPU. Imported before Paddle by every script and by cyclemlp.py.

Three settings, each made only on a CPU device and never over one the user made:

threads   Paddle's CPU kernels use one thread unless OMP_NUM_THREADS is set (PyTorch uses
          every core by default). Use every core this process may run on
          (os.sched_getaffinity), shared among the ranks `paddle.distributed.launch` starts on
          this machine; `set_threads(n)` is what the scripts' --threads flag calls.
MKL       The MKL in Paddle's CPU wheel picks its code path by processor vendor and takes a
          generic SSE path on AMD processors. MKL_DEBUG_CPU_TYPE=5 selects its AVX2 code,
          about twice as fast on AMD EPYC. It must be set before MKL is first used, so this
          module is imported first; it is set on AMD x86-64 only (on Intel it would turn
          AVX-512 off). It changes rounding only (tested).
memory    glibc serves a large allocation with a fresh mmap and returns it to the system on
          free. Paddle's CPU allocator frees every temporary, so each large op had its output
          page-faulted in and zeroed anew: most of a training step's time went to the kernel.
          Raising glibc's mmap and trim thresholds keeps freed memory for reuse: a B1
          training step 1.3x faster, for about 6% more peak resident memory.
"""
import ctypes
import os
import platform
import sys
import warnings
from typing import Optional

AMD_MKL_VARIABLE, AMD_MKL_VALUE = 'MKL_DEBUG_CPU_TYPE', '5'
# mallopt parameters (malloc.h); blocks up to 1 GiB come from the heap and stay there when freed.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_LIMIT = 1 << 30
USER_MALLOC_SETTINGS = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'GLIBC_TUNABLES')


def is_amd_x86(cpuinfo_path: str = '/proc/cpuinfo') -> bool:
    """True on an AMD x86-64 processor (Linux: /proc/cpuinfo; elsewhere: platform.processor())."""
    if platform.machine().lower() not in ('x86_64', 'amd64'):
        return False
    try:
        with open(cpuinfo_path, encoding='ascii', errors='replace') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('vendor_id'):
                    return line.split(':', 1)[1].strip() == 'AuthenticAMD'
    except OSError:
        pass
    return 'AuthenticAMD' in platform.processor()


def available_cores() -> int:
    """Cores this process may run on, shared among the launcher's ranks on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    local_ranks = os.environ.get('PADDLE_LOCAL_SIZE', '1')
    return max(1, cores // max(1, int(local_ranks) if local_ranks.isdigit() else 1))


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module doc); False where not glibc."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc' or any(
            name in os.environ for name in USER_MALLOC_SETTINGS):
        return False
    libc = ctypes.CDLL('libc.so.6')
    return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_LIMIT) and libc.mallopt(M_TRIM_THRESHOLD, HEAP_LIMIT))


# What the user asked for, read before Paddle's import sets OMP_NUM_THREADS to '1' when unset.
# A '1' seen after that import (or inherited from the launcher, which imported Paddle) is
# Paddle's default, not a choice.
_paddle_imported_first = 'paddle' in sys.modules or 'PADDLE_LOCAL_SIZE' in os.environ
_user_threads = os.environ.get('OMP_NUM_THREADS')
if _paddle_imported_first and _user_threads == '1':
    _user_threads = None
amd_mkl_path = is_amd_x86() and AMD_MKL_VARIABLE not in os.environ
if amd_mkl_path:
    os.environ[AMD_MKL_VARIABLE] = AMD_MKL_VALUE

warnings.filterwarnings('ignore', message='No ccache found')  # printed by Paddle 3 on import; irrelevant here
import paddle  # noqa: E402  (after the environment above)

on_cpu = paddle.get_device() == 'cpu'
freed_memory_kept = on_cpu and keep_freed_memory()
threads: Optional[int] = None   # the compute threads set here; None: left to OMP_NUM_THREADS


def current_threads() -> int:
    """The compute threads in use: set here, else the user's OMP_NUM_THREADS, else Paddle's 1."""
    if threads:
        return threads
    try:
        return max(1, int(os.environ.get('OMP_NUM_THREADS') or 1))
    except ValueError:
        return 1


def set_threads(count: Optional[int] = None) -> None:
    """Use `count` CPU threads for Paddle's kernels; None: OMP_NUM_THREADS if the user set it,
    else every available core. Does nothing on GPU."""
    global threads
    if not on_cpu or (count is None and _user_threads is not None):
        return
    threads = count or available_cores()
    paddle.base.core.set_num_threads(threads)


def default_num_workers() -> int:
    """DataLoader processes per rank: the official 10 on GPU (at most one per core); on CPU a
    quarter of the cores, at least 1, since the compute threads already use every core."""
    cores = available_cores()
    return min(10, cores) if not on_cpu else max(1, cores // 4)


set_threads()
