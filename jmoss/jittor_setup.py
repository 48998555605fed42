"""The one place jmoss sets up Jittor; every other module gets jittor from ``get_jittor()``.

Jittor 1.3.11, imported naively, downloads oneDNN (and cutt, cutlass, nccl or a whole CUDA
toolkit on GPU hosts), rewrites ``~/.cache/jittor/config.json`` whenever ``JITTOR_HOME`` differs
from the last one used, prints ``[i ...]`` lines to the terminal, and builds gradient graphs for
every float op. The measured pitfalls are in shared/reference/jittor-notes.md §1. Here we:

- switch every download off (``use_mkl=0``, ``use_cutt=0``, ``use_cutlass=0``, ``use_nccl=0``,
  ``use_mpi=0``, and ``nvcc_path=""`` unless CUDA is asked for and a usable nvcc exists);
- keep jittor's caches in a jmoss-owned directory (``$JITTOR_HOME`` if the user set one, else
  ``<jmoss home>/jittor``), with HOME pointed there during the import so jittor writes nothing
  to ``~/.cache/jittor`` and no choice becomes sticky;
- import with Python-side logging live (``log_silent`` would also swallow ``LOG.f`` fatals) but
  with the process's stdout/stderr captured, and show the captured text only if import fails;
- then silence info and warning lines while letting errors and fatals through;
- route native stderr through a filter that turns Jittor's C++ "Compiling Operators(..)" progress
  (which ``log_silent`` does not gate) into one "jmoss: compiling ..." line per process;
- turn gradients off globally: jmoss only runs inference.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator

from jmoss.errors import DeviceError, JmossError
from jmoss.home import jmoss_home

_lock = threading.Lock()
_jittor: ModuleType | None = None
_device: str | None = None

DEVICES = ("auto", "cpu", "cuda")


def jittor_home() -> Path:
    """Where jittor compiles and caches its kernels for jmoss.

    Resolved through links: Jittor keys its compiled core on the path it was built under, so two
    homes that link to one cache must name it alike, or each rebuilds the core's jit_utils for the
    other ("jit_utils updated, please rerun your command") and exits."""
    env = os.environ.get("JITTOR_HOME")
    return Path(env).expanduser().resolve() if env else (jmoss_home() / "jittor").resolve()


def find_nvcc() -> str | None:
    """A real nvcc binary (not a wrapper script), or None.

    Jittor derives libcudart's location from nvcc's directory, so a wrapper in /usr/local/bin
    breaks it (jittor-notes §1.1); prefer the toolkit's own bin directory.
    """
    candidates = [os.environ.get("JMOSS_NVCC"), os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"),
                  "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return None


def nvcc_version(nvcc: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver); never initialises jittor."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def cuda13_fix_needed(version: tuple[int, int] | None) -> bool:
    """True for a toolkit Jittor 1.3.11 only builds against with jmoss's CUDA 13 fix (jmoss.cuda_fix)."""
    return version is not None and version[0] >= 13


def cuda_toolkit_usable(version: tuple[int, int] | None) -> bool:
    """CUDA 11/12 as Jittor ships; 13 once ``jmoss doctor --fix-cuda`` has built the patched copy."""
    if version is None or version[0] < 11:
        return False
    if not cuda13_fix_needed(version):
        return True
    from jmoss import cuda_fix

    try:
        cuda_fix.usable_dir()
    except JmossError:
        return False
    return True


def resolve_device(device: str | None) -> str:
    """Map "auto"/None to "cpu" or "cuda": CUDA when a GPU and a usable nvcc (11-12, or 13 with the fix) exist."""
    device = (device or "auto").lower()
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device != "auto":
        return device
    nvcc = find_nvcc()
    version = nvcc_version(nvcc) if nvcc else None
    if cuda_device_count() > 0 and cuda_toolkit_usable(version):
        return "cuda"
    return "cpu"


@contextlib.contextmanager
def _captured_fds() -> Iterator[Path]:
    """Send fd 1 and 2 to a temporary file (jittor's C++ side writes there directly)."""
    with tempfile.TemporaryDirectory(prefix="jmoss-jt-") as tmp:
        log = Path(tmp) / "import.log"
        try:
            fds = [sys.stdout.fileno(), sys.stderr.fileno()]
        except (AttributeError, OSError, ValueError):  # stdout replaced by a non-file object
            yield log
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(fd) for fd in fds]
        global _saved_stderr
        _saved_stderr = saved[1]
        with open(log, "wb") as sink:
            try:
                for fd in fds:
                    os.dup2(sink.fileno(), fd)
                yield log
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                _saved_stderr = None
                for fd, old in zip(fds, saved):
                    os.dup2(old, fd)
                    os.close(old)


@contextlib.contextmanager
def _home_pointing_at(home: Path) -> Iterator[None]:
    """Make ``Path.home()`` equal JITTOR_HOME while jittor imports.

    jittor_utils.home() runs at import and writes ``~/.cache/jittor/config.json`` whenever
    JITTOR_HOME differs from the stored default (``$HOME``); later runs without the variable then
    silently reuse it (jittor-notes §1.3). With HOME == JITTOR_HOME nothing is written under the
    user's real home, and no state is shared between concurrent jmoss processes.
    """
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved


@contextlib.contextmanager
def _no_jittor_sigint() -> Iterator[None]:
    """Keep jittor from installing its SIGINT handler, which exits the process on Ctrl-C.

    jmoss needs Ctrl-C as KeyboardInterrupt (stop a reply, keep the chat). Jittor's core skips
    that handler when JPY_PARENT_PID is set (its Jupyter switch, read once at load).
    """
    was_set = "JPY_PARENT_PID" in os.environ
    if not was_set:
        os.environ["JPY_PARENT_PID"] = str(os.getpid())
    try:
        yield
    finally:
        if not was_set:
            os.environ.pop("JPY_PARENT_PID", None)


def _restore_sigchld() -> None:
    """Undo jittor's SIGCHLD handler: it exits the whole process when any child dies of a signal.

    jmoss kills its own children on purpose (a sympy worker past its time limit, a conversion
    test), so the default disposition is restored. Done through libc so it works off the main thread.
    """
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal(int(signal.SIGCHLD), ctypes.c_void_p(0))  # SIG_DFL


def _shield_compile_pool(jittor_utils: ModuleType) -> None:
    """Keep Ctrl-C away from jittor's multiprocessing compile pool.

    A terminal's Ctrl-C signals the whole process group: a pool worker then dies holding the
    pool's queue lock, and jittor's atexit ``pool_cleanup`` deadlocks, so the process never exits.
    Workers created from now on ignore SIGINT; a pool made during a cold import is replaced.
    """
    import signal

    original = jittor_utils.pool_initializer

    def initializer():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        original()

    jittor_utils.pool_initializer = initializer
    pool = getattr(jittor_utils, "p", None)
    if pool is not None and jittor_utils.pool_size:
        pool.__exit__(None, None, None)  # terminate the unshielded workers
        jittor_utils.p = jittor_utils.Pool(jittor_utils.pool_size, initializer=initializer)
        jittor_utils.p.__enter__()


def _quiet_python_logs(jittor_utils: ModuleType) -> None:
    """Silence jittor's Python-side info/warning lines and progress bars; keep errors and fatals.

    ``LOG.log_silent`` also gates ``LOG.f`` (which is how jittor raises its fatal errors), so the
    flag is set for the progress bars but lifted for the "e" and "f" levels.
    """
    log = jittor_utils.LOG
    original = log._log

    def _log(level, verbose, *msg):
        if level not in ("e", "f"):
            return None
        log.log_silent = 0
        try:
            return original(level, verbose, *msg)
        finally:
            log.log_silent = 1

    log.log_silent = 1
    log._log = _log


class CompileProgressFilter:
    """Rewrites what native code writes to fd 2: Jittor's kernel-compile progress becomes jmoss's.

    Jittor's C++ (``parallel_compiler.cc``) writes ``"\\n"``, then ``"Compiling Operators(i/n)
    used: Xs eta: Ys \\r"`` over and over, then ``"\\n"``, straight to ``std::cerr`` whenever
    compiling new kernels takes over 2 s. ``log_silent`` does not gate it (it only gates the
    Python-side ``DelayProgress``), so it interleaves with chat replies and fills server logs. The
    first such burst becomes ``jmoss: compiling kernels …`` (with the burst's kernel count); on a
    terminal every burst then shows one line redrawn in place, ``i/n kernels, N s``, ticking each
    second (``tick``) and erased when the burst ends, so a long first run is never silent. Off a
    terminal later bursts vanish. Every other byte passes through unchanged.

    Control bytes from jmoss (``control``): ``q``/``Q`` turn every notice off/on (``chat -q``),
    ``h``/``H`` hold notices while a reply is on screen (a compile then never lands inside it).

    Self-contained on purpose: its source is also the program of the filter process (see
    ``_filter_native_stderr``), which runs without jmoss on its path.
    """

    PREFIX = b"Compiling Operators("
    LOG_EVERY = 30.0  # off a terminal: seconds between "still compiling" lines of one long burst

    def __init__(self, tty: bool = False, quiet: bool = False):
        self.tty = tty
        self.quiet = quiet
        self.hold = False
        self.buf = b""
        self.announced = False
        self.at_line_start = True
        self.held_newline = False  # an empty line: perhaps Jittor's newline before its progress
        self.after_progress = False  # the next empty line is Jittor's newline after its progress
        self.live = False  # a redrawn progress line is on the terminal now
        self.burst = None  # (done, total, started) of the burst being compiled
        self.logged = 0.0  # when the last "still compiling" line was written (off a terminal)

    def pending(self) -> bool:
        """True when bytes are held back waiting to see whether Jittor's progress follows."""
        return self.held_newline or bool(self.buf)

    def busy(self) -> bool:
        """True while a burst is being compiled and shown: ``tick`` wants calling about once a second."""
        return self.burst is not None and not (self.quiet or self.hold)

    def control(self, data: bytes) -> bytes:
        """Apply jmoss's control bytes; return what to write (the live line erased when held)."""
        for c in data.decode("ascii", "replace"):
            if c in "qQ":
                self.quiet = c == "q"
            elif c in "hH":
                self.hold = c == "h"
        return self._erase() if self.quiet or self.hold else b""

    def tick(self) -> bytes:
        """The live line with the time so far (called about once a second while ``busy``); off a
        terminal, a plain line when a burst has gone on for another ``LOG_EVERY`` seconds."""
        if not self.busy():
            return b""
        if self.tty:
            return self._live()
        import time

        done, total, started = self.burst
        now = time.monotonic()
        if now - max(started, self.logged) < self.LOG_EVERY:
            return b""
        self.logged = now
        return f"jmoss: still compiling kernels, {done}/{total} after {now - started:.0f} s\n".encode()

    def feed(self, data: bytes) -> bytes:
        """Take bytes read from the pipe; return the bytes to write now."""
        self.buf += data
        out = bytearray()
        while True:
            ends = [i for i in (self.buf.find(b"\r"), self.buf.find(b"\n")) if i >= 0]
            if not ends:
                break
            i = min(ends)
            segment, terminator, self.buf = self.buf[:i], self.buf[i:i + 1], self.buf[i + 1:]
            out += self._segment(segment, terminator)
        tail = self.buf
        if tail and not (self.PREFIX.startswith(tail) or tail.startswith(self.PREFIX)):
            out += self._erase() + self._release() + tail  # an unfinished line (a prompt): show it now
            self.buf, self.at_line_start, self.after_progress = b"", False, False
        return bytes(out)

    def flush(self) -> bytes:
        """What is held, once nothing more came for a moment (an unfinished progress line stays)."""
        out = self._release()
        if self.buf and not self.buf.startswith(self.PREFIX):
            out = self._erase() + out + self.buf
            self.buf, self.at_line_start = b"", False
        return out

    def _release(self) -> bytes:
        if self.held_newline:
            self.held_newline = False
            return b"\n"
        return b""

    def _erase(self) -> bytes:
        if self.live:
            self.live = False
            return b"\r\033[K"
        return b""

    def _live(self) -> bytes:
        import time

        done, total, started = self.burst
        self.live = True
        text = f"jmoss: compiling kernels {done}/{total}, {time.monotonic() - started:.0f} s (first run only)"
        return f"\r\033[K\033[2m{text}\033[0m".encode()

    def _segment(self, segment: bytes, terminator: bytes) -> bytes:
        if segment.startswith(self.PREFIX):
            import re
            import time

            self.held_newline = False  # Jittor's own newline before the progress
            self.after_progress = self.at_line_start = True
            count = re.match(rb"Compiling Operators\((\d+)/(\d+)\)", segment)
            done, total = (int(count.group(1)), int(count.group(2))) if count else (0, 0)
            started = self.burst[2] if self.burst else time.monotonic()
            self.burst = (done, total, started)
            if self.quiet or self.hold:
                return b""
            out = b""
            if not self.announced:
                self.announced = True
                out = self._notice(total)
            return out + (self._live() if self.tty else b"")
        if not segment and terminator == b"\n" and self.at_line_start:
            if self.after_progress:
                self.after_progress = False
                self.burst = None
                return self._erase()
            out = self._release()
            self.held_newline = True
            return out
        self.after_progress = False
        self.at_line_start = True
        return self._erase() + self._release() + segment + terminator

    def _notice(self, total: int) -> bytes:
        # "(i/n)": n kernels in this burst. Jittor's eta at its first line is far off (measured
        # 44 s for an 8 s compile), so no time is promised.
        what = f"{total} kernels" if total else "kernels"
        text = f"jmoss: compiling {what} for this model (first run only, cached for later runs)…"
        if self.tty:  # a new line of its own, as Jittor's progress had; dim like jmoss's status
            return f"\n\033[2m{text}\033[0m\n".encode()
        return f"{text}\n".encode()


_FILTER_MAIN = """
import os, select, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
flt = CompileProgressFilter(tty=os.isatty(1), quiet=os.environ.get("JMOSS_COMPILE_NOTICES") == "0")
CONTROL = int(os.environ.get("JMOSS_CONTROL_FD", "-1"))  # jmoss's pipe: notices off/on, hold/release
inputs = [0, CONTROL] if CONTROL >= 0 else [0]

def write(data):
    while data:
        try:
            data = data[os.write(1, data):]
        except OSError:  # the reader went away: keep draining so writers never block
            return

while True:
    wait = 0.2 if flt.pending() else 1.0 if flt.busy() else None
    ready, _, _ = select.select(inputs, [], [], wait)
    if not ready:
        write(flt.flush() + flt.tick())
        continue
    if CONTROL in ready:
        data = os.read(CONTROL, 64)
        if not data:
            inputs.remove(CONTROL)
        write(flt.control(data))
        if 0 not in ready:
            continue
    data = os.read(0, 65536)
    if not data:
        write(flt.flush() + flt.buf)
        break
    write(flt.feed(data))
"""

_filter_process: subprocess.Popen | None = None
_control_fd: int | None = None
_notices = True


def set_compile_notices(on: bool) -> None:
    """Turn jmoss's "compiling kernels" notices on or off (``-q``), now or for the filter to come."""
    global _notices
    _notices = on
    _send_control(b"Q" if on else b"q")


def hold_compile_notices(hold: bool) -> None:
    """While a reply is on screen (``hold``), a kernel compile shows nothing (it would land in the reply)."""
    _send_control(b"h" if hold else b"H")


def _send_control(data: bytes) -> None:
    if _control_fd is not None:
        try:
            os.write(_control_fd, data)
        except OSError:
            pass


def _filter_native_stderr() -> None:
    """Route fd 2 through a small filter process running ``CompileProgressFilter``.

    A process, not a thread: Jittor holds the GIL while it compiles, so a Python thread here
    could neither show the notice in time nor drain the pipe (a full pipe would block Jittor).
    The child is in its own session (Ctrl-C does not reach it) and ends when every writer has
    closed fd 2, i.e. after this process exits, so nothing written at exit is lost. Python's own
    ``sys.stderr`` is pointed at the real stderr: it stays synchronous with stdout and a terminal
    is still seen as one. Set ``JMOSS_JITTOR_PROGRESS=1`` to see Jittor's raw progress instead.
    A second pipe (``JMOSS_CONTROL_FD`` in the child) carries ``set_compile_notices``/``hold_compile_notices``.
    """
    global _filter_process, _control_fd
    if _filter_process is not None or os.environ.get("JMOSS_JITTOR_PROGRESS") == "1":
        return
    import inspect
    import io
    import textwrap

    try:
        program = textwrap.dedent(inspect.getsource(CompileProgressFilter)) + _FILTER_MAIN
        original = os.dup(2)
    except (OSError, TypeError):  # no source shipped, or no fd 2: leave stderr alone
        return
    read_end, write_end = os.pipe()
    control_read, control_write = os.pipe()
    env = {**os.environ, "JMOSS_COMPILE_NOTICES": "1" if _notices else "0", "JMOSS_CONTROL_FD": str(control_read)}
    try:
        _filter_process = subprocess.Popen([sys.executable, "-I", "-S", "-c", program], stdin=read_end,
                                           stdout=original, stderr=original, start_new_session=True, env=env,
                                           pass_fds=(control_read,))
    except OSError:
        os.close(original)
        os.close(control_write)
        return
    finally:
        os.close(read_end)
        os.close(control_read)
    _control_fd = control_write
    os.set_inheritable(control_write, False)
    python_stderr = sys.stderr
    real = python_stderr is sys.__stderr__ and _fileno(python_stderr) == 2
    if real:
        python_stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    if real:
        sys.stderr = io.TextIOWrapper(io.FileIO(original, "w", closefd=False), encoding=python_stderr.encoding,
                                      errors=python_stderr.errors, line_buffering=True, write_through=True)


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def stable_python_path(python: str) -> str:
    """One name for this interpreter, however it was started: the first of ``python3.X``,
    ``python3``, ``python`` beside it that is the same file (a venv's three links), else ``python``.

    Jittor runs ``python_path utils/asm_tuner.py ...`` to compile each kernel and keeps that
    command in the kernel's cache key; it takes ``sys.executable`` (plus ``.X`` when such a file
    exists), so ``jmoss`` (a ``python3`` shebang: ``python3.11``) and ``.venv/bin/python x.py``
    (``python``) keyed the same kernel differently and recompiled it in turn (measured: the
    MOSS-16B decode layer, 17.5 s, after `jmoss bench`)."""
    folder = os.path.dirname(python)
    for name in (f"python3.{sys.version_info.minor}", "python3", "python"):
        candidate = os.path.join(folder, name)
        try:
            if os.path.samefile(candidate, python):
                return candidate
        except OSError:
            continue
    return python


def get_jittor(device: str | None = "cpu") -> ModuleType:
    """Import and configure jittor once for ``device`` ("cpu", "cuda" or "auto"); return it."""
    global _jittor, _device
    wanted = resolve_device(device)
    with _lock:
        if _jittor is not None:
            if wanted == "cuda" and _device != "cuda":
                raise DeviceError(
                    "jittor was already set up for the CPU in this process; ask for device='cuda' "
                    "before anything else runs a model"
                )
            return _jittor
        _jittor = _import_jittor(wanted)
        _device = wanted
        return _jittor


def current_device() -> str | None:
    return _device


SAVE_MEM_ENV = "JMOSS_JITTOR_SAVE_MEM"
SAVE_MEM_CC_FLAG = "-DJT_SAVE_MEM=1"


def save_mem_requested() -> bool:
    """True when this process should use Jittor's swap-enabled build (``JMOSS_JITTOR_SAVE_MEM=1``).

    Only the ``swap="jittor"`` baseline sets it, in a subprocess of its own: the build lives in
    ``<jittor home>-savemem`` (about 2 minutes to compile once) and cannot share a process with
    the normal build.
    """
    return os.environ.get(SAVE_MEM_ENV, "") == "1"


@contextlib.contextmanager
def _without_cupy():
    """Jittor's import tries ``import cupy`` for its numpy_code bridge, which jmoss never uses (the
    CUDA runtime is reached through ctypes, jmoss.cuda_runtime). A cupy built for numpy 2 (the
    device machines' stock cupy-cuda13x) beside the numpy 1 Jittor needs fails in odd ways at
    import, so the import sees no cupy; an application that imported cupy itself keeps it."""
    if "cupy" in sys.modules:
        yield
        return
    sys.modules["cupy"] = None  # `import cupy` raises ImportError, which Jittor handles
    try:
        yield
    finally:
        if sys.modules.get("cupy", 0) is None:
            del sys.modules["cupy"]


@contextlib.contextmanager
def _core_progress(log: Path, active: bool, interval: float = 1.0, log_every: float = 30.0) -> Iterator[None]:
    """While Jittor compiles its core (minutes, its output captured in ``log``), show that it does.

    A thread (Jittor's core compile waits on a process pool, so the GIL is free) redraws one line
    on a terminal each ``interval`` s, with the step Jittor's own progress reached ("(i/n)" in the
    log) and the time so far; off a terminal it prints a line every ``log_every`` s. Off with
    ``set_compile_notices(False)``."""
    if not active or not _notices:
        yield
        return
    import re
    import time

    try:
        out = os.dup(_real_stderr_fd())
    except OSError:
        yield
        return
    tty = os.isatty(out)
    start = time.monotonic()
    done = threading.Event()

    def step() -> str:
        try:
            found = re.findall(rb"\((\d+)/(\d+)\)", log.read_bytes()[-4096:])
        except OSError:
            found = []
        return f", step {int(found[-1][0])}/{int(found[-1][1])}" if found else ""

    def write(text: str) -> None:
        try:
            os.write(out, text.encode())
        except OSError:
            pass

    def run() -> None:
        last = start
        while not done.wait(interval):
            now = time.monotonic()
            line = f"jmoss: compiling Jittor's core… {now - start:.0f} s{step()}"
            if tty:
                write(f"\r\033[K\033[2m{line}\033[0m")
            elif now - last >= log_every:
                last = now
                write(line + "\n")

    thread = threading.Thread(target=run, name="jmoss-core-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        write(("\r\033[K" if tty else "") + f"jmoss: Jittor's core compiled in {time.monotonic() - start:.0f} s\n")
        os.close(out)


def _real_stderr_fd() -> int:
    """The fd that is stderr for the user while fds 1/2 are captured (saved by ``_captured_fds``)."""
    return _saved_stderr if _saved_stderr is not None else 2


_saved_stderr: int | None = None


def _import_jittor(device: str) -> ModuleType:
    env = {
        "use_mkl": "0",
        "use_cutt": "0",
        "use_cutlass": "0",
        "use_nccl": "0",
        "use_mpi": "0",
        "FIX_TORCH_ERROR": "0",
        "conv_opt": "1",  # CUDA: load only cuBLAS/cuRAND, no cuDNN/cuFFT dev files needed
    }
    if device == "cuda":
        nvcc = find_nvcc()
        if nvcc is None:
            raise DeviceError("device 'cuda' needs the CUDA toolkit's nvcc; set JMOSS_NVCC=/path/to/nvcc or use --device cpu")
        if cuda_device_count() == 0:
            raise DeviceError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
        env["nvcc_path"] = nvcc
        if cuda13_fix_needed(nvcc_version(nvcc)):
            # Jittor 1.3.11 does not build against CUDA 13: import jmoss's patched copy instead.
            from jmoss import cuda_fix

            patched = str(cuda_fix.usable_dir())  # CudaFixError says to run `jmoss doctor --fix-cuda`
            if patched not in sys.path:
                sys.path.insert(0, patched)
    else:
        env["nvcc_path"] = ""
    home = jittor_home()
    if save_mem_requested():
        # Jittor's native swap (the baseline the streaming engine is compared with) is a
        # compile-time switch (jittor-notes §2.1): it needs its own core build, so it gets its
        # own JITTOR_HOME, and cc_flags must be set on every run or jittor silently rebuilds.
        flags = os.environ.get("cc_flags", "")
        env["cc_flags"] = flags if SAVE_MEM_CC_FLAG in flags else f"{flags} {SAVE_MEM_CC_FLAG}".strip()
        home = home.with_name(home.name + "-savemem")
    if "ray" in sys.modules:
        # A Ray worker runs gRPC and core-worker threads; jittor's import forks a multiprocessing
        # pool of compile workers (even when every object is cached), and a fork while one of those
        # threads holds a lock left a serve replica stuck initializing forever. Compile in-process.
        env["DISABLE_MULTIPROCESSING"] = "1"
    os.environ.update(env)
    os.environ.pop("log_silent", None)  # see module docstring: it would swallow fatal errors

    home.mkdir(parents=True, exist_ok=True)
    marker = home / f".jmoss-ready-{device}"
    os.environ["JITTOR_HOME"] = str(home)
    first = not marker.exists()
    if first:
        print(
            f"jmoss: compiling Jittor's core for {device} into {home} (once; about 2 minutes on 2 cores)...",
            file=sys.stderr,
            flush=True,
        )
    with _captured_fds() as log, _core_progress(log, first), _home_pointing_at(home), _no_jittor_sigint(), \
            _without_cupy():
        try:
            with warnings.catch_warnings():  # jittor's sources carry invalid escape sequences
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", SyntaxWarning)
                import jittor
        except BaseException as exc:  # import-time compile failures surface as many types
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise JmossError(
                f"importing jittor for {device} failed: {exc}\n{tail}\n"
                "Run `jmoss doctor` to see what jittor needs on this machine."
            ) from exc
    marker.touch()
    _restore_sigchld()
    _filter_native_stderr()
    import jittor_utils

    _shield_compile_pool(jittor_utils)

    jittor.flags.log_silent = 1
    _quiet_python_logs(jittor_utils)
    # jittor's objects are built with -Ofast, which switches the process to flush-to-zero; numpy
    # then warns about float64's subnormals on every finfo lookup. Harmless for inference.
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal", category=UserWarning)
    # Every op compile runs `python_path utils/asm_tuner.py` through the shell; that child imports
    # jittor_utils, which would create ~/.cache/jittor under the user's real HOME. Give it ours.
    # The command (interpreter path included) is part of every kernel's cache key: one name per
    # interpreter, or `jmoss` (python3) and `python script.py` (python) recompile each other's kernels.
    python = stable_python_path(jittor.flags.python_path)
    jittor.flags.python_path = f"HOME={shlex.quote(str(home))} {shlex.quote(python)}"
    jittor.flags.no_grad = 1
    jittor.flags.use_cuda = 1 if device == "cuda" else 0
    return jittor


def wrap_zero_copy(jt: ModuleType, array):
    """A jittor Var over ``array``'s memory (a C-contiguous numpy array; no copy, CPU only,
    jittor-notes §4): resident weights, and the read probe's buffer, keep the pages they were given."""
    import numpy as np

    if not (type(array) is np.ndarray and array.flags.c_contiguous):
        raise ValueError("zero-copy wrapping needs a C-contiguous plain ndarray")
    reuse = getattr(jt, "reuse_np_array", None)
    if reuse is not None:
        return reuse(array)
    saved = jt.flags.reuse_array
    jt.flags.reuse_array = 1
    try:
        return jt.array(array)
    finally:
        jt.flags.reuse_array = saved
