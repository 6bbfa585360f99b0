"""Writing safely: atomic files (temporary name, then rename), strict JSON, and the run-folder protocol.

A run (``mbquant ptq``/``qat``) never writes into its ``--out`` folder: it takes a lock beside it, writes into
a private staging folder beside it, and renames that folder to ``--out`` only when every artifact is verified
and the report written. An existing ``--out`` is refused unless the run may replace it (``--overwrite``),
and then it is replaced whole, only on success. Staging folders and locks left by killed runs (their process
is gone) are removed by the next run to the same ``--out``; a previous run caught half-replaced is put back.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, ExportError


def ensure_writable_dir(path: Path, what: str = "output folder") -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ExportError(f"cannot create {what} '{path}': it exists and is a file; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {what} '{path}': {exc.strerror}; pass a writable folder") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ExportError(f"{what} '{path}' is not writable; pass a writable folder or fix its permissions")
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` only on success."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float written as a string ("inf", "-inf", "nan"): strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def write_json(path: Path, obj: object) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(strict(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_new_file(path: Path, *, overwrite: bool, what: str, flag: str) -> Path:
    """A file a command will write at the end: checked before any work (not a folder, not silently replaced,
    its folder writable)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} '{path}' is a folder; pass a file path for the {what} (e.g. '{path}/model.pth')")
    if path.exists() and not overwrite:
        raise ConfigError(f"{flag} '{path}' already exists; pass --overwrite to replace it (when this run succeeds) "
                          f"or another {flag}")
    ensure_writable_dir(path.parent, f"folder of the {what}")
    return path


class Lock:
    """An exclusive lock file (``O_EXCL``) holding the owner's pid, host and command; a lock whose process is
    gone (on this host) is stale and taken over."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self.stale: str | None = None

    def __enter__(self) -> "Lock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", -1))):
                    self.stale = f"removed the stale lock of a killed run (pid {owner.get('pid')})"
                    self.path.unlink(missing_ok=True)
                    continue
                raise ConfigError(f"another mbquant run (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, "
                                  f"started {owner.get('started', '?')}) is writing {self.what}; wait for it to finish "
                                  f"or pick another output (lock: '{self.path}')") from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            return self
        raise ConfigError(f"could not take the lock '{self.path}'; remove it if no mbquant run is writing {self.what}")

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {"host": socket.gethostname(), "pid": -1}  # unreadable: written by a run killed mid-write

    def __exit__(self, *exc) -> None:
        if self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (they are delivered right after it)."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _pid_of(path: Path) -> int | None:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


class RunFolder:
    """The ``--out`` protocol (see the module doc). ``staging`` is where the run writes; ``work`` keeps what must
    survive a killed run (QAT's resumable checkpoint) until the run succeeds."""

    def __init__(self, out: Path, *, overwrite: bool = False, resume: bool = False):
        self.out = Path(out)
        self.overwrite, self.resume = overwrite, resume
        self.notes: list[str] = []
        self.published = False

    @property
    def parent(self) -> Path:
        return self.out.parent

    def _hidden(self, kind: str, pid: int | None = None) -> Path:
        return self.parent / (f".{self.out.name}.{kind}" + (f"-{pid}" if pid is not None else ""))

    @property
    def work(self) -> Path:
        return self._hidden("work")

    @property
    def failed(self) -> Path:
        return self.parent / f"{self.out.name}.failed"

    def __enter__(self) -> "RunFolder":
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out '{self.out}' is a file; pass a folder path for the run's artifacts")
        if self.out.exists() and not (self.overwrite or self.resume):
            raise ConfigError(f"--out '{self.out}' already exists (an earlier run?); pass --overwrite to replace it "
                              f"when this run succeeds, or another --out")
        ensure_writable_dir(self.parent, "folder of --out")
        self._lock = Lock(self._hidden("lock"), f"'{self.out}'")
        self._lock.__enter__()
        if self._lock.stale:
            self.notes.append(self._lock.stale)
        try:
            self._recover()
            self.staging = self._hidden("staging", os.getpid())
            self.staging.mkdir()
        except BaseException:
            self._lock.__exit__()
            raise
        return self

    def _recover(self) -> None:
        """Remove what killed runs left beside ``--out``; put back a previous run caught half-replaced."""
        for p in sorted(self.parent.glob(f".{self.out.name}.old-*")):
            pid = _pid_of(p)
            if pid is None or pid_alive(pid):
                continue
            if self.out.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, self.out)
                self.notes.append(f"put back the previous run in '{self.out}' (a run killed while replacing it)")
        for p in sorted(self.parent.glob(f".{self.out.name}.staging-*")):
            pid = _pid_of(p)
            if pid is not None and not pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)
                self.notes.append(f"removed '{p.name}', left by a killed run (pid {pid})")

    def publish(self) -> Path:
        """Move what must survive (``work``) in, then rename the staging folder to ``--out`` (replacing it)."""
        if self.work.exists():
            for f in self.work.iterdir():
                os.replace(f, self.staging / f.name)
            self.work.rmdir()
        old = self._hidden("old", os.getpid())
        with _signals_held():  # Ctrl-C or SIGTERM between the two renames would leave no --out at all
            if self.out.exists():
                os.rename(self.out, old)
            os.rename(self.staging, self.out)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.failed, ignore_errors=True)
        self.published = True
        return self.out

    def fail(self, keep: tuple[str, ...] = ("report.json",)) -> Path | None:
        """A run that failed a check: keep only its report, as ``<out>.failed/report.json``; no artifact."""
        kept = [self.staging / k for k in keep if (self.staging / k).exists()]
        if not kept:
            return None
        shutil.rmtree(self.failed, ignore_errors=True)
        self.failed.mkdir()
        for k in kept:
            os.replace(k, self.failed / k.name)
        return self.failed / kept[0].name

    def __exit__(self, *exc) -> None:
        try:
            if not self.published:
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._lock.__exit__()
