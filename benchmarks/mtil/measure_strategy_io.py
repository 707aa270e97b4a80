"""Bytes an MTIL run writes under ``OUT/strategies`` (per session and in total).

    python -m benchmarks.mtil.measure_strategy_io --synthetic --synthetic-tasks 4 --out /tmp/io \\
        --methods zeroshot,condu,continual_ft,pam,magmax,task_arithmetic,ties,emr --quiet

Every checkpoint the script and the strategies write is atomic (a temporary file renamed over
its target with ``os.replace``), so wrapping ``os.replace`` sees every file that lands under
``OUT/strategies`` with its size at that moment. Instrumentation only: the run itself is
:func:`benchmarks.mtil.run_mtil.main`, unchanged. Prints one line per session and a JSON summary.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from . import run_mtil


def measure(argv: Sequence[str]) -> dict:
    """Run the MTIL script with ``argv`` and return ``{"sessions": [{task, bytes, files}], "total_bytes"}``
    for what was renamed into ``OUT/strategies`` (sub-folders included)."""
    out = os.path.abspath(argv[list(argv).index("--out") + 1])
    target = os.path.join(out, "strategies") + os.sep
    log: list[dict] = [{"task": None, "bytes": 0, "files": {}}]  # writes before the first session
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        d = os.path.abspath(os.fspath(dst))
        size = os.path.getsize(src) if d.startswith(target) and os.path.isfile(src) else None
        real_replace(src, dst, *a, **kw)
        if size is not None:
            cur = log[-1]
            cur["bytes"] += size
            rel = os.path.relpath(d, target[:-1])
            cur["files"][rel] = cur["files"].get(rel, 0) + size

    real_session = run_mtil.Runner.session

    def session(self, s):
        log.append({"task": self.tasks[s], "bytes": 0, "files": {}})
        return real_session(self, s)

    os.replace = replace
    run_mtil.Runner.session = session
    try:
        run_mtil.main(list(argv))
    finally:
        os.replace = real_replace
        run_mtil.Runner.session = real_session
    sessions = [e for e in log if e["task"] is not None or e["bytes"]]
    return {"sessions": sessions, "total_bytes": sum(e["bytes"] for e in sessions)}


def main(argv: Sequence[str] | None = None) -> int:
    res = measure(sys.argv[1:] if argv is None else argv)
    for i, e in enumerate(res["sessions"]):
        files = ", ".join(f"{k} {v}" for k, v in sorted(e["files"].items()))
        print(f"session {i} {e['task']}: {e['bytes']} bytes ({files})")
    print(f"total: {res['total_bytes']} bytes")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
