"""The persistent store: bit-exact against the in-memory merger, integrity, locking, prototypes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from condu_merge import ContinualMerger, FormatError, NonFiniteError
from condu_merge.digests import default_algorithm, record_digest
from condu_merge.errors import DuplicateTaskError, KeyMismatchError, UnknownTaskError
from condu_merge.store import MANIFEST, Store, StoreLock, StoreLockedError

SHAPES = {"enc.weight": (33, 17), "enc.bias": (5,), "head.weight": (64, 40), "empty": (0, 3)}


def _deltas(n, shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return [{k: (0.5 * shared[k] + torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()} for _ in range(n)]


def _assert_same_session(st: Store, m: ContinualMerger):
    assert st.task_names == m.task_names
    for k, v in m.unified.items():
        assert torch.equal(st.unified_tensor(k), v), k
    for name in m.task_names:
        tr = m.trigger(name)
        assert st.rescaler_of(name) == tr.rescaler
        for k in tr.names:
            assert torch.equal(st.packed_mask(name, k), tr.packed[k]), (name, k)
        rec, ref = st.decouple(name), m.decouple(name)
        assert all(torch.equal(rec[k], ref[k]) for k in ref)


@pytest.mark.parametrize("rescaler", ["tensor_mean", "l1", "per_tensor"])
def test_streaming_add_task_is_bit_exact_with_the_merger(tmp_path, rescaler):
    m = ContinualMerger(rescaler=rescaler)
    st = Store(tmp_path / "s")
    for i, d in enumerate(_deltas(4)):
        m.add_task(f"t{i}", d)
        st.add_task(f"t{i}", d, rescaler=rescaler)
        _assert_same_session(Store(tmp_path / "s"), m)  # a fresh open, hashes verified
    assert st.rescaler == rescaler


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_round_trip(tmp_path, dtype):
    m = ContinualMerger()
    for i, d in enumerate(_deltas(3, dtype=dtype)):
        m.add_task(f"t{i}", d)
    m.save(tmp_path / "s")
    m2 = ContinualMerger.load(tmp_path / "s")
    assert all(v.dtype == dtype for v in m2.unified.values())
    _assert_same_session(Store(tmp_path / "s"), m)
    m2.add_task("t3", _deltas(1, dtype=dtype, seed=9)[0])  # the loaded merger is usable
    m.add_task("t3", _deltas(1, dtype=dtype, seed=9)[0])
    assert all(torch.equal(m.unified[k], m2.unified[k]) for k in SHAPES)


def test_save_load_and_continue_on_disk(tmp_path):
    ds = _deltas(4)
    m = ContinualMerger()
    for i, d in enumerate(ds[:2]):
        m.add_task(f"t{i}", d)
    m.save(tmp_path / "s")
    st = Store(tmp_path / "s")
    st.add_task("t2", ds[2])
    m.add_task("t2", ds[2])
    _assert_same_session(st, m)
    # save over an existing store replaces it as one new generation
    m.add_task("t3", ds[3])
    m.save(tmp_path / "s")
    _assert_same_session(Store(tmp_path / "s"), m)
    assert [n for n in os.listdir(tmp_path / "s") if n.startswith("gen-")] == [
        Store(tmp_path / "s").manifest["generation_dir"]
    ]


def test_masks_cost_one_bit_per_parameter_per_task(tmp_path):
    shapes = {"a": (512, 256), "b": (1000,), "c": (3, 7)}
    st = Store(tmp_path / "s")
    for i, d in enumerate(_deltas(3, shapes)):
        st.add_task(f"t{i}", d)
    params = sum(math.prod(s) for s in shapes.values())
    for rel in (t["masks"] for t in st.manifest["tasks"]):
        size = os.path.getsize(os.path.join(st.gen_dir, rel))
        header = 8 + int.from_bytes(open(os.path.join(st.gen_dir, rel), "rb").read(8), "little")
        assert size - header <= params / 8 * 1.01 + len(shapes)  # data: ceil(N/8) per tensor
        assert header < 1024  # the constant
    s = st.storage()
    assert abs(s["mask_bits_per_param"] - 1.0) < 0.01
    assert s["individual_bytes"] == 3 * params * 4


def test_rejected_task_leaves_store_unchanged(tmp_path):
    ds = _deltas(2)
    st = Store(tmp_path / "s")
    st.add_task("a", ds[0])
    before = json.loads((tmp_path / "s" / MANIFEST).read_text())
    bad = dict(ds[1])
    bad["head.weight"] = bad["head.weight"].clone()
    bad["head.weight"][3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match="head.weight"):
        st.add_task("b", bad)
    with pytest.raises(DuplicateTaskError):
        st.add_task("a", ds[1])
    with pytest.raises(KeyMismatchError, match="enc.bias"):
        st.add_task("c", {k: v for k, v in ds[1].items() if k != "enc.bias"})
    assert json.loads((tmp_path / "s" / MANIFEST).read_text()) == before
    assert sorted(n for n in os.listdir(tmp_path / "s") if n.startswith("gen-")) == [before["generation_dir"]]
    st2 = Store(tmp_path / "s")
    st2.add_task("b", ds[1])
    assert st2.task_names == ["a", "b"]


def test_unknown_task_and_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no condu-merge store"):
        ContinualMerger.load(tmp_path / "nothing")
    st = Store(tmp_path / "s")
    st.add_task("a", _deltas(1)[0])
    with pytest.raises(UnknownTaskError, match="'zz'"):
        st.decouple("zz")


# ---------------------------------------------------------------------------- integrity


def _store(tmp_path, n=3):
    m = ContinualMerger()
    for i, d in enumerate(_deltas(n)):
        m.add_task(f"t{i}", d)
    m.save(tmp_path / "s")
    return tmp_path / "s", Store(tmp_path / "s")


@pytest.mark.parametrize("target", ["unified.safetensors", "masks/0001.safetensors"])
def test_flipped_byte_is_refused_naming_the_file(tmp_path, target):
    root, st = _store(tmp_path)
    p = os.path.join(st.gen_dir, target)
    raw = bytearray(open(p, "rb").read())
    raw[-5] ^= 0x10
    open(p, "wb").write(bytes(raw))
    with pytest.raises(FormatError, match=target.replace("/", ".")):
        Store(root)
    with pytest.raises(FormatError, match=f"{default_algorithm()} mismatch"):  # the digest the store records
        ContinualMerger.load(root)
    Store(root, verify=False)  # the fast path skips hashes (sizes still match) ...
    st2 = Store(root, verify=False)
    # ... but a writer reading it still notices
    with pytest.raises(FormatError, match=f"{default_algorithm()} mismatch"):
        st2.add_task("t9", _deltas(1, seed=5)[0])
    assert Store(root, verify=False).task_names == ["t0", "t1", "t2"]


def test_truncated_and_missing_files(tmp_path):
    root, st = _store(tmp_path)
    p = os.path.join(st.gen_dir, "masks/0000.safetensors")
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:-3])
    with pytest.raises(FormatError, match="0000.safetensors.*truncated"):
        Store(root, verify=False)
    os.unlink(p)
    with pytest.raises(FormatError, match="0000.safetensors.*missing"):
        Store(root, verify=False)


def test_unknown_version_and_damaged_manifest(tmp_path):
    root, _ = _store(tmp_path)
    mp = root / MANIFEST
    good = mp.read_text()
    m = json.loads(good)
    m["version"] = 99
    mp.write_text(json.dumps(m))
    with pytest.raises(FormatError, match="manifest.json.*version 99"):
        Store(root)
    mp.write_text(good.replace('"t1"', '"tX"'))
    with pytest.raises(FormatError, match="manifest.json.*checksum"):
        Store(root)
    mp.write_text(good[: len(good) // 2])
    with pytest.raises(FormatError, match="manifest.json.*JSON"):
        Store(root)


def _edit(m: dict, path: str, value) -> dict:
    m = json.loads(json.dumps(m))
    *head, last = path.split(".")
    node = m
    for part in head:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return m


_DELETE = object()


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("generation_dir", "../../etc", "generation_dir '../../etc'"),
        ("generation_dir", 7, "generation_dir 7"),
        ("files", _DELETE, "files does not list"),
        ("tasks.1.masks", "../../outside.safetensors", "mask file '../../outside.safetensors'"),
        ("tasks.1.name", "t0", "'t0' is listed twice"),
        ("tasks.0.rescaler", "big", "rescaler 'big'"),
        ("tasks.0", "oops", "task #0 has no name"),
        ("tensors.0.dtype", "F99", "tensor entry"),
        ("tensors.0.shape", [-1, 3], "tensor entry"),
        ("rescaler", None, "rescaler None"),
    ],
)
def test_hand_edited_manifest_with_recomputed_checksum_is_refused(tmp_path, path, value, message):
    """A manifest someone edited and re-checksummed must fail with a FormatError naming the
    manifest and the field, never a KeyError/TypeError or a read outside the store."""
    from condu_merge.pipeline import manifest_checksum as _manifest_checksum

    root, _ = _store(tmp_path)
    mp = root / MANIFEST
    good = json.loads(mp.read_text())
    if path == "files":  # drop the unified delta's entry
        m = json.loads(json.dumps(good))
        del m["files"]["unified.safetensors"]
    else:
        m = _edit(good, path, value)
    m["checksum"] = _manifest_checksum(m)
    mp.write_text(json.dumps(m))
    with pytest.raises(FormatError) as info:
        Store(root)
    assert "manifest.json" in str(info.value) and message in str(info.value), str(info.value)


def test_second_writer_gets_a_clear_error(tmp_path):
    root, st = _store(tmp_path)
    before = (root / MANIFEST).read_text()
    with StoreLock(str(root)):  # another open file description: flock conflicts even in-process
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            Store(root).add_task("t9", _deltas(1, seed=3)[0])
        with pytest.raises(StoreLockedError):
            Store(root).save_prototypes("t0", {"p": torch.ones(2)})
        assert Store(root).task_names == ["t0", "t1", "t2"]  # readers are not blocked
    assert (root / MANIFEST).read_text() == before
    Store(root).add_task("t9", _deltas(1, seed=3)[0])


# ---------------------------------------------------------------------------- prototypes


def test_prototypes_are_stored_hashed_and_carried(tmp_path):
    root, st = _store(tmp_path)
    assert st.load_prototypes("t1") is None
    protos = {"mean": torch.randn(4, 8), "count": torch.tensor([3, 4], dtype=torch.int64)}
    st.save_prototypes("t1", protos)
    got = Store(root).load_prototypes("t1")
    assert set(got) == set(protos) and all(torch.equal(got[k], protos[k]) for k in protos)
    rel = Store(root).task_info("t1")["prototypes"]
    assert rel in Store(root).manifest["files"]
    st = Store(root)
    st.add_task("t3", _deltas(1, seed=11)[0])  # a new generation carries them
    got = Store(root).load_prototypes("t1")
    assert torch.equal(got["mean"], protos["mean"])
    st.save_prototypes("t1", {"mean": torch.zeros(1)})  # replacing
    assert torch.equal(Store(root).load_prototypes("t1")["mean"], torch.zeros(1))
    p = os.path.join(Store(root).gen_dir, rel)
    raw = bytearray(open(p, "rb").read())
    raw[-1] ^= 1
    open(p, "wb").write(bytes(raw))
    with pytest.raises(FormatError, match="prototypes"):
        Store(root)
    with pytest.raises(UnknownTaskError):
        Store(root, verify=False).save_prototypes("nope", {"x": torch.ones(1)})


def test_lazy_decouple_with_base(tmp_path):
    root, st = _store(tmp_path)
    m = ContinualMerger.load(root)
    g = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=g).to(torch.float64) for k, s in SHAPES.items()}
    base["extra.buffer"] = torch.arange(3)
    got = st.decouple("t2", base=base)
    ref = m.decouple("t2", base=base)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert got["enc.weight"].dtype == torch.float64


@pytest.mark.parametrize("step", ["commit:switched", "commit:cleanup"])
@pytest.mark.parametrize("op", ["add", "proto", "save"])
def test_interrupt_after_the_switch_keeps_the_new_generation(tmp_path, monkeypatch, step, op):
    """Ctrl-C (or any error) after manifest.json was replaced must not delete the generation it names."""
    import condu_merge.pipeline as pipeline_mod

    d = _deltas(3)
    st = Store(tmp_path / "s")
    st.add_task("t0", d[0])
    st.add_task("t1", d[1])

    def interrupt(name):
        if name == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_mod, "crash_point", interrupt)
    with pytest.raises(KeyboardInterrupt):
        if op == "add":
            st.add_task("t2", d[2])
        elif op == "proto":
            st.save_prototypes("t1", {"p": torch.arange(4.0)})
        else:
            m = ContinualMerger.load(tmp_path / "s")
            m.add_task("t2", d[2])
            m.save(tmp_path / "s")
    monkeypatch.undo()
    st2 = Store(tmp_path / "s")  # verify=True: the committed state loads, hashes checked
    if op == "proto":
        assert st2.task_names == ["t0", "t1"]
        assert torch.equal(st2.load_prototypes("t1")["p"], torch.arange(4.0))
    else:
        assert st2.task_names == ["t0", "t1", "t2"]
    st2.add_task("t3", _deltas(1, seed=5)[0])
    assert Store(tmp_path / "s").task_names[-1] == "t3"


def test_reader_opening_during_a_commit_retries_the_new_generation(tmp_path, monkeypatch):
    """A reader that read manifest.json just before a writer switched and removed the old
    generation must load the new state, not report a missing file."""
    import condu_merge.digests as store_mod  # where the load's file digests come from (check_record)

    d = _deltas(2)
    Store(tmp_path / "s").add_task("t0", d[0])
    real = store_mod.file_digest
    fired = []

    def sha_then_write(path, algo="sha256"):
        out = real(path, algo)
        if not fired:
            fired.append(1)
            monkeypatch.setattr(store_mod, "file_digest", real)
            Store(tmp_path / "s", verify=False).add_task("t1", d[1])  # old generation deleted now
        return out

    monkeypatch.setattr(store_mod, "file_digest", sha_then_write)
    st = Store(tmp_path / "s")
    assert fired and st.task_names == ["t0", "t1"]


def test_a_tensor_larger_than_the_chunk_is_merged_in_pieces_with_the_same_bytes(tmp_path, monkeypatch):
    """From checkpoints, a tensor of more than CHUNK_ELEMENTS elements is merged in pieces
    (ranged reads, part writes): u and every mask byte equal the whole-tensor merge's, the λ's
    agree to rounding, and the store stays loadable and verified."""
    from safetensors.torch import save_file

    import condu_merge.store as store_mod

    g = torch.Generator().manual_seed(4)
    base = {
        "big": torch.randn(1001, 37, generator=g),
        "small": torch.randn(5, generator=g),
    }  # 37,037 elements: not a multiple of 8
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in range(3):
        save_file(
            {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
            str(tmp_path / f"f{i}.safetensors"),
        )
    stores = {}
    for chunk in (1 << 22, 1000):  # whole, and 38 pieces of 1,000 elements (the last 37)
        monkeypatch.setattr(store_mod, "CHUNK_ELEMENTS", chunk)
        st = Store(tmp_path / f"s{chunk}")
        for i in range(3):
            st.add_task_from_checkpoints(
                f"t{i}", str(tmp_path / "base.safetensors"), str(tmp_path / f"f{i}.safetensors")
            )
        stores[chunk] = Store(tmp_path / f"s{chunk}", verify=True)
    whole, parts = stores[1 << 22], stores[1000]
    for k in ("big", "small"):
        assert torch.equal(whole.unified_tensor(k), parts.unified_tensor(k))
        for a, b in zip(whole.packed_masks(k), parts.packed_masks(k)):
            assert torch.equal(a, b)
    for t in whole.task_names:
        assert whole.task_info(t)["mask_bits"] == parts.task_info(t)["mask_bits"]
        assert whole.rescaler_of(t) == pytest.approx(parts.rescaler_of(t), rel=1e-12)


def test_distributed_step_merges_large_tensors_in_the_same_pieces(tmp_path, monkeypatch):
    """The distributed step (here in one process) folds a tensor larger than the chunk in the
    same pieces as the store, so its files are byte-identical and its λ's equal."""
    from safetensors.torch import save_file

    import condu_merge.store as store_mod
    from condu_merge.distributed import distributed_add_task_from_checkpoints

    monkeypatch.setattr(store_mod, "CHUNK_ELEMENTS", 1000)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    g = torch.Generator().manual_seed(5)
    base = {"big": torch.randn(9001, generator=g), "w": torch.randn(7, 3, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in range(2):
        save_file(
            {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
            str(tmp_path / f"f{i}.safetensors"),
        )
    for i in range(2):
        args = (f"t{i}", str(tmp_path / "base.safetensors"), str(tmp_path / f"f{i}.safetensors"))
        Store(tmp_path / "single").add_task_from_checkpoints(*args)
        distributed_add_task_from_checkpoints(tmp_path / "dist", *args)
    a, b = Store(tmp_path / "single", verify=True), Store(tmp_path / "dist", verify=True)
    assert {k: record_digest(v) for k, v in a.manifest["files"].items()} == {
        k: record_digest(v) for k, v in b.manifest["files"].items()
    }
    assert [a.rescaler_of(t) for t in a.task_names] == [b.rescaler_of(t) for t in b.task_names]
