"""jmoss's Jittor set-up: offline, quiet, CPU by default, nothing sticky, no gradient graphs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# Runs in a fresh interpreter: every socket connection fails (as on a machine without network),
# no GPU is visible, and HOME is a fresh folder so we can see what jittor would leave there.
PROBE = textwrap.dedent(
    """
    import socket, sys
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")
    socket.socket.connect = refuse
    socket.create_connection = refuse

    import jmoss
    assert "jittor" not in sys.modules, "import jmoss must not import jittor"
    from jmoss.jittor_setup import get_jittor, current_device
    jt = get_jittor("auto")
    import numpy as np
    x = jt.array(np.arange(6, dtype="float32").reshape(2, 3))
    w = jt.array(np.ones((4, 3), dtype="float32"))
    y = jt.nn.matmul_transpose(x, w) * 2
    print("RESULT", current_device(), y.numpy().sum(), y.requires_grad, jt.flags.use_cuda)
    # a constant unique to this run forces a fresh kernel compile (its helper runs as a child process)
    import os
    (jt.tanh(x * (1.0 + os.getpid() * 1e-7))).sum().sync()
    """
)


def test_import_works_offline_without_gpu_quietly_and_leaves_home_untouched(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), CUDA_VISIBLE_DEVICES="", http_proxy="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9")
    env.pop("JITTOR_HOME", None)
    env.pop("log_silent", None)
    # JMOSS_HOME stays (set by conftest) so the compiled core is reused from the test cache.
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT cpu 120.0 False 0" in proc.stdout
    output = proc.stdout + proc.stderr
    assert "[i " not in output and "[w " not in output, output[-2000:]
    assert not (home / ".cache" / "jittor").exists(), "jittor wrote into the user's ~/.cache/jittor"


def test_jittor_fatal_errors_are_not_swallowed():
    """jittor raises its fatal errors through LOG.f; jmoss's quiet logging must keep them."""
    from jmoss.jittor_setup import get_jittor

    get_jittor("cpu")
    import jittor_utils

    try:
        jittor_utils.LOG.f("deliberate fatal")
    except RuntimeError as exc:
        assert "deliberate fatal" in str(exc)
    else:
        raise AssertionError("LOG.f returned normally: fatal errors would be swallowed")


def test_unknown_device_is_a_clear_error():
    import pytest

    from jmoss.errors import DeviceError
    from jmoss.jittor_setup import resolve_device

    with pytest.raises(DeviceError, match="cpu, cuda"):
        resolve_device("tpu")


SIGNALS_PROBE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    # a parent started in the background hands SIGINT down ignored; start from Python's own handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from jmoss.jittor_setup import get_jittor
    get_jittor("cpu")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    child.kill()  # SIGKILL: jittor's own handler would quick-exit this process here
    child.wait()
    time.sleep(0.2)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    except KeyboardInterrupt:
        print("SURVIVED-AND-INTERRUPTIBLE")
    """
)


def test_children_dying_and_ctrl_c_do_not_kill_the_process():
    """jittor exits the process on SIGINT and on any child killed by a signal; jmoss undoes both."""
    proc = subprocess.run([sys.executable, "-c", SIGNALS_PROBE], capture_output=True, text=True, timeout=300)
    assert "SURVIVED-AND-INTERRUPTIBLE" in proc.stdout, proc.stdout + proc.stderr
    assert "quick exit" not in proc.stderr
