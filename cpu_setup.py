"""What the commands set up for the CPU: `configure()`, called from their main(), never on import.

On a CPU device, and never over a setting the user made:
threads   Paddle's CPU kernels use one thread unless told: --threads, else the user's OMP_NUM_THREADS,
          else every core this process may run on, shared among the launcher's ranks on this machine.
MKL       The MKL in Paddle's wheel takes a generic SSE path on AMD; MKL_DEBUG_CPU_TYPE=5 selects its
          AVX2 code, about twice as fast on AMD EPYC (on Intel it would turn AVX-512 off); rounding only.
memory    glibc returns large freed blocks to the system, so each temporary is page-faulted and zeroed
          anew; raised mmap and trim thresholds keep them: a B1 step 1.3x faster, ~6% more peak memory.
"""
import ctypes
import os
import platform
from dataclasses import dataclass
from typing import Dict, Optional

import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it
import paddle

AMD_MKL_VARIABLE, AMD_MKL_VALUE = 'MKL_DEBUG_CPU_TYPE', '5'
THREADS_VARIABLE = 'OMP_NUM_THREADS'
# More threads than this fail to start on ordinary machines (OpenMP aborts the process), and
# more threads than cores never help.
MAX_THREADS = 1024
LAUNCHER_VARIABLE = 'PADDLE_LOCAL_SIZE'   # set by paddle.distributed.launch in the ranks it starts
# mallopt parameters (malloc.h); blocks up to 1 GiB come from the heap and stay there when freed.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_LIMIT = 1 << 30
USER_MALLOC_SETTINGS = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'GLIBC_TUNABLES')


class ThreadSettingError(ValueError):
    """OMP_NUM_THREADS holds something no thread count can be."""


@dataclass
class CpuSettings:
    """What configure() set: None where it left Paddle as it was (on GPU)."""
    threads: Optional[int] = None
    amd_mkl_path: bool = False
    freed_memory_kept: bool = False


settings = CpuSettings()


def is_amd_x86(cpuinfo_path: str = '/proc/cpuinfo') -> bool:
    """True on an AMD x86-64 processor: the vendor AuthenticAMD in Linux's /proc/cpuinfo (x86 only)."""
    try:
        with open(cpuinfo_path, encoding='ascii', errors='replace') as cpuinfo:
            return any(line.startswith('vendor_id') and 'AuthenticAMD' in line for line in cpuinfo)
    except OSError:
        return False


def on_cpu() -> bool:
    return paddle.get_device() == 'cpu'


def start_environment(pid='self') -> Dict[str, str]:
    """The environment process pid was started with (Linux), else this process's environment now."""
    try:
        with open(f'/proc/{pid}/environ', 'rb') as file:
            entries = file.read().split(b'\0')
    except OSError:
        return dict(os.environ)
    return dict(entry.decode('utf-8', 'replace').split('=', 1) for entry in entries if b'=' in entry)


def user_threads() -> Optional[int]:
    """The OMP_NUM_THREADS the user set for this process, or None; ThreadSettingError if no count."""
    # Importing Paddle sets OMP_NUM_THREADS to '1' when unset, so the user's setting is read from the
    # start environment (/proc/self/environ; a launcher rank reads the launcher's).
    environment = start_environment()
    if LAUNCHER_VARIABLE in environment:
        environment = start_environment(os.getppid())
    value = environment.get(THREADS_VARIABLE)
    if value is None or not value.strip():
        return None
    if not value.strip().isdigit() or not 1 <= int(value) <= MAX_THREADS:
        raise ThreadSettingError(f'{THREADS_VARIABLE}={value[:40]!r} in the environment: expected '
                                 f'a thread count in [1, {MAX_THREADS}]')
    return int(value)


def available_cores() -> int:
    """Cores this process may run on, shared among the launcher's ranks on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    local_ranks = os.environ.get(LAUNCHER_VARIABLE, '1')
    return max(1, cores // max(1, int(local_ranks) if local_ranks.isdigit() else 1))


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False where not glibc or the user tuned it."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc' or any(
            name in os.environ for name in USER_MALLOC_SETTINGS):
        return False
    libc = ctypes.CDLL('libc.so.6')
    return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_LIMIT) and libc.mallopt(M_TRIM_THRESHOLD, HEAP_LIMIT))


class DeviceError(ValueError):
    """A --device this Paddle cannot run on."""


def configure(threads: Optional[int] = None, device: Optional[str] = None) -> CpuSettings:
    """Select `device` if given (else DeviceError); on a CPU set what the module doc says."""
    if device is not None:
        if device.startswith('gpu') and not paddle.device.is_compiled_with_cuda():
            raise DeviceError(f'--device {device}: this Paddle {paddle.__version__} was built without '
                              'CUDA; install paddlepaddle-gpu (pip install -r requirements-gpu.txt)')
        try:
            paddle.set_device(device)
        except (ValueError, RuntimeError) as error:   # no such GPU on this machine
            raise DeviceError(f'--device {device}: {" ".join(str(error).split())[:200]}') from None
    if not on_cpu():
        return settings
    settings.threads = threads or user_threads() or available_cores()
    paddle.base.core.set_num_threads(settings.threads)
    if is_amd_x86() and AMD_MKL_VARIABLE not in os.environ:   # read at MKL's first use, after this
        os.environ[AMD_MKL_VARIABLE] = AMD_MKL_VALUE
        settings.amd_mkl_path = True
    settings.freed_memory_kept = keep_freed_memory()
    return settings


def current_threads() -> int:
    """The compute threads in use: what configure() set, else Paddle's default of one."""
    return settings.threads or 1


def default_num_workers() -> int:
    """DataLoader processes per rank: the official 10 on GPU (at most one per core), else cores / 4."""
    # On CPU the compute threads already use every core.
    cores = available_cores()
    return min(10, cores) if not on_cpu() else max(1, cores // 4)
