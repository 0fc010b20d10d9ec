"""The process a user starts: importing the library changes nothing in it, and a command's
configure() sets threads, MKL's code path and the allocator as documented, honouring the user's
OMP_NUM_THREADS whatever was imported first. Each case runs in a fresh interpreter."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cpu_setup
from conftest import REPO_ROOT

USER_VARIABLES = ('OMP_NUM_THREADS', 'MKL_DEBUG_CPU_TYPE', 'PADDLE_LOCAL_SIZE', 'GLIBC_TUNABLES',
                  'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')
LIBRARY = ('cycle_fc', 'fast_layers', 'cyclemlp', 'zoo', 'download', 'weights', 'data', 'augment', 'export')


def run_python(code, cores=None, **variables):
    """Run code in a new interpreter with none of the user's settings but `variables`, on
    `cores` (default: all this process may use); returns its last stdout line parsed as JSON."""
    env = {key: value for key, value in os.environ.items() if key not in USER_VARIABLES}
    env.update(variables)
    preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=env, preexec_fn=preexec,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# A host program: it imports Paddle, records what the process looks like, imports a library
# module, and looks again. set_num_threads and mallopt are the calls that change Paddle's threads
# and glibc's allocator; both are recorded. The allocator is also checked by what it does: 256
# MiB allocated and freed go back to the system.
HOST = '''
import ctypes, importlib, json, logging, os, signal, sys, warnings
import numpy as np
import paddle
calls = []
paddle.base.core.set_num_threads = lambda n: calls.append(('set_num_threads', n))
real_cdll = ctypes.CDLL
ctypes.CDLL = lambda *args, **kwargs: calls.append(('CDLL', args)) or real_cdll(*args, **kwargs)

def rss_mib():
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') >> 20

def freed_memory_returned():
    start = rss_mib()
    block = np.ones(1 << 25)
    del block
    return rss_mib() - start < 64

def state():
    handlers = [(name, repr(handler), getattr(handler, 'stream', None) in (None, sys.stderr, sys.stdout))
                for name, logger in logging.Logger.manager.loggerDict.items()
                for handler in getattr(logger, 'handlers', [])]
    return dict(environ=dict(os.environ), filters=[str(f) for f in warnings.filters],
                freed_memory_returned=freed_memory_returned(), handlers=handlers,
                signals=[str(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)],
                streams=[id(sys.stdout), id(sys.stderr)])

before = state()
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(dict(before=before, after=state(), calls=calls,
                      imported=[name for name in sys.argv[1:] if name in sys.modules])))
'''


@pytest.mark.parametrize('threads', [None, '1', '2'], ids=['unset', 'OMP=1', 'OMP=2'])
def test_importing_the_library_changes_nothing_in_the_process(tmp_path, threads):
    script = tmp_path / 'host.py'
    script.write_text(HOST)
    env = {key: value for key, value in os.environ.items() if key not in USER_VARIABLES}
    if threads:
        env['OMP_NUM_THREADS'] = threads
    result = subprocess.run([sys.executable, str(script), *LIBRARY], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120, env={**env, 'PYTHONPATH': str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['calls'] == []
    assert report['imported'] == list(LIBRARY)
    assert report['after'] == report['before'] and report['before']['freed_memory_returned']


def test_importing_the_commands_support_first_keeps_paddles_loggers_on_stderr():
    """export imports cli, which imports Paddle with its notices filtered: the log handlers Paddle
    makes during that import must write to the real stderr afterwards."""
    code = ('import json, logging, sys, export, paddle; print(json.dumps([h.stream in (sys.stderr, sys.stdout) '
            'for logger in logging.Logger.manager.loggerDict.values() for h in getattr(logger, "handlers", []) '
            'if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]))')
    streams = run_python(code)
    assert streams and all(streams)


CONFIGURE = ('import json, os, cpu_setup; s = cpu_setup.configure(); '
             'print(json.dumps([s.threads, os.environ.get("MKL_DEBUG_CPU_TYPE"), s.freed_memory_kept]))')


def test_configure_uses_every_core_unless_the_user_chose():
    cores = len(os.sched_getaffinity(0))
    amd = '5' if cpu_setup.is_amd_x86() else None
    assert run_python(CONFIGURE) == [cores, amd, True]
    assert run_python(CONFIGURE, cores={min(os.sched_getaffinity(0))})[0] == 1
    # The user's thread count, the value they gave MKL and their own allocator tuning stand.
    assert run_python(CONFIGURE, OMP_NUM_THREADS='3', MKL_DEBUG_CPU_TYPE='3',
                      GLIBC_TUNABLES='glibc.malloc.check=0') == [3, '3', False]


@pytest.mark.parametrize('first', ['paddle', 'cpu_setup'])
def test_a_users_one_thread_is_honoured_whatever_was_imported_first(first):
    """Importing Paddle sets OMP_NUM_THREADS to 1 when it is unset, so a '1' after that import
    could be Paddle's or the user's; the start environment tells them apart (unset: every core,
    above)."""
    assert run_python(f'import {first}; ' + CONFIGURE, OMP_NUM_THREADS='1')[0] == 1


def test_the_launchers_ranks_read_the_launchers_start_environment(monkeypatch):
    """A rank of paddle.distributed.launch inherits OMP_NUM_THREADS=1 from the launcher's own
    Paddle import; what the user set is in the launcher's start environment."""
    environments = {'self': {'OMP_NUM_THREADS': '1', 'PADDLE_LOCAL_SIZE': '2'}, os.getppid(): {}}
    monkeypatch.setattr(cpu_setup, 'start_environment', lambda pid='self': environments[pid])
    assert cpu_setup.user_threads() is None
    environments[os.getppid()] = {'OMP_NUM_THREADS': '1'}
    assert cpu_setup.user_threads() == 1
    environments['self'] = {'OMP_NUM_THREADS': '4'}        # no launcher: the process's own
    assert cpu_setup.user_threads() == 4


@pytest.mark.parametrize('value', ['abc', '0', '-2', '99999', '2.5'])
def test_an_unusable_thread_setting_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setattr(cpu_setup, 'start_environment', lambda pid='self': {'OMP_NUM_THREADS': value})
    with pytest.raises(cpu_setup.ThreadSettingError, match=f"OMP_NUM_THREADS='{value}' in the environment: "
                                                           r'expected a thread count in \[1, 1024\]'):
        cpu_setup.user_threads()


def test_amd_detection_reads_the_processor_vendor(tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763\n')
    assert cpu_setup.is_amd_x86(str(cpuinfo))
    cpuinfo.write_text('processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\n')
    assert not cpu_setup.is_amd_x86(str(cpuinfo))          # never on Intel: it turns AVX-512 off
    # An ARM processor names no vendor_id (and no file: not Linux).
    cpuinfo.write_text('processor\t: 0\nCPU implementer\t: 0x41\nCPU architecture: 8\n')
    assert not cpu_setup.is_amd_x86(str(cpuinfo))
    assert not cpu_setup.is_amd_x86(str(tmp_path / 'missing'))


STEP = '''
import json, numpy as np, paddle, cpu_setup, cyclemlp
cpu_setup.configure()
paddle.seed(0)
model = cyclemlp.CycleNet([1, 1, 1, 1], [48, 96, 160, 256], [4, 4, 4, 4], num_classes=10)
images = paddle.to_tensor(np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype('float32'))
logits = model(images)
optimizer = paddle.optimizer.AdamW(parameters=model.parameters(), learning_rate=1e-3)
paddle.nn.functional.cross_entropy(logits, paddle.arange(4)).backward()
optimizer.step()
print(json.dumps([logits.numpy().ravel().tolist(), model.head.weight.numpy().ravel().tolist(),
                  model.network[0][0].attn.sfc_h.weight.numpy().ravel().tolist()]))
'''


def test_mkl_code_path_changes_rounding_only():
    """MKL's AVX2 path (what configure picks on AMD), its generic path (what MKL picks on AMD by
    itself) and its own choice here give the same logits and training step to float rounding."""
    runs = [run_python(STEP, **variables) for variables in
            ({}, {'MKL_DEBUG_CPU_TYPE': '5'}, {'MKL_DEBUG_CPU_TYPE': '2'})]
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('on_cpu, cores, expected', [(True, 2, 1), (True, 16, 4), (True, 64, 16),
                                                     (False, 4, 4), (False, 64, 10)])
def test_loader_workers_leave_the_cores_to_compute_on_cpu(monkeypatch, on_cpu, cores, expected):
    monkeypatch.setattr(cpu_setup, 'on_cpu', lambda: on_cpu)
    monkeypatch.setattr(cpu_setup, 'available_cores', lambda: cores)
    assert cpu_setup.default_num_workers() == expected
