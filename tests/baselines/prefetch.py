"""Run flows of :mod:`tests.baselines.flows` in a background process while the test session runs other tests (the
machines here have two cores; a flow is mostly single-threaded lowering and Python).

    python -m tests.baselines.prefetch DATA WORKDIR KEY:IMAGES [KEY:IMAGES ...]

Each flow's run folder is WORKDIR/<key>.<images>; when the flow ends, WORKDIR/<key>.<images>.rc holds its exit code
(the folder itself appears only complete: the run-folder protocol publishes by rename). Output goes to
WORKDIR/prefetch.log. The test session's FlowRuns waits for a flow it handed here instead of running it again.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from mbquant.cli import main as cli

from .flows import FLOWS


def main(argv: list[str]) -> int:
    data, work = Path(argv[0]), Path(argv[1])
    with open(work / "prefetch.log", "a") as log, contextlib.redirect_stdout(log):
        for item in argv[2:]:
            key, images = item.rsplit(":", 1)
            out = work / f"{key}.{images}"
            try:
                rc = cli(FLOWS[key].argv(data, out, int(images), threads=2))
            except BaseException as exc:       # a crash is reported to the waiting test, not swallowed
                print(f"{key}.{images}: {type(exc).__name__}: {exc}", file=log, flush=True)
                rc = 99
            (work / f"{key}.{images}.rc").write_text(str(rc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
