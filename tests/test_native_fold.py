"""The torch-free add-task (condu_merge.native_fold) against the torch fold: the same bytes, the
same errors, the same crash safety, and no torch in the process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from condu_merge import native_fold, store as store_mod
from condu_merge.checkpoints import SafetensorsFile
from condu_merge.errors import NonFiniteError
from condu_merge.kernels import native_backend as nb
from condu_merge.pipeline import open_task_delta
from condu_merge.safetensors_writer import StreamingSafetensorsWriter, TensorSpec
from condu_merge.store import CRASH_ENV, Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(nb._lib() is None, reason="the native kernels are not built")

# odd sizes: pieces that end inside a mask byte, a tensor smaller than a byte, an empty one
SHAPES = {"emb.weight": (61, 13), "blk.0.w": (40, 24), "blk.0.b": (7,), "blk.1.w": (300,), "empty": (0, 4)}
TIME_KEYS = ("added", "updated", "created", "checksum")


def _checkpoints(d, dtypes, tasks=3, seed=0, scale=0.02):
    """A base and ``tasks`` fine-tuned files; ``dtypes``: {name: torch dtype} (default float32);
    an integer tensor rides along (it never takes part)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(dtypes.get(k, torch.float32)) for k, s in SHAPES.items()}
    base["step"] = torch.arange(4)
    save_file(base, str(d / "base.safetensors"))
    fts = []
    for t in range(tasks):
        ft = {
            k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()
        }
        p = d / f"ft{t}.safetensors"
        save_file(ft, str(p))
        fts.append(p)
    return d / "base.safetensors", fts


def _scrub(m):
    m = json.loads(json.dumps(m))
    for k in TIME_KEYS:
        m.pop(k, None)
    for t in m["tasks"]:
        for k in TIME_KEYS:
            t.pop(k, None)
    return m


def _files(root):
    m = json.load(open(os.path.join(root, "manifest.json")))
    gen = os.path.join(root, m["generation_dir"])
    return {rel: open(os.path.join(gen, rel), "rb").read() for rel in m["files"]}


def _build(root, base, fts, monkeypatch, native: bool, expect_native: bool | None = None, **kw):
    monkeypatch.setenv(native_fold.NATIVE_FOLD_ENV, "1" if native else "0")
    calls = []
    real = native_fold.NativeFold.__call__

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(native_fold.NativeFold, "__call__", counted)
    st = Store(root)
    for t, ft in enumerate(fts):
        st.add_task_from_checkpoints(f"t{t}", base, ft, **kw)
    assert len(calls) == (len(fts) if (native if expect_native is None else expect_native) else 0)
    return st


@pytest.mark.parametrize(
    "dtypes",
    [
        {},
        dict.fromkeys(SHAPES, torch.float16),
        dict.fromkeys(SHAPES, torch.bfloat16),
        {"emb.weight": torch.bfloat16, "blk.1.w": torch.float16},  # one store, three dtypes
    ],
    ids=["f32", "f16", "bf16", "mixed"],
)
@pytest.mark.parametrize("chunk", [1 << 22, 64], ids=["whole", "pieces"])
def test_native_fold_writes_the_torch_folds_bytes(tmp_path, monkeypatch, dtypes, chunk):
    monkeypatch.setattr(store_mod, "CHUNK_ELEMENTS", chunk)
    base, fts = _checkpoints(tmp_path, dtypes)
    a = _build(tmp_path / "native", base, fts, monkeypatch, True, rescaler="per_tensor" if chunk == 64 else None)
    b = _build(tmp_path / "torch", base, fts, monkeypatch, False, rescaler="per_tensor" if chunk == 64 else None)
    assert _files(a.root) == _files(b.root)
    assert _scrub(a.manifest) == _scrub(b.manifest)
    assert Store(a.root).verify().files > 0


def _shard(path, folder):
    """``path`` rewritten as a two-shard checkpoint with its ``model.safetensors.index.json``."""
    sd = SafetensorsFileDict(path)
    folder.mkdir()
    keys = list(sd)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in parts.items():
        save_file({k: sd[k] for k in ks}, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in parts.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder / "model.safetensors.index.json"


def test_sharded_checkpoints_take_the_native_fold_with_the_same_bytes(tmp_path, monkeypatch):
    base, fts = _checkpoints(tmp_path, {"emb.weight": torch.bfloat16}, tasks=2)
    sbase = _shard(base, tmp_path / "base")
    sfts = [_shard(f, tmp_path / f"ft{i}") for i, f in enumerate(fts)]
    a = _build(tmp_path / "native", sbase, sfts, monkeypatch, True, progress=True)  # with a bar too
    b = _build(tmp_path / "torch", sbase, sfts, monkeypatch, False)
    assert _files(a.root) == _files(b.root)
    assert _scrub(a.manifest) == _scrub(b.manifest)
    # the same tensors as single files (the store keeps the index's order: compare per tensor)
    c = _build(tmp_path / "single", base, fts, monkeypatch, True)
    assert sorted(a.keys) == sorted(c.keys)
    for k in a.keys:
        assert torch.equal(a.unified_tensor(k), c.unified_tensor(k))
        assert all(torch.equal(a.packed_mask(t, k), c.packed_mask(t, k)) for t in a.task_names)
    # a shard that is not safetensors sends the task to the torch fold
    shard2 = tmp_path / "ft0" / "model-00002-of-00002.safetensors"
    torch.save(SafetensorsFileDict(shard2), tmp_path / "ft0" / "model-00002-of-00002.bin")
    shard2.unlink()
    idx = json.loads(sfts[0].read_text())
    idx["weight_map"] = {
        k: v.replace(".safetensors", ".bin") if v.startswith("model-00002") else v for k, v in idx["weight_map"].items()
    }
    sfts[0].write_text(json.dumps(idx))
    td = open_task_delta(sbase, sfts[0])
    try:
        assert "not a safetensors file" in native_fold.unsupported(
            "auto", td, [TensorSpec("blk.1.w", "F32", (300,))], 0
        )
    finally:
        td.close()


def test_the_cli_add_task_runs_without_torch(tmp_path):
    base, fts = _checkpoints(tmp_path, {"emb.weight": torch.bfloat16}, tasks=2)
    root = tmp_path / "store"
    code = (
        "import sys; from condu_merge.cli import main; "
        f"rc = [main(['add-task', {str(root)!r}, '--base', {str(base)!r}, '--finetuned', f, '--name', n, '-q']) "
        f"for n, f in (('a', {str(fts[0])!r}), ('b', {str(fts[1])!r}))]; "
        "assert rc == [0, 0], rc; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numba')); "
        "assert not bad, bad[:5]"
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    st = Store(root)
    assert st.task_names == ["a", "b"] and st.verify().files > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 22, 64], ids=["whole", "pieces"])
def test_a_nan_is_refused_as_by_the_torch_fold_and_the_store_is_unchanged(tmp_path, monkeypatch, dtype, chunk):
    monkeypatch.setattr(store_mod, "CHUNK_ELEMENTS", chunk)
    base, fts = _checkpoints(tmp_path, dict.fromkeys(SHAPES, dtype), tasks=2)
    bad = {k: v.clone() for k, v in SafetensorsFileDict(fts[1]).items()}
    bad["blk.0.w"].view(-1)[700] = float("nan")  # in the second piece of 64
    save_file(bad, str(fts[1]))
    msgs = []
    for native in (True, False):
        root = tmp_path / f"s{native}"
        monkeypatch.setenv(native_fold.NATIVE_FOLD_ENV, "1" if native else "0")
        st = Store(root)
        st.add_task_from_checkpoints("t0", base, fts[0])
        before, files = json.load(open(root / "manifest.json")), _files(root)
        with pytest.raises(NonFiniteError) as e:
            st.add_task_from_checkpoints("t1", base, fts[1])
        msgs.append(str(e.value))
        assert json.load(open(root / "manifest.json")) == before and _files(root) == files
        assert sorted(p.name for p in root.iterdir() if p.name.startswith("gen-")) == [before["generation_dir"]]
    assert msgs[0] == msgs[1] and "'blk.0.w'" in msgs[0] and "flat index 700" in msgs[0], msgs


def SafetensorsFileDict(path):
    with SafetensorsFile(path) as f:
        return {k: f.get(k) for k in f.keys()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_delta_that_overflows_the_half_type_is_refused_as_by_the_torch_fold(tmp_path, monkeypatch, dtype):
    base, fts = _checkpoints(tmp_path, dict.fromkeys(SHAPES, dtype), tasks=1)
    b, f = SafetensorsFileDict(base), SafetensorsFileDict(fts[0])
    big = torch.finfo(dtype).max
    # both finite, and so is their float32 difference (bfloat16's range is float32's: max (1 + 2^-8)
    # still is), but it rounds to Inf in the dtype
    b["blk.1.w"][5], f["blk.1.w"][5] = (-big, big) if dtype == torch.float16 else (-big * 2**-8, big)
    save_file(b, str(base))
    save_file(f, str(fts[0]))
    msgs = []
    for native in (True, False):
        monkeypatch.setenv(native_fold.NATIVE_FOLD_ENV, "1" if native else "0")
        with pytest.raises(NonFiniteError) as e:
            Store(tmp_path / f"s{native}").add_task_from_checkpoints("t0", base, fts[0])
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "overflows" in msgs[0], msgs


def test_what_the_native_fold_does_not_take_goes_to_the_torch_fold(tmp_path, monkeypatch):
    base, fts = _checkpoints(tmp_path, {"blk.0.w": torch.float64}, tasks=1)
    td = open_task_delta(base, fts[0])
    try:
        f32 = [TensorSpec("blk.1.w", "F32", (300,))]
        assert native_fold.unsupported("auto", td, f32, 0) is None
        assert native_fold.unsupported("native", td, f32, 0) is None
        assert "backend" in native_fold.unsupported("torch", td, f32, 0)
        assert "float64" in native_fold.unsupported("auto", td, [TensorSpec("blk.0.w", "F64", (40, 24))], 0)
        assert "cast" in native_fold.unsupported("auto", td, [TensorSpec("blk.1.w", "BF16", (300,))], 0)
        assert "earlier tasks" in native_fold.unsupported("auto", td, f32, nb.MAX_EARLIER_TASKS + 1)
        monkeypatch.setenv(native_fold.NATIVE_FOLD_ENV, "0")
        assert native_fold.unsupported("auto", td, f32, 0) is not None
    finally:
        td.close()
    # a store kept in bfloat16 from float32 checkpoints: every task is cast, so the torch fold runs
    st = _build(tmp_path / "cast", base, [fts[0]], monkeypatch, True, False, dtype=torch.bfloat16, exclude=["blk.0.w"])
    assert {t["dtype"] for t in st.manifest["tensors"]} == {"BF16"}


def test_numpy_buffers_write_the_same_file_as_tensors(tmp_path):
    t = torch.randn(37).to(torch.bfloat16)
    m = torch.randint(0, 255, (5,), dtype=torch.uint8)
    specs = [TensorSpec("t", torch.bfloat16, (37,)), TensorSpec("m", "U8", (5,))]
    for name, vals in (("a", [t, m]), ("b", [t.view(torch.int16).numpy(), m.numpy()])):
        with StreamingSafetensorsWriter(tmp_path / f"{name}.safetensors", specs) as w:
            for s, v in zip(specs, vals):
                w.write(s.name, v)
            w.close()
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with StreamingSafetensorsWriter(tmp_path / "c.safetensors", specs) as w, pytest.raises(ValueError, match="'t'"):
        w.write("t", np.zeros(37, np.float32))  # 4-byte elements for a 2-byte dtype
    with SafetensorsFile(tmp_path / "a.safetensors") as f:
        row = np.empty(3, np.uint8)
        assert f.get_bytes("m", 1, 4, out=row) is row and row.tolist() == m[1:4].tolist()
        assert f.get_bytes("t").view(np.uint16).tolist() == t.view(torch.int16).numpy().view(np.uint16).tolist()


@pytest.mark.parametrize("step, state", [("write:tensor", "old"), ("commit:switched", "new")])
def test_a_native_fold_killed_leaves_a_loadable_store(tmp_path, step, state):
    base, fts = _checkpoints(tmp_path, {"emb.weight": torch.float16}, tasks=3)
    root = tmp_path / "store"
    st = Store(root)
    st.add_task_from_checkpoints("t0", base, fts[0])
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), CRASH_ENV: step}
    cmd = [sys.executable, "-m", "condu_merge", "add-task", str(root), "--base", str(base), "--name", "t1", "-q"]
    r = subprocess.run([*cmd, "--finetuned", str(fts[1])], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    st = Store(root)  # verifies every hash
    assert st.task_names == (["t0"] if state == "old" else ["t0", "t1"])
    env.pop(CRASH_ENV)
    cmd[-2] = "t2"
    r = subprocess.run([*cmd, "--finetuned", str(fts[2])], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    st = Store(root)
    assert st.task_names[-1] == "t2" and st.verify().files > 0
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("gen-")) == [st.manifest["generation_dir"]]


def _addr(x: np.ndarray) -> int:
    return int(x.__array_interface__["data"][0])  # keeps no reference to x (x.ctypes would)


def test_the_buffer_pool_reuses_a_buffer_only_once_nothing_refers_to_it():
    pool = native_fold.BufferPool(limit=3000)
    a = pool.take(1000)
    addr_a = _addr(a)
    held = memoryview(a[10:20])  # as a background hash job holds the bytes it was handed
    del a
    b = pool.take(1000)
    addr_b = _addr(b)
    assert addr_b != addr_a  # a's buffer is still referred to
    del b
    c = pool.take(600)
    assert _addr(c) == addr_b and c.nbytes == 600  # b's is free: reused
    del c, held
    d = pool.take(1000)
    assert _addr(d) in (addr_a, addr_b) and len(pool._bufs) == 2
    e = pool.take(2500)  # none fits: a new one; over the limit, the free buffer goes, those in use stay
    assert sorted(_addr(x) for x in pool._bufs) == sorted([_addr(d), _addr(e)])


def test_torch_is_imported_on_first_use_and_then_bound_directly():
    code = (
        "import sys, condu_merge.store as st, condu_merge.core as core, condu_merge._lazy as lazy; "
        "assert 'torch' not in sys.modules and st.torch is lazy.torch and core.torch is lazy.torch; "
        "z = st.torch.zeros(3); import torch; "
        "assert st.torch is torch and core.torch is torch and z.tolist() == [0.0, 0.0, 0.0]; "
        "assert lazy.torch.ones(1).item() == 1.0"  # a later access through the stand-in still works
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _ordered_shards(path, folder):
    """``path`` as two safetensors shards written in the index's order (so reading the index's
    tensors in turn reads each shard front to back)."""
    sd = SafetensorsFileDict(path)
    folder.mkdir()
    keys = list(sd)
    parts = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    for name, ks in parts.items():
        specs = [TensorSpec(k, sd[k].dtype, tuple(sd[k].shape)) for k in ks]
        with StreamingSafetensorsWriter(folder / name, specs) as w:
            for k in ks:
                w.write(k, sd[k])
            w.close()
    index = {"metadata": {}, "weight_map": {k: name for name, ks in parts.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder / "model.safetensors.index.json"


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_a_sharded_base_is_hashed_from_the_merges_own_read(tmp_path, monkeypatch, native):
    from condu_merge import checkpoints
    from condu_merge.checkpoints import ShardedCheckpoint, checkpoint_identity
    from condu_merge.errors import MergeInputError

    base, fts = _checkpoints(tmp_path, {"emb.weight": torch.bfloat16}, tasks=3)
    sbase = _ordered_shards(base, tmp_path / "base")
    hashed = []
    real = checkpoints.file_digest
    monkeypatch.setattr(checkpoints, "file_digest", lambda p, algo="sha256", *a: hashed.append(p) or real(p, algo, *a))
    st = _build(tmp_path / "store", sbase, fts[:2], monkeypatch, native)
    # the shards were hashed as the merge read them: a second pass only over the small index file
    assert {os.path.basename(p) for p in hashed} == {"model.safetensors.index.json"}
    rec = st.manifest["base"]
    algo = next(k for k in rec if k not in ("path", "bytes"))
    ck = ShardedCheckpoint(sbase)
    assert rec == checkpoint_identity(ck, algo)  # the same identity as hashing every file
    ck.close()
    shard = tmp_path / "base" / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 1  # one bit of the last tensor: same size, another digest
    shard.write_bytes(bytes(data))
    with pytest.raises(MergeInputError, match="differs from the one|was modified"):
        st.add_task_from_checkpoints("t2", sbase, fts[2])
    assert st.task_names == ["t0", "t1"]


def test_many_tasks_reopened_files_and_the_64_task_bound(tmp_path, monkeypatch):
    """Past 64 data files a generation's files are reopened per append (ReopeningWriter) and its
    readers too; past 64 earlier tasks the native kernels stop and the torch fold goes on."""
    from condu_merge.pipeline import KEEP_OPEN_FILES

    base, fts = _checkpoints(tmp_path, {"blk.0.w": torch.float16}, tasks=nb.MAX_EARLIER_TASKS + 2, scale=0.05)
    calls = []
    real = native_fold.NativeFold.__call__
    monkeypatch.setattr(
        native_fold.NativeFold, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    root = tmp_path / "store"
    st = Store(root)
    for t, ft in enumerate(fts[:-3]):
        st.add_task_from_checkpoints(f"t{t}", base, ft)
    assert len(calls) == len(fts) - 3
    snap = tmp_path / "snap"
    import shutil

    shutil.copytree(root, snap)
    stores = {}
    for native in (True, False):
        monkeypatch.setenv(native_fold.NATIVE_FOLD_ENV, "1" if native else "0")
        r = tmp_path / f"s{native}"
        shutil.copytree(snap, r)
        calls.clear()
        s = Store(r)
        for t in range(len(fts) - 3, len(fts)):
            s.add_task_from_checkpoints(f"t{t}", base, fts[t])
        # tasks 64 and 65 (63 and 64 earlier) natively; task 66 (65 earlier) in the torch fold
        assert len(calls) == (2 if native else 0)
        stores[native] = s
    assert len(stores[True].task_names) + 1 > KEEP_OPEN_FILES  # u + a mask file per task
    assert _files(stores[True].root) == _files(stores[False].root)
    assert Store(stores[True].root).verify().files == len(fts) + 1
