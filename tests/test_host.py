"""Host-process set-up: glibc huge pages for the command line, TensorFlow kept to feeding data."""

import os
import re
import subprocess
import sys

import pytest

from jaxprompt import host


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc tunables are Linux-only')
def test_huge_pages_env_respects_user_settings():
  env = host.huge_pages_env({'PATH': '/bin'})
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': host.HUGE_PAGES_TUNABLE}
  # The user's own tunables (or an earlier re-execution) win; the opt-out turns it off.
  assert host.huge_pages_env({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}) is None
  assert host.huge_pages_env({host.OPT_OUT: '1'}) is None


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc tunables are Linux-only')
def test_console_entry_reexecutes_once_and_keeps_exit_code_and_output(tmp_path):
  # `info` on a missing path fails with exit 2 and a one-line error; through the re-execution
  # the exit code and message survive, and the child sees the tunable.
  probe = ('import os, sys; from jaxprompt import cli; '
           'print(os.environ.get("GLIBC_TUNABLES")); sys.argv = ["jaxprompt", *sys.argv[1:]]; '
           'cli.entry()')
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', host.OPT_OUT)}
  missing = str(tmp_path / 'nothing')
  out = subprocess.run([sys.executable, '-c', probe, 'info', missing], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  # First line: the original process (unset); then the re-executed `-m jaxprompt.cli` prints
  # nothing of its own before failing with one line naming the path.
  assert out.stdout.splitlines()[0] == 'None'
  assert missing in out.stderr and out.stderr.strip().count('\n') == 0
  # With the opt-out, no re-execution: the same error from the same process.
  env[host.OPT_OUT] = '1'
  out2 = subprocess.run([sys.executable, '-c', probe, 'info', missing], env=env,
                        capture_output=True, text=True, timeout=300)
  assert out2.returncode == 2 and out2.stderr == out.stderr
  # The re-executed process runs `python -m module *argv` with the tunable set.
  (tmp_path / 'probe_env.py').write_text(
      'import os, sys; print(os.environ["GLIBC_TUNABLES"], *sys.argv[1:])')
  env.pop(host.OPT_OUT)
  env['PYTHONPATH'] = str(tmp_path) + os.pathsep + env.get('PYTHONPATH', '')
  out3 = subprocess.run(
      [sys.executable, '-c', 'from jaxprompt import host; '
       'host.reexec_with_huge_pages("probe_env", ["a b", "--c"]); print("not replaced")'],
      env=env, capture_output=True, text=True, timeout=60)
  assert out3.stdout.strip() == f'{host.HUGE_PAGES_TUNABLE} a b --c', out3.stderr


def test_import_quietly_mutes_native_noise_and_replays_it_on_failure(tmp_path, monkeypatch,
                                                                     capfd):
  # Writes straight to file descriptor 2, as native libraries do while they load.
  (tmp_path / 'noisy_ok.py').write_text("import os\nos.write(2, b'loader noise\\n')\n")
  (tmp_path / 'noisy_bad.py').write_text(
      "import os\nos.write(2, b'why it broke\\n')\nraise ImportError('broken')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  host.import_quietly('noisy_ok')
  assert 'noisy_ok' in sys.modules
  assert 'loader noise' not in capfd.readouterr().err
  with pytest.raises(ImportError, match='broken'):
    host.import_quietly('noisy_bad')
  assert 'why it broke' in capfd.readouterr().err
  os.write(2, b'stderr works again\n')
  assert 'stderr works again' in capfd.readouterr().err


@pytest.mark.slow  # the full tier (15 s on 2 cores): a subprocess
def test_the_data_layer_keeps_tensorflow_off_accelerators_and_quiet(tmp_path):
  # TensorFlow only feeds data: it must not take a GPU's memory beside jax, nor print its CUDA
  # probing ("failed call to cuInit", "could not find cuda drivers") into a user's own script.
  code = ('import jaxprompt.data, tensorflow as tf\n'
          'assert not tf.config.get_visible_devices("GPU")\n'
          'print(int(tf.constant(1) + 1))\n')
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        cwd=tmp_path, env=env, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == '2'
  noise = [line for line in done.stderr.splitlines()
           if re.search(r'cuInit|cuda|oneDNN|cudart', line)]
  assert not noise, noise
