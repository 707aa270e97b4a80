"""Crash safety for real: a subprocess writing the store SIGKILLs itself at a named step
(``CONDU_MERGE_CRASH_AT``); the store must then load (hashes verified) as exactly the old or
exactly the new state, and the next writer must clean up and carry on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from condu_merge import ContinualMerger
from condu_merge.store import Store

GEN = """
import torch
SHAPES = {"a.weight": (40, 24), "a.bias": (24,), "b.weight": (300,)}
def deltas(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(n)]
"""
_ns: dict = {}
exec(GEN, _ns)
deltas = _ns["deltas"]

# One interpreter imports torch once, then forks a child per case (nothing has started torch's
# thread pools before the fork); each child sets the crash step and runs its write.
ZYGOTE = (
    GEN
    + """
import json, os, sys
from condu_merge import ContinualMerger
from condu_merge.store import CRASH_ENV, Store

def run(op, root):
    if op in ("add", "create"):
        Store(root).add_task("new", deltas(1, 99)[0])
    elif op == "proto":
        Store(root).save_prototypes("t1", {"p": torch.arange(6.0)})
    elif op == "save":
        m = ContinualMerger.load(root)
        m.add_task("new", deltas(1, 99)[0])
        m.save(root)

children = {}
for op, step, root in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.environ[CRASH_ENV] = step
            run(op, root)
            open(root + ".finished", "w").close()
        except BaseException as exc:
            print(f"{op} {step}: {exc!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    children[pid] = root
status = {}
for pid, root in children.items():
    _, st = os.waitpid(pid, 0)
    status[root] = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
print(json.dumps(status))
"""
)

BEFORE_SWITCH = ["write:start", "write:tensor", "write:data", "commit:tmp"]
AFTER_SWITCH = ["commit:switched", "commit:cleanup"]
CASES = (
    [("add", s) for s in BEFORE_SWITCH + AFTER_SWITCH]
    + [("create", "write:tensor"), ("create", "commit:switched")]
    + [("proto", "write:data"), ("proto", "commit:cleanup")]
    + [("save", "commit:tmp"), ("save", "commit:cleanup")]
)


def _old_session() -> ContinualMerger:
    m = ContinualMerger()
    for i, d in enumerate(deltas(3, 0)):
        m.add_task(f"t{i}", d)
    return m


def _same(st: Store, m: ContinualMerger) -> bool:
    if st.task_names != m.task_names:
        return False
    if not m.task_names:
        return True
    return all(torch.equal(st.unified_tensor(k), v) for k, v in m.unified.items()) and all(
        torch.equal(st.packed_mask(n, k), m.trigger(n).packed[k]) and st.rescaler_of(n) == m.trigger(n).rescaler
        for n in m.task_names
        for k in m.unified
    )


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    work = tmp_path_factory.mktemp("crash")
    template = work / "template"
    _old_session().save(template)
    jobs = []
    for op, step in CASES:
        root = work / f"{op}-{step.replace(':', '_')}"
        if op != "create":
            shutil.copytree(template, root)
        jobs.append((op, step, str(root)))
    p = subprocess.run([sys.executable, "-c", ZYGOTE, json.dumps(jobs)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    status = json.loads(p.stdout.strip().splitlines()[-1])
    return {
        (op, step): (Path(root), status[root], os.path.exists(root + ".finished"), p.stderr) for op, step, root in jobs
    }


@pytest.mark.parametrize("op,step", CASES, ids=[f"{o}-{s}" for o, s in CASES])
def test_killed_writer_leaves_old_or_new_state(crashed, op, step):
    root, rc, finished, stderr = crashed[(op, step)]
    assert rc == -signal.SIGKILL, f"child was not killed at {step}: rc={rc}\n{stderr[-2000:]}"
    assert not finished
    old = ContinualMerger() if op == "create" else _old_session()
    new = ContinualMerger() if op == "create" else _old_session()
    if op in ("add", "create", "save"):
        new.add_task("new", deltas(1, 99)[0])
    switched = step in AFTER_SWITCH
    st = Store(root)  # verify=True: every hash checked
    if op == "proto":
        protos = st.load_prototypes("t1")
        assert _same(st, old)
        if switched:
            assert torch.equal(protos["p"], torch.arange(6.0))
        else:
            assert protos is None
    else:
        assert _same(st, new if switched else old), f"{op} killed at {step}: store is neither the expected state"
    # the next writer removes the leftovers and works
    st.add_task("after", deltas(1, 5)[0])
    expect = new if switched else old
    expect.add_task("after", deltas(1, 5)[0])
    st2 = Store(root)
    assert _same(st2, expect)
    gens = [n for n in os.listdir(root) if n.startswith("gen-")]
    assert gens == [st2.manifest["generation_dir"]]
    assert not [n for n in os.listdir(root) if ".tmp" in n]
