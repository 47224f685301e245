"""Starts the processes of tests/mwms_cluster.py's clusters: imports
TensorFlow, Keras and tf_gradmix once, then forks one process per worker.

Each worker is a real process (its own pid, session, log and exit status)
that runs ``mwms_worker.py`` as ``python mwms_worker.py SPEC.json`` would,
without paying the import again (about 5 s of CPU a process). Nothing here
initialises the TensorFlow runtime: each forked worker configures its own
devices and threads, as a fresh process does.

Protocol, one line each on stdin: ``SPEC LOG RC`` (paths); the reply on
stdout is the forked worker's pid. When the worker ends, its exit status
(negative: the signal that ended it, as ``subprocess`` reports it) is written
to ``RC``. Ends when stdin closes, once its workers have ended.
"""

import os
import runpy
import signal
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402, F401
import numpy  # noqa: E402, F401
import tensorflow  # noqa: E402, F401

import tf_gradmix  # noqa: E402, F401
from tf_gradmix import distribute  # noqa: E402, F401

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mwms_worker.py")
status_files = {}  # pid -> path of its exit status


def reap(signum=None, frame=None, block=False):
    """Writes the exit status of each ended worker (with ``block``: waits for every one)."""
    while status_files:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = status_files.pop(pid)
        with open(path + ".tmp", "w") as f:
            f.write(str(os.waitstatus_to_exitcode(status)))
        os.replace(path + ".tmp", path)


def run_worker(spec, log):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdin.close()
    sys.argv = [WORKER, spec]
    code = 0
    try:
        runpy.run_path(WORKER, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the log, as an uncaught error would be
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main():
    signal.signal(signal.SIGCHLD, reap)
    for line in sys.stdin:
        spec, log, rc = line.split()
        sys.stdout.flush()
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
            run_worker(spec, log)
        status_files[pid] = rc
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        print(pid, flush=True)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    reap(block=True)  # no worker outlives the server (the caller's wait bounds this)


if __name__ == "__main__":
    main()
