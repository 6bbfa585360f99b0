"""Files written atomically (a temporary name in the target's folder, then a rename): never a half-written
artifact, report or plot; strict JSON (non-finite floats are written as strings); and an exclusive lock file. The
lowest layer of mbquant's writers (records, data preparation and the run-folder protocol use it)."""
from __future__ import annotations

import contextlib
import json
import math
import os
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


def sha256_file(path: Path | str) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
