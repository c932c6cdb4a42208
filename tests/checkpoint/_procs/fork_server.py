"""Start many short training processes without paying the torch import each time.

Usage: ``python fork_server.py``; then, on stdin, one request per line:
``<output file> <argument> <argument>...`` (space-separated, no spaces inside). For each
request the server forks a child that redirects its stdout and stderr to the output file
and runs ``resume_worker.main(arguments)``; the server answers ``pid <pid>`` at once, waits
for the child and answers ``exit <code>`` (``-<signal>`` when a signal killed it). The
server imports torch and fnloop once and runs no torch operation itself, so every child
starts from a fresh, untouched interpreter state and its only link to earlier runs is what
they left on disk. EOF on stdin stops the server.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import resume_worker  # noqa: E402  (imports torch and fnloop once, before any fork)


def _child(output: str, argv: list[str]) -> None:
    code = 1
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = resume_worker.main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        pid = os.fork()
        if pid == 0:
            _child(words[0], words[1:])
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"exit {code}", flush=True)


if __name__ == "__main__":
    main()
