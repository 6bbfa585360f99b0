"""The `mbquant` command line: a thin layer over the Python API. ``build_parser()`` (torch-free, :mod:`.parser`),
``main(argv) -> int``; the commands (:mod:`.commands`) only chain library calls.

Every error a user can cause ends in one line naming the problem, the value and the fix, with exit code 2 (usage)
or 1 (data, a failed check); anything else is one line with exit code 3 (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Iterator, Sequence

from ..config import MAX_DECODE_WORKERS
from ..errors import ConfigError, MbquantError
from .commands import COMMANDS
from .parser import build_parser

__all__ = ["COMMANDS", "build_parser", "main"]


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """``--threads``: torch's intra-op threads for this command, restored after it."""
    if n is None:
        yield
        return
    from ..mobile.backend import torch_threads

    with torch_threads(n):
        yield


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends a command like Ctrl-C: staging folders and locks are cleaned up on the way out."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_numbers(args: argparse.Namespace) -> None:
    """Numeric flags that no config validates, checked before any work."""
    for name, lo, hi in (("threads", 1, 1024), ("batch_size", 1, 65536), ("max_image_pixels", 1, 2 ** 40),
                         ("num_classes", 1, 100_000), ("resolution", 8, 1024), ("epochs", 1, 100_000),
                         ("latency_runs", 1, 100_000), ("limit", 1, 10 ** 9),
                         ("decode_workers", 0, MAX_DECODE_WORKERS)):
        v = getattr(args, name, None)
        if v is not None and not lo <= v <= hi:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {v} is invalid; pass a value in [{lo}, {hi}]")
    for name in ("tolerance", "max_drop", "min_agreement", "min_parity", "parity_z", "percentile", "lr"):
        v = getattr(args, name, None)
        if isinstance(v, float) and not math.isfinite(v):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {v} is not a finite number; pass a number")
    w = getattr(args, "width_mult", None)
    if w is not None and not (math.isfinite(w) and 0 < w <= 4):
        raise ConfigError(f"--width-mult {w} is invalid; pass a width multiplier in (0, 4] (e.g. 0.35, 0.5, 1.0)")


def main(argv: Sequence[str] | None = None) -> int:
    from .._quiet import filtered_stderr

    for stream in (sys.stdout, sys.stderr):     # a file name that is not valid UTF-8 still prints (escaped)
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        with filtered_stderr(not args.verbose), _sigterm_interrupts():
            _check_numbers(args)
            with _threads(args.threads):
                return COMMANDS[args.command](args)
    except MbquantError as exc:
        print(f"mbquant {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mbquant {args.command}: interrupted (an output folder is only ever written complete)", file=sys.stderr)
        return 130
    except OSError as exc:   # a full disk, a vanished folder, a permission: name the path and the cause
        if args.debug:
            raise
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"mbquant {args.command}: error: cannot use{where}: {exc.strerror or exc}; free disk space, fix the "
              f"permissions or pass another path, then run the command again", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug or an input nobody foresaw: one clear line, the traceback on request
        if args.debug:
            raise
        text = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(f"mbquant {args.command}: internal error: {type(exc).__name__}: {text}; rerun with --debug for the "
              f"traceback and report it", file=sys.stderr)
        return 3
