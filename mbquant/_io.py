"""Writing safely: atomic files (temporary name, then rename), strict JSON, and the run-folder protocol.

A run (``mbquant ptq``/``qat``) never writes into its ``--out`` folder: it takes a lock beside it, writes into
a private staging folder beside it, and renames that folder to ``--out`` only when every artifact is verified
and the report written. An existing ``--out`` is refused unless the run may replace it (``--overwrite``),
and then it is replaced whole, only on success. Staging folders and locks left by killed runs (their process
is gone) are removed by the next run to the same ``--out``; a previous run caught half-replaced is put back.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .atomic import Lock, atomic_path, ensure_writable_dir, pid_alive, sha256_file, strict, write_bytes, write_json
from .errors import ConfigError, DataError

__all__ = ["Lock", "PlotFolder", "RunFolder", "atomic_path", "check_new_file", "check_outputs", "check_plot_dir",
           "ensure_writable_dir", "pid_alive", "recognised", "sha256_file", "strict", "write_bytes", "write_json",
           "write_record_file"]


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_outputs(outputs: dict[str, Path], inputs: dict[str, Path], *, kind: str | None = None,
                  overwrite: bool = False) -> None:
    """The one write rule, checked before any work: an output is never an input of the same command, never inside
    one, never holds one (replacing it would delete the input), and never another output; it is not empty or the
    current folder. A file output (``kind`` given) that exists is replaced only with ``overwrite`` and only when it is
    an earlier mbquant output of that kind (recognised by its record). Messages name both paths and the fix."""
    outs = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        if str(path).strip() == "":
            raise ConfigError(f"{flag} is empty; pass a path for the output")
        r = _resolved(path)
        if r == _resolved(Path.cwd()) or r == Path(r.anchor):
            raise ConfigError(f"{flag} '{path}' is {'the current folder' if r != Path(r.anchor) else 'the root'}, "
                              f"which mbquant cannot replace; pass a new folder for the output, e.g. {flag} runs/out")
        outs[flag] = r
    for flag, r in outs.items():
        for iflag, ipath in inputs.items():
            if ipath is None:
                continue
            i = _resolved(ipath)
            if _within(r, i) or _within(i, r):
                how = "is" if r == i else ("is inside" if _within(r, i) else "holds")
                raise ConfigError(f"{flag} '{outputs[flag]}' {how} {iflag} '{ipath}'; a command never writes onto, "
                                  f"into or over its own inputs: pass another {flag}")
        for oflag, o in outs.items():
            if oflag != flag and (_within(r, o) or _within(o, r)):
                raise ConfigError(f"{flag} '{outputs[flag]}' and {oflag} '{outputs[oflag]}' overlap; pass separate "
                                  f"folders for them")
        if kind is not None:
            _check_file_output(r, outputs[flag], flag, kind, overwrite)


def _check_file_output(r: Path, given: Path, flag: str, kind: str, overwrite: bool) -> None:
    from .records import kind_of

    if r.is_dir():
        raise ConfigError(f"{flag} '{given}' is a folder; pass a file path (e.g. '{given}/{kind.split('-')[-1]}.json')")
    if r.exists() or r.is_symlink():
        if not overwrite:
            raise ConfigError(f"{flag} '{given}' already exists; pass --overwrite to replace it (an earlier mbquant "
                              f"{kind.split('-')[-1]} only) or another {flag}")
        if r.is_symlink() or kind_of(r) != kind:
            raise ConfigError(f"{flag} '{given}' exists and is not an earlier mbquant {kind.split('-')[-1]} (no "
                              f"'{kind}' record in it); --overwrite replaces only that: move it away or pass another "
                              f"{flag}")
    ensure_writable_dir(r.parent, f"folder of {flag}")


def write_record_file(path: Path, doc: dict, *, kind: str, overwrite: bool = False, flag: str = "--out") -> Path:
    """Write a record file under the write rule (re-checked right before the atomic rename)."""
    _check_file_output(_resolved(path), path, flag, kind, overwrite)
    return write_json(Path(path), doc)


def check_new_file(path: Path, *, overwrite: bool, what: str, flag: str,
                   inputs: dict[str, Path] | None = None) -> Path:
    """A file a command will write at the end: checked before any work (not a folder, not one of the command's
    inputs, not silently replaced, its folder writable)."""
    path = Path(path)
    if str(path).strip() == "":
        raise ConfigError(f"{flag} is empty; pass a file path for the {what}")
    if path.is_dir():
        raise ConfigError(f"{flag} '{path}' is a folder; pass a file path for the {what} (e.g. '{path}/model.pth')")
    if inputs:
        check_outputs({flag: path}, inputs)
    if path.exists() and not overwrite:
        raise ConfigError(f"{flag} '{path}' already exists; pass --overwrite to replace it (when this run succeeds) "
                          f"or another {flag}")
    ensure_writable_dir(path.parent, f"folder of the {what}")
    return path


def check_plot_dir(plot_dir: Path, run_dir: Path) -> None:
    """A plot folder is new, empty, or one mbquant wrote plots to (its marker lists them); never a file."""
    from .records import paths

    if str(plot_dir).strip() == "":
        raise ConfigError("--plot-dir is empty; pass a folder for the PNGs")
    if plot_dir.exists() and not plot_dir.is_dir():
        raise ConfigError(f"--plot-dir '{plot_dir}' is a file; pass a folder for the PNGs")
    run = _resolved(run_dir)
    if _resolved(plot_dir) == run or _within(run, _resolved(plot_dir)):
        raise ConfigError(f"--plot-dir '{plot_dir}' is or holds the run folder '{run_dir}'; pass a folder of its own "
                          f"(default: RUN_DIR/plots)")
    if plot_dir.is_dir() and any(plot_dir.iterdir()) and not (plot_dir / paths.PLOT_MARKER).is_file():
        raise ConfigError(f"--plot-dir '{plot_dir}' holds files mbquant did not write (no {paths.PLOT_MARKER}); "
                          f"mbquant never overwrites your files: pass an empty or new folder")


class PlotFolder:
    """Where ``mbquant report --plot`` writes PNGs: each atomically, and a marker listing the ones mbquant wrote, so
    a later run may replace those and never anything else (see :func:`check_plot_dir`)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.written: list[str] = []

    def __enter__(self) -> "PlotFolder":
        from .records import paths

        ensure_writable_dir(self.root, "--plot-dir")
        marker = self.root / paths.PLOT_MARKER
        self.owned = set(marker.read_text().split()) if marker.is_file() else set()
        return self

    def path(self, name: str) -> Path:
        p = self.root / name
        if p.exists() and name not in self.owned:
            raise ConfigError(f"'{p}' exists and mbquant did not write it; mbquant never overwrites your files: move "
                              f"it away or pass another --plot-dir")
        self.written.append(name)
        return p

    def __exit__(self, *exc) -> None:
        from .records import paths

        names = sorted(self.owned | set(self.written))
        write_bytes(self.root / paths.PLOT_MARKER, ("\n".join(names) + "\n").encode())


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


def recognised(out: Path, kind: str) -> bool:
    """Whether folder ``out`` is an earlier mbquant output of ``kind`` (a run folder: its report; a bundle: its
    manifest), the only kind of folder ``--overwrite`` replaces."""
    from .records import RunReport, kind_of, paths, read_json

    marker = out / {"mbquant-report": paths.REPORT, "mbquant-bundle": paths.BUNDLE_MANIFEST}[kind]
    found = kind_of(marker)
    if found == kind:
        return True
    if kind == RunReport.KIND and found is None and marker.is_file():   # a report of format 1 (no format key)
        try:
            data = read_json(marker, "report", "")
        except DataError:
            return False
        return isinstance(data, dict) and RunReport.unversioned_v1(data)
    return False


class RunFolder:
    """The ``--out`` protocol (see the module doc). ``staging`` is where the run writes; ``work`` keeps what must
    survive a killed run (QAT's resumable checkpoint) until the run succeeds. ``kind`` is the record that marks
    the folder as this kind of mbquant output: ``--overwrite`` replaces nothing else."""

    def __init__(self, out: Path, *, overwrite: bool = False, resume: bool = False, kind: str = "mbquant-report",
                 flag: str = "--out"):
        from .records.paths import OutPaths

        self.out = Path(out)
        self.paths = OutPaths(self.out)
        self.overwrite, self.resume, self.kind, self.flag = overwrite, resume, kind, flag
        self.notes: list[str] = []
        self.published = False

    @property
    def parent(self) -> Path:
        return self.out.parent

    @property
    def work(self) -> Path:
        return self.paths.work

    @property
    def failed(self) -> Path:
        return self.paths.failed

    def __enter__(self) -> "RunFolder":
        what = "bundle" if self.kind == "mbquant-bundle" else "run"
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.flag} '{self.out}' is a file; pass a folder path for the {what}'s files")
        if self.out.exists() and not (self.overwrite or self.resume):
            raise ConfigError(f"{self.flag} '{self.out}' already exists (an earlier {what}?); pass --overwrite to "
                              f"replace it when this command succeeds, or another {self.flag}")
        if self.out.exists() and self.overwrite and not self.resume and not recognised(self.out, self.kind):
            from .records import paths

            marker = paths.BUNDLE_MANIFEST if what == "bundle" else paths.REPORT
            raise ConfigError(f"{self.flag} '{self.out}' exists and is not an earlier mbquant {what} (it holds no "
                              f"{marker} of mbquant's); --overwrite replaces only mbquant's own {what}s: move it "
                              f"away or pass another {self.flag}")
        ensure_writable_dir(self.parent, f"folder of {self.flag}")
        self._lock = Lock(self.paths.lock, f"'{self.out}'")
        self._lock.__enter__()
        if self._lock.stale:
            self.notes.append(self._lock.stale)
        try:
            self._recover()
            self.staging = self.paths.staging(os.getpid())
            self.staging.mkdir()
        except BaseException:
            self._lock.__exit__()
            raise
        return self

    def _recover(self) -> None:
        """Remove what killed runs left beside ``--out``; put back a previous run caught half-replaced."""
        from .records.paths import pid_of

        for p in self.paths.leftovers("old"):
            pid = pid_of(p)
            if pid is None or pid_alive(pid):
                continue
            if self.out.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, self.out)
                self.notes.append(f"put back the previous output in '{self.out}' (a command killed while replacing "
                                  f"it)")
        for p in self.paths.leftovers("staging"):
            pid = pid_of(p)
            if pid is not None and not pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)
                self.notes.append(f"removed '{p.name}', left by a killed run (pid {pid})")

    def publish(self) -> Path:
        """Move what must survive (``work``) in, then rename the staging folder to ``--out`` (replacing it)."""
        if self.work.exists():
            for f in self.work.iterdir():
                os.replace(f, self.staging / f.name)
            self.work.rmdir()
        old = self.paths.old(os.getpid())
        with _signals_held():  # Ctrl-C or SIGTERM between the two renames would leave no --out at all
            if self.out.exists():
                os.rename(self.out, old)
            os.rename(self.staging, self.out)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.failed, ignore_errors=True)
        self.published = True
        return self.out

    def fail(self) -> Path | None:
        """A run that failed a check: keep only its report, as ``<out>.failed/report.json``; no artifact."""
        from .records import paths

        kept = [self.staging / k for k in (paths.REPORT,) if (self.staging / k).exists()]
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
