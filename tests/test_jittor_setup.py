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


# New kernels every run: jt.code ops whose C++ source carries a number unique to this run, synced
# together so jittor's parallel compiler runs (and, past 2 s, prints its progress to std::cerr).
COMPILE_PROBE = textwrap.dedent(
    """
    import sys, time, uuid
    from jmoss.jittor_setup import get_jittor
    jt = get_jittor("cpu")
    import numpy as np
    run = uuid.uuid4().int % 10**6
    x = jt.array(np.arange(4, dtype="float32"))

    def burst(tag, n):
        outs = [jt.code(x.shape, x.dtype, [x], cpu_src=f"for (int i=0; i<in0_shape0; i++) "
                        f"@out(i) = @in0(i) * {k} + {tag};  // run {run}") for k in range(n)]
        start = time.time()
        jt.sync(outs)
        return time.time() - start, float(outs[2].numpy()[1])

    print("python stderr before", file=sys.stderr, flush=True)
    first = burst(1, 8)
    second = burst(2, 8)
    print("python stderr after", file=sys.stderr, flush=True)
    print("SECONDS", first[0], second[0], "VALUES", first[1], second[1], flush=True)
    """
)


def test_jittor_compile_progress_becomes_one_jmoss_line():
    """Two >2 s compiles of fresh kernels: jittor's C++ progress lines (not gated by log_silent)
    are gone, one jmoss line says it is compiling, and everything else on stderr still arrives."""
    proc = subprocess.run([sys.executable, "-c", COMPILE_PROBE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds = [float(s) for s in proc.stdout.split("SECONDS ")[1].split()[:2]]
    assert proc.stdout.split("VALUES ")[1].split() == ["3.0", "4.0"]  # the kernels really ran
    assert min(seconds) > 2, f"a compile took under 2 s ({seconds}): jittor printed no progress to filter"
    assert "Compiling Operators" not in proc.stderr, proc.stderr
    assert proc.stderr.count("jmoss: compiling 8 kernels for this model (first run only") == 1, proc.stderr
    assert proc.stderr.index("python stderr before") < proc.stderr.index("jmoss: compiling")
    assert "python stderr after" in proc.stderr and "\r" not in proc.stderr


def test_progress_filter_keeps_every_other_byte():
    """The filter on the byte shapes jittor writes: "\\n", progress lines ending in "\\r", "\\n"."""
    from jmoss.jittor_setup import CompileProgressFilter

    flt = CompileProgressFilter(tty=False)
    chunks = [b"[e native] error one\n", b"partial prompt ", b"continues\n", b"\n", b"Compiling Operators(",
              b"3/40) used: 2.1s eta: 26s \r", b"Compiling Operators(9/40) used: 4s eta: 13s \r", b"\n",
              b"\n", b"a blank line above\n", b"\n", b"Compiling Operators(1/2) used: 2s eta: 1s \r", b"\n", b"C",
              b"ould not open\n", b"\n"]
    out = b"".join(flt.feed(chunk) for chunk in chunks)
    assert flt.pending()  # a trailing blank line waits to see whether progress follows
    out += flt.flush()
    assert out == (b"[e native] error one\npartial prompt continues\n"
                   b"jmoss: compiling 40 kernels for this model (first run only, cached for later runs)\xe2\x80\xa6\n"
                   b"\na blank line above\nCould not open\n\n")
    assert not flt.pending()
    tty = CompileProgressFilter(tty=True)
    shown = tty.feed(b"\nCompiling Operators(1/5) used: 2s eta: 3s \r")
    assert shown.startswith(b"\n\x1b[2mjmoss: compiling 5 kernels") and b"cached for later runs)\xe2\x80\xa6\x1b[0m\n" in shown
    assert shown.endswith(b"\r\x1b[K\x1b[2mjmoss: compiling kernels 1/5, 0 s (first run only)\x1b[0m")  # redrawn live


def test_a_broken_cupy_beside_jittor_does_not_break_jmoss(tmp_path):
    """Jittor's import tries `import cupy`; a cupy that fails at import (the device machines' stock
    cupy is built for numpy 2, Jittor runs on numpy 1) must not stop jmoss: jmoss never uses it,
    so Jittor's import does not even reach it."""
    fake = tmp_path / "site" / "cupy"
    fake.mkdir(parents=True)
    marker = tmp_path / "cupy-was-imported"
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('this cupy needs numpy >= 2')\n")
    code = textwrap.dedent("""
        import sys
        from jmoss.jittor_setup import get_jittor
        jt = get_jittor("cpu")
        assert float(jt.array([1.0, 2.0]).sum().item()) == 3.0
        assert "cupy" not in sys.modules, "the cupy block must not outlive Jittor's import"
        print("OK")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-2000:]
    assert not marker.exists(), "Jittor's import reached the installed cupy"
