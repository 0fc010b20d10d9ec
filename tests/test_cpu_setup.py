"""cpu_setup.py: threads, MKL's code path and the allocator, as a process started by a user sees
them (each case in a fresh interpreter, since the settings are made on import)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cpu_setup
from conftest import REPO_ROOT

# As a library user meets it: `import cyclemlp` sets the CPU up before Paddle loads.
SETTINGS = ('import json, os, cyclemlp, cpu_setup; print(json.dumps([cpu_setup.threads, '
            'os.environ.get("MKL_DEBUG_CPU_TYPE"), cpu_setup.freed_memory_kept]))')
USER_VARIABLES = ('OMP_NUM_THREADS', 'MKL_DEBUG_CPU_TYPE', 'PADDLE_LOCAL_SIZE', 'GLIBC_TUNABLES',
                  'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')


def run_python(code, cores=None, **variables):
    """Run code in a new interpreter with none of the user's settings but `variables`, on
    `cores` (default: all this process may use); returns its stdout parsed as JSON."""
    env = {key: value for key, value in os.environ.items() if key not in USER_VARIABLES}
    env.update(variables)
    preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=env, preexec_fn=preexec,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_available_core_unless_the_user_chose():
    cores = len(os.sched_getaffinity(0))
    amd = '5' if cpu_setup.is_amd_x86() else None
    assert run_python(SETTINGS) == [cores, amd, True]
    assert run_python(SETTINGS, cores={min(os.sched_getaffinity(0))})[0] == 1
    # Under paddle.distributed.launch the ranks of this machine share its cores.
    assert run_python(SETTINGS, PADDLE_LOCAL_SIZE='2')[0] == max(1, cores // 2)
    # The user's thread count stands (None: left to OMP_NUM_THREADS), and so do the value they
    # gave MKL and their own allocator tuning.
    assert run_python(SETTINGS, OMP_NUM_THREADS='1', MKL_DEBUG_CPU_TYPE='3',
                      GLIBC_TUNABLES='glibc.malloc.check=0') == [None, '3', False]


def test_amd_detection_reads_the_processor_vendor(tmp_path, monkeypatch):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763\n')
    monkeypatch.setattr(cpu_setup.platform, 'machine', lambda: 'x86_64')
    assert cpu_setup.is_amd_x86(str(cpuinfo))
    cpuinfo.write_text('processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\n')
    assert not cpu_setup.is_amd_x86(str(cpuinfo))          # never on Intel: it turns AVX-512 off
    cpuinfo.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\n')
    monkeypatch.setattr(cpu_setup.platform, 'machine', lambda: 'aarch64')
    assert not cpu_setup.is_amd_x86(str(cpuinfo))


STEP = '''
import json, numpy as np, paddle, cyclemlp
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
    """MKL's AVX2 path (what cpu_setup picks on AMD), its generic path (what MKL picks on AMD by
    itself) and its own choice here give the same logits and training step to float rounding."""
    runs = [run_python(STEP, **variables) for variables in
            ({}, {'MKL_DEBUG_CPU_TYPE': '5'}, {'MKL_DEBUG_CPU_TYPE': '2'})]
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('on_cpu, cores, expected', [(True, 2, 1), (True, 16, 4), (True, 64, 16),
                                                     (False, 4, 4), (False, 64, 10)])
def test_loader_workers_leave_the_cores_to_compute_on_cpu(monkeypatch, on_cpu, cores, expected):
    monkeypatch.setattr(cpu_setup, 'on_cpu', on_cpu)
    monkeypatch.setattr(cpu_setup, 'available_cores', lambda: cores)
    assert cpu_setup.default_num_workers() == expected
