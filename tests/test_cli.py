"""What every command shares (cli.py), as real processes: SIGTERM mid-work is one line on stderr,
exit code 143, nothing half-written left and no worker process left behind, and only results on
stdout; the user's environment (OMP_NUM_THREADS) never adds lines to an error."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, tiny_state, write_image, write_image_folder
from weights import WeightsError, write_weights


def command(script, *args):
    return [sys.executable, str(REPO_ROOT / script), *map(str, args)]


def environment(**variables):
    env = {key: value for key, value in os.environ.items() if key != 'OMP_NUM_THREADS'}
    return {**env, 'OMP_NUM_THREADS': '1', **variables}


def processes_mentioning(marker: str) -> list:
    """Pids of live processes whose command line holds marker (DataLoader workers are forks of
    their command, with its command line)."""
    found = []
    for entry in Path('/proc').iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / 'cmdline').read_bytes().decode(errors='replace') \
                    and (entry / 'stat').read_text().split(') ')[-1][0] != 'Z':
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_sigterm_mid_work_is_one_line_and_leaves_nothing(tmp_path):
    weights = str(tmp_path / 'tiny.pdparams')
    write_weights(weights, tiny_state(0), {'class_names': ['cat', 'dog', 'fox']})
    images = tmp_path / 'images'
    for index in range(400):
        write_image(images / f'{index:03}.png', 40, 30, index)
    data = write_image_folder(tmp_path / 'data', ('cat', 'dog', 'fox'), train_per_class=1, val_per_class=150)
    started = {
        'predict': subprocess.Popen(command('predict.py', images, '--weights', weights, '--input-size', 32,
                                            '--batch-size', 1, '--json'),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(), text=True),
        'evaluate': subprocess.Popen(command('evaluate.py', '--weights', weights, '--data-path', data,
                                             '--input-size', 32, '--batch-size', 2, '--num-workers', 1,
                                             '--print-freq', 1),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(), text=True),
        'export': subprocess.Popen(command('export.py', '--weights', weights, '--output', tmp_path / 'exported',
                                           '--input-size', 32, '--onnx'),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(), text=True),
    }
    first_lines = {name: process.stdout.readline() for name, process in started.items() if name != 'export'}
    first_lines['evaluate'] += started['evaluate'].stdout.readline()     # its first step: the loop runs
    assert len(processes_mentioning(data)) == 2                           # the command and its worker
    deadline = time.time() + 60       # the export is mid-work once its temporary folder is there
    while not list(tmp_path.glob('exported/.export.*.tmp')) and time.time() < deadline:
        time.sleep(0.01)
    for process in started.values():
        process.send_signal(signal.SIGTERM)
    results = {name: process.communicate(timeout=60) for name, process in started.items()}
    for name, process in started.items():
        stdout, stderr = results[name]
        assert process.returncode == 128 + signal.SIGTERM, (name, stderr)
        assert stderr == 'interrupted\n', (name, stderr)
    predicted = [json.loads(line) for line in (first_lines['predict'] + results['predict'][0]).splitlines()]
    assert 1 <= len(predicted) < 400 and all('predictions' in record for record in predicted)
    header, *progress = (first_lines['evaluate'] + results['evaluate'][0]).splitlines()
    assert header.startswith(f'{weights}: 450 images') and 1 <= len(progress) < 225
    assert all(line.startswith('Test: [') for line in progress)
    assert results['export'][0] == '' and sorted(os.listdir(tmp_path)) == ['data', 'images', 'tiny.pdparams']
    time.sleep(0.5)
    assert processes_mentioning(data) == []            # the evaluation's loader worker ended too


@pytest.mark.parametrize('threads', ['2'])
def test_an_error_is_one_line_whatever_omp_num_threads_is(tmp_path, threads):
    missing = tmp_path / 'missing.pdparams'
    result = subprocess.run(command('predict.py', tmp_path, '--weights', missing), capture_output=True, text=True,
                            env=environment(OMP_NUM_THREADS=threads), timeout=120)
    assert result.returncode == 1 and result.stdout == ''
    assert result.stderr.startswith(f'error: {missing}: no such file') and result.stderr.count('\n') == 1


def test_unusable_thread_counts_are_one_line(tmp_path):
    weights = str(tmp_path / 'tiny.pdparams')
    write_weights(weights, tiny_state(0))
    result = subprocess.run(command('predict.py', tmp_path, '--weights', weights), capture_output=True, text=True,
                            env=environment(OMP_NUM_THREADS='99999'), timeout=120)
    assert (result.returncode, result.stdout) == (1, '')
    assert result.stderr == "error: OMP_NUM_THREADS='99999' in the environment: expected a thread count in [1, 1024]\n"
    result = subprocess.run(command('predict.py', tmp_path, '--weights', weights, '--threads', '99999'),
                            capture_output=True, text=True, env=environment(), timeout=120)
    assert result.returncode == 2 and 'argument --threads: expected a value in [1, 1024], got 99999' in result.stderr


@pytest.mark.parametrize('error, line', [
    (OSError(28, 'No space left on device'), 'error: [Errno 28] No space left on device'),
    (WeightsError('w.pdparams: not a weights file'), 'error: w.pdparams: not a weights file'),
    (TypeError('an adapter argument\nof the wrong type'),
     'error: unexpected TypeError (please report it): an adapter argument of the wrong type'),
    (OverflowError('timeout too large'), 'error: unexpected OverflowError (please report it): timeout too large'),
], ids=['OSError', 'WeightsError', 'TypeError', 'OverflowError'])
def test_every_error_of_a_command_is_one_line_and_exit_code_1(capsys, error, line):
    """cli.run is the one place where a command's exceptions end: expected or not, one line."""
    import cli

    def main(args):
        raise error
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.run(main, None)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == line + '\n'


def test_a_stop_inside_signals_deferred_waits_for_the_end_of_the_block():
    """Whichever thread the kernel hands the signal to (Paddle's compute threads too), the handler
    raises only once the block has run."""
    import cli
    previous = signal.signal(signal.SIGTERM, cli.request_stop)
    other_thread = threading.Thread(target=time.sleep, args=(2,), daemon=True)
    other_thread.start()
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with cli.signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)          # the signal has arrived by now
                finished.append(True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        cli.stop_requested.clear()
    assert finished == [True]


def test_a_second_stop_inside_signals_deferred_does_not_wait():
    """A user who presses Ctrl-C twice means it: the second signal raises inside the block."""
    import cli
    previous = signal.signal(signal.SIGINT, cli.request_stop)
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with cli.signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                reached.append('after the first')
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                reached.append('after the second')
    finally:
        signal.signal(signal.SIGINT, previous)
        cli.stop_requested.clear()
    assert reached == ['after the first']
