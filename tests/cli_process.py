"""The CLI in a real child process, without paying TensorFlow's import.

Crash, lock and cluster tests need `finetune-cli` in processes of its own:
killed at a named point (faults.py), holding a lock, answering on a port.
Starting `python -m finetune_cli` costs each of them TensorFlow's import
(7-10 s of CPU); a suite of such tests spends most of its time there.

Here the children are forked from a multiprocessing forkserver that has
imported TensorFlow, Keras and the package once (forking is safe then:
TensorFlow starts its runtime on first use, not on import). Each child is
still a separate process with its own pid, environment, working folder and
stdout/stderr, runs the same `finetune_cli.cli.main()` the console script
runs, and dies for real: a SIGKILL from a fault point reads as
`returncode == -9`, as with `subprocess`.

What a forked child cannot show: anything decided at import time. Tests of
TensorFlow's import-time log lines, or of what the CLI imports, start
`python -m finetune_cli` with `subprocess` instead.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import sys
import tempfile
import time

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(
    ["tensorflow", "keras", "finetune_cli.cli.main", "finetune_cli.train.job"]
)


def _child(argv, env, cwd, out, err):
    # A process started from a terminal has Ctrl-C's default handler; one
    # forked from a pytest-xdist worker inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fd_out = os.open(out, os.O_WRONLY | os.O_TRUNC)
    fd_err = fd_out if err is None else os.open(err, os.O_WRONLY | os.O_TRUNC)
    os.dup2(fd_out, 1)
    os.dup2(fd_err, 2)
    # Line-buffered, so what a killed child printed is still there.
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = ["finetune-cli", *argv]
    from finetune_cli.cli.main import main

    try:
        main()  # multiprocessing turns its SystemExit into the exit code
    finally:
        # multiprocessing ends a child with os._exit, which skips atexit,
        # where the CLI's stderr filter hands its last lines on.
        atexit._run_exitfuncs()


class Proc:
    """A started CLI process, with the parts of `subprocess.Popen` tests use."""

    def __init__(self, args, env, stderr_to_stdout):
        fd, self._out = tempfile.mkstemp(prefix="cli-out-")
        os.close(fd)
        self._err = None
        if not stderr_to_stdout:
            fd, self._err = tempfile.mkstemp(prefix="cli-err-")
            os.close(fd)
        self._process = _CTX.Process(
            target=_child,
            args=([str(a) for a in args], env, os.getcwd(), self._out, self._err),
            # Killed, not waited for, if a failed test leaves it paused.
            daemon=True,
        )
        self._process.start()
        self.pid = self._process.pid
        self.stdout = self.stderr = None

    @property
    def returncode(self):
        return self._process.exitcode

    def poll(self):
        return self._process.exitcode

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            raise TimeoutError(f"{self._process} still running after {timeout}s")
        return self._process.exitcode

    def wait_for_output(self, text, timeout=240):
        """True once `text` is in stdout; False if the child ends without it."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            ended = self.poll() is not None
            with open(self._out, encoding="utf-8", errors="replace") as f:
                if text in f.read():
                    return True
            if ended:
                return False
            time.sleep(0.05)
        return False

    def communicate(self, timeout=None):
        """Wait, then (stdout, stderr) as text; stderr is None if merged."""
        self.wait(timeout)
        if self.stdout is None:
            self.stdout = _read_and_remove(self._out)
            self.stderr = _read_and_remove(self._err) if self._err else None
        return self.stdout, self.stderr


def _read_and_remove(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    os.remove(path)
    return text


def launch(args, *, env=None, fault=None, pause=None, stderr_to_stdout=False):
    """Start `finetune-cli ARGS...`; `fault`/`pause` set faults.py's variables."""
    environ = dict(os.environ, **(env or {}))
    for name, value in (("FINETUNE_CLI_FAULT", fault), ("FINETUNE_CLI_PAUSE", pause)):
        environ.pop(name, None)
        if value:
            environ[name] = value
    return Proc(args, environ, stderr_to_stdout)


def run(args, timeout=300, **kwargs):
    """`launch`, then wait: the finished Proc, with .stdout and .stderr."""
    proc = launch(args, **kwargs)
    proc.communicate(timeout)
    return proc
