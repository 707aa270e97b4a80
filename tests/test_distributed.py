"""Distributed add_task (gloo on CPU, 2 and 3 processes spawned here) against the single-process store.

Each multi-process case launches its ranks as subprocesses with torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``); one launch runs a
whole sequence of tasks, so the suite pays the interpreter start-up a few times only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from condu_merge.distributed import (
    CRASH_RANK_ENV,
    distributed_add_task,
    distributed_add_task_from_checkpoints,
    shard_by_bytes,
)
from condu_merge.errors import DuplicateTaskError, NonFiniteError
from condu_merge.safetensors_writer import TensorSpec, save_file_streaming
from condu_merge.store import CRASH_ENV, Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sizes chosen so that 2 and 3 ranks each get several tensors, including an empty one and
# one-element ones, in float32 and bfloat16
SHAPES = {
    "embed.weight": (96, 40),
    "block.0.attn.weight": (64, 40),
    "block.0.attn.bias": (64,),
    "block.0.mlp.weight": (120, 40),
    "block.0.norm.weight": (40,),
    "block.1.mlp.weight": (80, 40),
    "empty": (0, 3),
    "scalar": (1,),
    "head.weight": (10, 40),
}
BF16 = {"block.1.mlp.weight", "head.weight"}


def _model(gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    for k in BF16:
        out[k] = out[k].to(torch.bfloat16)
    out["position_ids"] = torch.arange(12)  # integer buffers do not take part
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A base and 4 fine-tuned checkpoints (sharing a direction, so masks overlap) plus one with a NaN."""
    d = tmp_path_factory.mktemp("ckpts")
    gen = torch.Generator().manual_seed(7)
    base = _model(gen)
    shared = _model(gen)
    save_file_streaming(base, d / "base.safetensors")
    paths = []
    for t in range(4):
        ft = {}
        for k, v in base.items():
            if v.is_floating_point():
                noise = torch.randn(v.shape, generator=gen)
                ft[k] = (v.float() + 0.05 * (0.6 * shared[k].float() + noise)).to(v.dtype)
            else:
                ft[k] = v
        save_file_streaming(ft, d / f"ft{t}.safetensors")
        paths.append(str(d / f"ft{t}.safetensors"))
    bad = dict(ft)
    bad["block.0.mlp.weight"] = bad["block.0.mlp.weight"].clone()
    bad["block.0.mlp.weight"][3, 5] = float("nan")
    save_file_streaming(bad, d / "nan.safetensors")
    return {"base": str(d / "base.safetensors"), "ft": paths, "nan": str(d / "nan.safetensors")}


def _single(store_dir, ckpts, n, **kw) -> None:
    with Store(store_dir, verify=False) as st:
        for t in range(n):
            st.add_task_from_checkpoints(f"task{t}", ckpts["base"], ckpts["ft"][t], **kw)


def _manifest(store_dir) -> dict:
    with open(os.path.join(store_dir, "manifest.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _assert_same_store(a, b) -> None:
    """Data files byte-identical (same sha256 and size), same rescalers and mask bits, and the
    distributed store loads (and verifies) in one process, decoupling to the same deltas."""
    ma, mb = _manifest(a), _manifest(b)
    assert ma["files"] == mb["files"]  # u and every mask file, bit for bit
    assert ma["tensors"] == mb["tensors"]
    assert [t["name"] for t in ma["tasks"]] == [t["name"] for t in mb["tasks"]]
    # exact, not just to rounding: the all-reduce adds each rank's disjoint per-tensor sums to zeros
    assert [t["rescaler"] for t in ma["tasks"]] == [t["rescaler"] for t in mb["tasks"]]
    assert [t["mask_bits"] for t in ma["tasks"]] == [t["mask_bits"] for t in mb["tasks"]]
    assert ma["base"] == mb["base"] and ma["selection"] == mb["selection"]
    with Store(a, verify=True) as sa, Store(b, verify=True) as sb:
        for task in sa.task_names:
            da, db = sa.decouple(task), sb.decouple(task)
            for k in da:
                assert torch.equal(da[k], db[k]), (task, k)


# ---------------------------------------------------------------------------- spawning ranks

_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from condu_merge.distributed import distributed_add_task_from_checkpoints
    spec = json.loads(sys.argv[1]); rank = int(sys.argv[2])
    results = []
    for op in spec["ops"]:
        try:
            r = distributed_add_task_from_checkpoints(spec["store"], op["name"], spec["base"], op["ft"], **op.get("kw", {}))
            results.append({"ok": True, "rescalers": r["rescalers"], "tensors": r["tensors_on_rank"], "world": r["world_size"]})
        except Exception as exc:
            results.append({"ok": False, "type": type(exc).__name__, "message": str(exc)})
        with open(spec["out"] + f"/rank{rank}.json", "w") as fh:
            json.dump(results, fh)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        CONDU_MERGE_DIST_TIMEOUT="60",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra or {})
    return env


def _launch(world: int, argv_of, *, extra_env=None, timeout: float = 80.0) -> list[subprocess.CompletedProcess]:
    """Start ``world`` ranks (``argv_of(rank)``), wait for all; returns their completed processes."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            argv_of(r),
            env=_env(r, world, port, (extra_env or {}).get(r)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _run_ops(world, store_dir, ckpts, ops, tmp_path, *, extra_env=None):
    spec = {"store": str(store_dir), "base": ckpts["base"], "ops": ops, "out": str(tmp_path)}
    procs = _launch(world, lambda r: [sys.executable, "-c", _WORKER, json.dumps(spec), str(r)], extra_env=extra_env)
    results = []
    for r, _p in enumerate(procs):
        path = tmp_path / f"rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return procs, results


# ---------------------------------------------------------------------------- sharding


def test_shard_by_bytes_is_balanced_complete_and_deterministic():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, 5000, (40,), generator=gen).tolist() + [0, 0, 1]
    specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i, n in enumerate(sizes)]
    for world in (1, 2, 3, 5, 64):
        parts = shard_by_bytes(specs, world)
        assert len(parts) == world
        assert sorted(i for p in parts for i in p) == list(range(len(specs)))  # each tensor exactly once
        assert all(p == sorted(p) for p in parts)  # store order within a rank
        loads = [sum(specs[i].nbytes for i in p) for p in parts]
        total, biggest = sum(loads), max(s.nbytes for s in specs)
        # greedy LPT: no rank exceeds the mean by more than one tensor
        assert max(loads) <= total / world + biggest
        assert parts == shard_by_bytes(list(specs), world)
    # by hand, bytes [5, 8, 4, 7, 6] onto 2 ranks, largest first: 8->r0, 7->r1, 6->r1 (7 < 8),
    # 5->r0 (8 < 13), 4->r0 (13 = 13: the lower rank) -> r0 holds tensors 0, 1, 2; r1 holds 3, 4
    hand = [TensorSpec(str(i), torch.uint8, (n,)) for i, n in enumerate([5, 8, 4, 7, 6])]
    assert shard_by_bytes(hand, 2) == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError):
        shard_by_bytes(hand, 0)


# ---------------------------------------------------------------------------- in-process (world size 1)


def test_world_one_matches_store_and_reports(ckpts, tmp_path):
    _single(tmp_path / "single", ckpts, 3)
    for t in range(3):
        r = distributed_add_task_from_checkpoints(tmp_path / "dist", f"task{t}", ckpts["base"], ckpts["ft"][t])
        assert r["world_size"] == 1 and r["tensors_on_rank"] == len(SHAPES)
    _assert_same_store(tmp_path / "single", tmp_path / "dist")
    with pytest.raises(DuplicateTaskError, match="task0"):
        distributed_add_task_from_checkpoints(tmp_path / "dist", "task0", ckpts["base"], ckpts["ft"][3])
    before = _manifest(tmp_path / "dist")
    with pytest.raises(NonFiniteError, match=r"block\.0\.mlp\.weight"):
        distributed_add_task_from_checkpoints(tmp_path / "dist", "bad", ckpts["base"], ckpts["nan"])
    assert _manifest(tmp_path / "dist") == before
    assert sorted(n for n in os.listdir(tmp_path / "dist") if n.startswith("gen-")) == [before["generation_dir"]]


def test_mapping_api_matches_store_add_task(tmp_path):
    gen = torch.Generator().manual_seed(3)
    deltas = [{k: torch.randn(s, generator=gen) for k, s in SHAPES.items()} for _ in range(3)]
    with Store(tmp_path / "a") as st:
        for i, d in enumerate(deltas):
            st.add_task(f"t{i}", d, rescaler="l1")
    for i, d in enumerate(deltas):
        distributed_add_task(tmp_path / "b", f"t{i}", d, rescaler="l1")
    _assert_same_store(tmp_path / "a", tmp_path / "b")


# ---------------------------------------------------------------------------- 2 and 3 ranks


@pytest.mark.parametrize(
    "world,kw",
    [(2, {}), (3, {"rescaler": "per_tensor", "exclude": ["head.*"]})],
    ids=["2-ranks-tensor_mean", "3-ranks-per_tensor"],
)
def test_ranks_match_single_process(ckpts, tmp_path, world, kw):
    _single(tmp_path / "single", ckpts, 3, **kw)
    ops = [{"name": f"task{t}", "ft": ckpts["ft"][t], "kw": kw if t == 0 else {}} for t in range(3)]
    ops.append({"name": "bad", "ft": ckpts["nan"]})  # a NaN in one rank's tensor fails every rank
    ops.append({"name": "task1", "ft": ckpts["ft"][3]})  # rank 0's planning refuses it: every rank hears
    procs, results = _run_ops(world, tmp_path / "dist", ckpts, ops, tmp_path)
    for r, p in enumerate(procs):
        assert p.returncode == 0, (r, p.stderr[-3000:])
    for r in range(world):
        assert [x["ok"] for x in results[r]] == [True, True, True, False, False]
        assert results[r][2]["world"] == world
        bad = results[r][3]
        assert bad["type"] == "NonFiniteError" and "block.0.mlp.weight" in bad["message"], bad
        dup = results[r][4]
        assert dup["type"] == "DuplicateTaskError" and "'task1'" in dup["message"], dup
        assert dup["message"].startswith("rank 0 failed: ") == (r != 0)
    # every rank got the same λ's; the work was split
    assert all(results[r][2]["rescalers"] == results[0][2]["rescalers"] for r in range(world))
    n_tensors = len(SHAPES) - (1 if "exclude" in kw else 0)
    assert sum(results[r][2]["tensors"] for r in range(world)) == n_tensors
    assert all(results[r][2]["tensors"] > 0 for r in range(world))
    _assert_same_store(tmp_path / "single", tmp_path / "dist")
    # the failed task left the 3-task state, and no half-written generation
    m = _manifest(tmp_path / "dist")
    assert [n for n in os.listdir(tmp_path / "dist") if n.startswith("gen-")] == [m["generation_dir"]]


def test_torchrun_cli_entry(ckpts, tmp_path):
    """``python -m condu_merge.distributed add-task`` under torchrun, onto a store created by one process."""
    _single(tmp_path / "single", ckpts, 2)
    _single(tmp_path / "dist", ckpts, 1)
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "condu_merge.distributed",
        "add-task",
        str(tmp_path / "dist"),
        "--base",
        ckpts["base"],
        "--finetuned",
        ckpts["ft"][1],
        "--name",
        "task1",
        "--json",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)  # rank 0 alone prints
    assert out["world_size"] == 2 and out["tasks"] == ["task0", "task1"]
    _assert_same_store(tmp_path / "single", tmp_path / "dist")


def test_killed_rank_leaves_old_state(ckpts, tmp_path):
    """Rank 1 of 2 is SIGKILLed after writing its first tensor: rank 0 fails (no hang),
    never switches the manifest, the 1-task store still loads and verifies, and the next writer
    (one process) cleans up and produces the same store as an uninterrupted run."""
    _single(tmp_path / "dist", ckpts, 1)
    before = _manifest(tmp_path / "dist")
    ops = [{"name": "task1", "ft": ckpts["ft"][1]}]
    procs, results = _run_ops(
        2,
        tmp_path / "dist",
        ckpts,
        ops,
        tmp_path,
        extra_env={1: {CRASH_ENV: "write:tensor", CRASH_RANK_ENV: "1"}},
    )
    assert procs[1].returncode == -9 and results[1] is None
    assert results[0] is not None and not results[0][0]["ok"], procs[0].stderr[-2000:]
    assert results[0][0]["type"] == "DistributedMergeError" and "lost contact" in results[0][0]["message"]
    assert _manifest(tmp_path / "dist") == before
    with Store(tmp_path / "dist", verify=True) as st:
        assert st.task_names == ["task0"]
        st.decouple("task0")
    # the next single-process writer takes the lock, removes the leftovers, and adds the task
    with Store(tmp_path / "dist") as st:
        st.add_task_from_checkpoints("task1", ckpts["base"], ckpts["ft"][1])
    _single(tmp_path / "single", ckpts, 2)
    _assert_same_store(tmp_path / "single", tmp_path / "dist")
    m = _manifest(tmp_path / "dist")
    assert [n for n in os.listdir(tmp_path / "dist") if n.startswith("gen-")] == [m["generation_dir"]]


# ---------------------------------------------------------------------------- command line (in-process)


def test_cli_namespace_contract_and_errors(ckpts, tmp_path, capsys):
    """``add_task_from_args`` accepts ``condu-merge add-task``'s parsed arguments (the CLI routes
    there under torchrun); the module entry prints one error line and exits 1 on bad input."""
    from condu_merge.cli import build_parser
    from condu_merge.distributed import add_task_from_args, distributed_add_task_main

    store = str(tmp_path / "s")
    args = build_parser().parse_args(
        ["add-task", store, "--base", ckpts["base"], "--finetuned", ckpts["ft"][0], "--name", "task0", "--json"]
    )
    assert add_task_from_args(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"] == ["task0"] and out["world_size"] == 1
    rc = distributed_add_task_main(
        [
            "add-task",
            store,
            "--base",
            ckpts["base"],
            "--finetuned",
            str(tmp_path / "missing.safetensors"),
            "--name",
            "x",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "missing.safetensors" in err and err.startswith("condu-merge: error: [rank 0]")
    _single(tmp_path / "single", ckpts, 1)
    _assert_same_store(tmp_path / "single", store)
