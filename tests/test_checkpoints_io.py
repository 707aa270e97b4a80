"""The fast I/O pieces of checkpoints/safetensors_writer: digest choice (sha256 | blake3),
background write+hash (OrderedWorker), tensors in parts (get_range / delta_range / write_part),
and the one-pass half-type delta -- each against a plain reference."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

from condu_merge import checkpoints
from condu_merge.checkpoints import (
    MemoryCheckpoint,
    OrderedWorker,
    SafetensorsFile,
    ShardedCheckpoint,
    TaskDelta,
    element_ranges,
    file_digest,
    new_hasher,
    record_digest,
    sha256_file,
)
from condu_merge.errors import FormatError, NonFiniteError
from condu_merge.safetensors_writer import StreamingSafetensorsWriter, TensorSpec, save_file_streaming


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(37, 11, generator=g),
        "b": torch.randn(13, generator=g).bfloat16(),
        "m": torch.randint(0, 255, (29,), generator=g, dtype=torch.uint8),
        "e": torch.zeros(0),
        "c": torch.randn(5, 3, generator=g).half(),
    }


def _specs(sd):
    return [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]


# ---------------------------------------------------------------------------- digests


def test_digests_match_the_reference_libraries(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(os.urandom(3 * (1 << 20) + 17))
    assert file_digest(p) == sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="unknown hash algorithm 'md5'"):
        new_hasher("md5")
    blake3 = pytest.importorskip("blake3")
    assert file_digest(p, "blake3") == blake3.blake3(p.read_bytes()).hexdigest()


def test_record_digest_reads_old_and_new_records():
    assert record_digest({"bytes": 3, "sha256": "aa"}) == ("sha256", "aa")
    assert record_digest({"bytes": 3, "blake3": "bb"}) == ("blake3", "bb")
    assert record_digest({"bytes": 3, "sha256": "aa", "blake3": "bb"}) == ("blake3", "bb")
    with pytest.raises(FormatError, match="masks/task_000.safetensors: records no digest"):
        record_digest({"bytes": 3, "sha256": 5}, "masks/task_000.safetensors")


@pytest.mark.parametrize("algo", ["sha256", "blake3"])
@pytest.mark.parametrize("background", [False, True])
def test_writer_digest_and_bytes(tmp_path, algo, background):
    if algo == "blake3":
        pytest.importorskip("blake3")
    sd = _sd()
    ref = tmp_path / "ref.safetensors"
    save_file_streaming(sd, ref)
    p = tmp_path / "x.safetensors"
    with OrderedWorker(max_pending_bytes=64) as worker:  # tiny bound: submit waits on the thread
        w = StreamingSafetensorsWriter(p, _specs(sd), hash_algo=algo, worker=worker if background else None)
        for k, v in sd.items():
            w.write(k, v)
        digest, size = w.close()
    assert p.read_bytes() == ref.read_bytes()
    assert digest == file_digest(p, algo) and size == p.stat().st_size


def test_write_part_gives_the_bytes_of_whole_writes(tmp_path):
    sd = _sd(1)
    ref = tmp_path / "ref.safetensors"
    sha_ref, _ = save_file_streaming(sd, ref)
    p = tmp_path / "parts.safetensors"
    w = StreamingSafetensorsWriter(p, _specs(sd))
    for k, v in sd.items():
        flat = v.reshape(-1)
        for s, e in element_ranges(flat.numel(), 16):
            w.write_part(k, flat[s:e])
    sha, _ = w.close()
    assert p.read_bytes() == ref.read_bytes() and sha == sha_ref
    back = load_file(str(p))
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_write_part_refuses_what_does_not_fit(tmp_path):
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a", torch.float32, (10,))])
    w.write_part("a", torch.zeros(6))
    with pytest.raises(ValueError, match="remaining 4 elements"):
        w.write_part("a", torch.zeros(5))
    with pytest.raises(ValueError, match="partly written"):
        w.write("a", torch.zeros(10))
    with pytest.raises(ValueError, match="remaining 4 elements"):
        w.write_part("a", torch.zeros(4, dtype=torch.float64))
    w.write_part("a", torch.zeros(4))
    w.close()


def test_background_write_error_reaches_the_caller(tmp_path, monkeypatch):
    real = StreamingSafetensorsWriter._put
    calls = []

    def full(self, data):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(StreamingSafetensorsWriter, "_put", full)
    sd = _sd()
    p = tmp_path / "x.safetensors"
    with OrderedWorker() as worker:
        w = StreamingSafetensorsWriter(p, _specs(sd), worker=worker)
        with pytest.raises(OSError, match="No space left"):
            for k, v in sd.items():
                w.write(k, v)
            w.close()
        w.abort()
    assert not p.exists()
    assert set(calls) == {"condu-merge-io"}  # the writes ran in the worker thread


def test_ordered_worker_keeps_order_and_bounds_pending():
    seen, gate = [], threading.Event()
    with OrderedWorker(max_pending_bytes=10) as w:
        w.submit(gate.wait, 100)  # one job is accepted whatever its size
        t = threading.Thread(target=lambda: [w.submit(lambda i=i: seen.append(i), 4) for i in range(5)])
        t.start()
        t.join(0.2)
        assert t.is_alive() and seen == []  # blocked: 100 bytes pending over a bound of 10
        gate.set()
        t.join(5)
        w.drain()
    assert seen == list(range(5))
    w2 = OrderedWorker()
    w2.submit(lambda: 1 / 0)
    w2.submit(lambda: seen.append("skipped"))
    with pytest.raises(ZeroDivisionError):
        w2.drain()
    w2.close()
    assert "skipped" not in seen


# ---------------------------------------------------------------------------- reading in parts


@pytest.mark.parametrize("algo", ["sha256", "blake3"])
@pytest.mark.parametrize("background", [False, True])
def test_get_range_and_sequential_digest(tmp_path, algo, background):
    if algo == "blake3":
        pytest.importorskip("blake3")
    sd = _sd(2)
    p = tmp_path / "x.safetensors"
    save_file_streaming(sd, p)
    worker = OrderedWorker(max_pending_bytes=32) if background else None
    with SafetensorsFile(p, hash_algo=algo, hash_worker=worker) as f:
        assert f.reads_are_private is not background
        for k, v in sd.items():
            flat = v.reshape(-1)
            for s, e in element_ranges(flat.numel(), 24):
                got = f.get_range(k, s, e)
                assert got.dtype == v.dtype and torch.equal(got, flat[s:e]), (k, s, e)
        assert f.sequential_digest() == file_digest(p, algo)
        assert f.sequential_sha256() == (file_digest(p) if algo == "sha256" else None)
        with pytest.raises(ValueError, match="outside tensor 'a'"):
            f.get_range("a", 5, 10_000)
    if worker is not None:
        worker.close()


def test_set_hash_only_before_the_first_read(tmp_path):
    pytest.importorskip("blake3")
    p = tmp_path / "x.safetensors"
    save_file_streaming(_sd(3), p)
    with SafetensorsFile(p, keep_open=False) as f:
        f.set_hash("blake3")
        for k in f.keys()[1:]:  # the first tensor is skipped: hashed on demand
            f.get(k)
        assert f.sequential_digest() == file_digest(p, "blake3")
        with pytest.raises(RuntimeError, match="before the first read"):
            f.set_hash("sha256")


def test_element_ranges_split_masks_on_bytes():
    for n, step in [(0, 8), (1, 8), (8, 8), (100, 24), (101, 30), (7, 3)]:
        r = list(element_ranges(n, step))
        assert r[0][0] == 0 and r[-1][1] == n
        assert all((a % 8 == 0 and a < b) or n == 0 for a, b in r)
        assert all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))
        assert all(b - a <= max(8, step - step % 8) for a, b in r)


# ---------------------------------------------------------------------------- deltas


def _pair(dtype, n=3000, seed=4):
    g = torch.Generator().manual_seed(seed)
    # exponents over a wide range, so subtraction rounds (and double-rounds) in every way
    top = torch.finfo(dtype).max / 4 if dtype.itemsize == 2 else 1e30
    b = (torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))).clamp(-top, top).to(dtype)
    f = (b.float() + torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))).clamp(-top, top)
    return b, f.to(dtype)


@pytest.fixture(params=["native", "torch blocks"])
def delta_path(request, monkeypatch):
    """Both ways a delta is computed: the native kernel where built, and torch in blocks."""
    if request.param != "native":
        monkeypatch.setattr(checkpoints, "_native_subtract", lambda f, b, out: None)
    else:
        from condu_merge.kernels.native_backend import subtract

        x = torch.ones(9, dtype=torch.bfloat16)
        if subtract(x, x, x.clone()) is None:
            pytest.skip("the native kernels are not built here")
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_delta_is_bit_identical_to_the_float32_reference(tmp_path, dtype, monkeypatch, delta_path):
    monkeypatch.setattr(checkpoints, "_HALF_BLOCK", 1024)  # several blocks, a short last one
    b, f = _pair(dtype)
    f[:3] = torch.finfo(dtype).max  # exactly at the edge, not beyond: f - b finite here
    b[:3] = torch.finfo(dtype).max / 2
    save_file_streaming({"w": b.reshape(60, 50)}, tmp_path / "b.safetensors")
    save_file_streaming({"w": f.reshape(60, 50)}, tmp_path / "f.safetensors")
    ref = (f.float() - b.float()).to(dtype)
    assert bool(torch.isfinite(ref).all())
    td = TaskDelta(SafetensorsFile(tmp_path / "b.safetensors"), SafetensorsFile(tmp_path / "f.safetensors"))
    got = td.delta("w", dtype)
    assert got.shape == (60, 50) and torch.equal(got.reshape(-1).view(torch.int16), ref.view(torch.int16))
    mem = TaskDelta(MemoryCheckpoint({"w": b}), MemoryCheckpoint({"w": f}))
    assert torch.equal(mem.delta("w", dtype).view(torch.int16), ref.view(torch.int16))
    for s, e in element_ranges(3000, 1000):
        part = td.delta_range("w", dtype, s, e)
        assert torch.equal(part.view(torch.int16), ref[s:e].view(torch.int16))
    td.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_delta_is_bit_identical_to_torch_sub(tmp_path, dtype, delta_path):
    # the CPU subtraction runs in numpy (no OpenMP team); its bits must be torch's, signed zeros,
    # subnormals and overflow to inf included
    b, f = _pair(dtype)
    info = torch.finfo(dtype)
    f[:4] = torch.tensor([0.0, -0.0, info.tiny / 4, info.max], dtype=dtype)
    b[:4] = torch.tensor([-0.0, -0.0, -info.tiny / 8, -info.max], dtype=dtype)
    ref = f - b
    ibits = torch.int32 if dtype == torch.float32 else torch.int64
    save_file_streaming({"w": b}, tmp_path / "b.safetensors")
    save_file_streaming({"w": f}, tmp_path / "f.safetensors")
    td = TaskDelta(SafetensorsFile(tmp_path / "b.safetensors"), SafetensorsFile(tmp_path / "f.safetensors"))
    assert torch.equal(td.delta("w", dtype).view(ibits), ref.view(ibits))
    td.close()
    f0 = f.clone()
    got = TaskDelta(MemoryCheckpoint({"w": b}), MemoryCheckpoint({"w": f})).delta("w", dtype)
    assert torch.equal(got.view(ibits), ref.view(ibits)) and torch.equal(f.view(ibits), f0.view(ibits))


def test_in_memory_inputs_are_not_overwritten():
    b, f = _pair(torch.bfloat16)
    f0 = f.clone()
    TaskDelta(MemoryCheckpoint({"w": b}), MemoryCheckpoint({"w": f})).delta("w", torch.bfloat16)
    assert torch.equal(f, f0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_delta_overflow_is_refused_but_an_inf_input_is_passed_on(tmp_path, dtype, monkeypatch, delta_path):
    monkeypatch.setattr(checkpoints, "_HALF_BLOCK", 1 << 16)
    big = torch.finfo(dtype).max
    b = torch.zeros(300_000, dtype=dtype)  # more than one block
    f = torch.zeros(300_000, dtype=dtype)
    # beyond the dtype's range, not float32's (bfloat16's top is within 0.4% of float32's)
    b[290_000], f[290_000] = -big * (2**-8 if dtype == torch.bfloat16 else 1), big
    assert torch.isfinite(f.float() - b.float()).all() and not torch.isfinite((f.float() - b.float()).to(dtype)).all()
    td = TaskDelta(MemoryCheckpoint({"w": b}, "base.st"), MemoryCheckpoint({"w": f}, "ft.st"))
    with pytest.raises(NonFiniteError, match=r"ft.st: the delta of tensor 'w'.*overflows.*--dtype float32"):
        td.delta("w", dtype)
    b[290_000], f[290_000] = 0, float("inf")
    d = td.delta("w", dtype)
    assert torch.isinf(d[290_000]) and int(torch.isfinite(d).sum()) == 300_000 - 1


@pytest.mark.parametrize(
    ("ck_dtype", "dtype"),
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
)
def test_delta_range_equals_the_slice_of_delta(tmp_path, ck_dtype, dtype):
    b, f = _pair(ck_dtype, n=1000, seed=5)
    save_file_streaming({"x": torch.ones(3), "w": b}, tmp_path / "b.safetensors")
    save_file_streaming({"x": torch.ones(3), "w": f}, tmp_path / "f.safetensors")
    whole = TaskDelta(SafetensorsFile(tmp_path / "b.safetensors"), SafetensorsFile(tmp_path / "f.safetensors"))
    ref = whole.delta("w", dtype)
    parts = TaskDelta(SafetensorsFile(tmp_path / "b.safetensors"), SafetensorsFile(tmp_path / "f.safetensors"))
    got = torch.cat([parts.delta_range("w", dtype, s, e) for s, e in element_ranges(1000, 104)])
    assert got.dtype == dtype and torch.equal(got, ref)
    assert parts.base.sequential_digest() == sha256_file(tmp_path / "b.safetensors")  # read in order once


def test_sharded_get_range(tmp_path):
    import json

    save_file_streaming({"a": torch.arange(10.0)}, tmp_path / "s1.safetensors")
    save_file_streaming({"b": torch.arange(20.0)}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})
    )
    ck = ShardedCheckpoint(tmp_path / "model.safetensors.index.json")
    assert torch.equal(ck.get_range("b", 8, 16), torch.arange(8.0, 16.0))
    ck.close()


def test_checkpoint_identity_in_either_digest(tmp_path):
    from condu_merge.checkpoints import checkpoint_identity, open_checkpoint

    p = tmp_path / "m.safetensors"
    save_file_streaming(_sd(6), p)
    ck = open_checkpoint(p)
    assert checkpoint_identity(ck) == {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}
    pytest.importorskip("blake3")
    assert checkpoint_identity(ck, "blake3")["blake3"] == file_digest(p, "blake3")
    ck.close()
