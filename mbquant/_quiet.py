"""Quiet by default: the informational lines third-party code prints on stderr are dropped unless --verbose.

The ExecuTorch runtime's C++ logs (``[cpuinfo_utils.cpp:71] Reading file ...``, ``[threadpool.cpp:66] Resetting
threadpool ...``) go straight to file descriptor 2, and torch logs a deprecation warning when torchao is
imported; neither can be turned off from Python. :func:`filtered_stderr` routes fd 2 through a pipe for the
duration of a command and forwards every line except those (child processes inherit the filter). Everything
else, progress bars and errors included, passes through unchanged.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from typing import Iterator

NOISE = re.compile(rb"^(\[(cpuinfo_utils|threadpool)\.cpp:\d+\] "
                   rb"|W\d{4} [\d:. ]+\d+ \S*_pytree\.py:\d+\] <enum '\w+'> is an Enum subclass"
                   rb"|WARNING:executorch\.exir\.pass_manager:PassManager is deprecated)")


def _pump(read_fd: int, out_fd: int) -> None:
    buf = b""
    with os.fdopen(read_fd, "rb", buffering=0) as f:
        while chunk := f.read(65536):
            buf += chunk
            parts = re.split(rb"(\r|\n)", buf)
            buf = parts.pop()  # an unfinished line waits for its end
            for text, end in zip(parts[::2], parts[1::2]):
                if not NOISE.match(text):
                    os.write(out_fd, text + end)
    if buf and not NOISE.match(buf):
        os.write(out_fd, buf)


@contextlib.contextmanager
def filtered_stderr(enabled: bool = True) -> Iterator[None]:
    """Drop :data:`NOISE` lines from fd 2 inside the block (a no-op when ``enabled`` is false)."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    pump = threading.Thread(target=_pump, args=(read_fd, real), daemon=True)
    pump.start()
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except ValueError:
            pass
        os.dup2(real, 2)  # closes the pipe's last write end in this process: the pump sees EOF
        pump.join(timeout=10)
        os.close(real)
