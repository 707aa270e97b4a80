"""Lazy checkpoint readers, the streaming writer, PEFT adapters, and merging from checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from condu_merge import ContinualMerger, FormatError, delta_from_state_dicts
from condu_merge.checkpoints import (
    PeftAdapter,
    SafetensorsFile,
    ShardedCheckpoint,
    TorchCheckpoint,
    open_checkpoint,
    select_keys,
)
from condu_merge.digests import file_digest, record_digest
from condu_merge.errors import KeyMismatchError, MergeInputError, ShapeMismatchError
from condu_merge.safetensors_writer import StreamingSafetensorsWriter, TensorSpec, save_file_streaming
from condu_merge.store import Store


def _mixed():
    g = torch.Generator().manual_seed(1)
    return {
        "f32": torch.randn(7, 5, generator=g),
        "f16": torch.randn(9, generator=g).half(),
        "bf16": torch.randn(3, 4, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, 2, generator=g).double(),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(5, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }


def test_reader_and_writer_agree_with_safetensors(tmp_path):
    sd = _mixed()
    ref = tmp_path / "ref.safetensors"
    save_file(sd, str(ref), metadata={"k": "v"})
    with SafetensorsFile(ref) as f:
        assert set(f.keys()) == set(sd) and f.metadata == {"k": "v"}
        for k, v in sd.items():
            got = f.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    ours = tmp_path / "ours.safetensors"
    sha, size = save_file_streaming(sd, ours, {"k": "v"})
    assert sha == hashlib.sha256(ours.read_bytes()).hexdigest() and size == ours.stat().st_size
    back = load_file(str(ours))
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    with safe_open(str(ours), framework="pt") as fh:
        assert fh.metadata() == {"k": "v"}
    with SafetensorsFile(ours) as f:  # read front to back: the running hash covers the file
        for k in f.keys():
            f.get(k)
        assert f.sequential_sha256() == sha


def test_writer_refuses_out_of_order_or_wrong_tensors(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float16, (3,))]
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        w.write("b", torch.zeros(3, dtype=torch.float16))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="declared"):
        w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="not written"):
        w.close()
    w.abort()
    assert not (tmp_path / "x.safetensors").exists()


def test_damaged_safetensors_name_the_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(100)}, str(p))
    raw = p.read_bytes()
    p.write_bytes(raw[:-10])
    with pytest.raises(FormatError, match="m.safetensors.*'a'.*truncated"):
        SafetensorsFile(p)
    p.write_bytes(raw[:5])
    with pytest.raises(FormatError, match="m.safetensors"):
        SafetensorsFile(p)
    p.write_bytes(raw[:8] + b"[" + raw[9:])  # breaks the JSON
    with pytest.raises(FormatError, match="m.safetensors"):
        SafetensorsFile(p)


def test_sharded_checkpoint(tmp_path):
    sd = {f"l{i}.weight": torch.randn(4, 3) for i in range(5)}
    shards = {
        "model-00001-of-00002.safetensors": ["l0.weight", "l1.weight"],
        "model-00002-of-00002.safetensors": ["l2.weight", "l3.weight", "l4.weight"],
    }
    for f, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / f))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ck = open_checkpoint(tmp_path)
    assert isinstance(ck, ShardedCheckpoint)
    assert sorted(ck.keys()) == sorted(sd)
    assert all(torch.equal(ck.get(k), v) for k, v in sd.items())
    os.unlink(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        open_checkpoint(tmp_path)


class _NotATensor:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_torch_files_only_with_weights_only(tmp_path):
    sd = {"a": torch.randn(3), "b": torch.arange(4)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "m.pt")
    ck = open_checkpoint(tmp_path / "m.pt")
    assert isinstance(ck, TorchCheckpoint) and set(ck.keys()) == {"a", "b"}
    assert torch.equal(ck.get("a"), sd["a"])
    torch.save({"a": torch.ones(1), "evil": _NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(FormatError, match="evil.bin.*weights_only"):
        open_checkpoint(tmp_path / "evil.bin")


def test_select_keys():
    keys = ["visual.a.weight", "visual.b.bias", "text.a.weight", "logit_scale"]
    assert select_keys(keys) == keys
    assert select_keys(keys, ["visual.*"]) == ["visual.a.weight", "visual.b.bias"]
    assert select_keys(keys, ["*.weight"], ["text.*"]) == ["visual.a.weight"]


# ---------------------------------------------------------------------------- merging from checkpoints


def _family(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "enc.weight": torch.randn(24, 16, generator=g),
        "enc.bias": torch.randn(24, generator=g),
        "head.weight": torch.randn(5, 24, generator=g),
        "pos_ids": torch.arange(16),
    }
    fts = []
    for _ in range(n):
        ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in base.items()}
        fts.append(ft)
    return base, fts


def test_add_task_from_checkpoints_matches_in_memory_and_export_carries(tmp_path):
    from condu_merge.cli import main

    base, fts = _family(3)
    save_file(base, str(tmp_path / "base.safetensors"))
    m = ContinualMerger()
    st = Store(tmp_path / "s")
    for i, ft in enumerate(fts):
        torch.save(ft, tmp_path / f"ft{i}.pt")  # a .pt fine-tune against a safetensors base
        st.add_task_from_checkpoints(f"t{i}", tmp_path / "base.safetensors", tmp_path / f"ft{i}.pt", exclude=["head.*"])
        m.add_task(f"t{i}", delta_from_state_dicts(base, ft, keys=["enc.weight", "enc.bias"]))
    st = Store(tmp_path / "s")
    assert sorted(st.keys) == ["enc.bias", "enc.weight"]  # head excluded, the integer buffer never takes part
    algo, digest = record_digest(st.manifest["base"])  # the store's digest (blake3, or sha256 without it)
    assert digest == file_digest(tmp_path / "base.safetensors", algo)
    if algo == "sha256":
        assert digest == hashlib.sha256((tmp_path / "base.safetensors").read_bytes()).hexdigest()
    for name in m.task_names:
        assert all(torch.equal(st.decouple(name)[k], v) for k, v in m.decouple(name).items())
    assert main(["export", str(tmp_path / "s"), "--task", "t1", "-o", str(tmp_path / "t1.safetensors"), "-q"]) == 0
    out = load_file(str(tmp_path / "t1.safetensors"))
    ref = m.decouple("t1", base=base)
    assert list(out) == SafetensorsFile(tmp_path / "base.safetensors").keys()  # the base's order, every tensor
    assert all(torch.equal(out[k], ref[k]) for k in base)
    assert torch.equal(out["head.weight"], base["head.weight"]) and torch.equal(out["pos_ids"], base["pos_ids"])


def test_checkpoint_errors_name_key_and_file(tmp_path):
    base, fts = _family(2)
    save_file(base, str(tmp_path / "base.safetensors"))
    bad = dict(fts[0])
    del bad["enc.bias"]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    st = Store(tmp_path / "s")
    save_file(fts[1], str(tmp_path / "ok.safetensors"))
    st.add_task_from_checkpoints("ok", tmp_path / "base.safetensors", tmp_path / "ok.safetensors")
    with pytest.raises(KeyMismatchError, match="bad.safetensors.*'enc.bias'"):
        st.add_task_from_checkpoints("bad", tmp_path / "base.safetensors", tmp_path / "bad.safetensors")
    wrong = dict(fts[0])
    wrong["enc.weight"] = torch.randn(16, 24)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ShapeMismatchError, match="wrong.safetensors.*'enc.weight'"):
        st.add_task_from_checkpoints("wrong", tmp_path / "base.safetensors", tmp_path / "wrong.safetensors")
    other = {k: v + 1 if v.is_floating_point() else v for k, v in base.items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(MergeInputError, match="other.safetensors.*differs"):
        st.add_task_from_checkpoints("x", tmp_path / "other.safetensors", tmp_path / "ok.safetensors")
    assert Store(tmp_path / "s").task_names == ["ok"]


def test_mixed_precision_checkpoints_cast_to_the_store_dtype(tmp_path):
    base, fts = _family(2)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(
        {k: v.bfloat16() if v.is_floating_point() else v for k, v in fts[0].items()}, str(tmp_path / "a.safetensors")
    )
    save_file(fts[1], str(tmp_path / "b.safetensors"))
    st = Store(tmp_path / "s")
    st.add_task_from_checkpoints("a", tmp_path / "base.safetensors", tmp_path / "a.safetensors")
    st.add_task_from_checkpoints("b", tmp_path / "base.safetensors", tmp_path / "b.safetensors")
    assert all(s.dtype == torch.bfloat16 for s in Store(tmp_path / "s").specs)


# ---------------------------------------------------------------------------- PEFT


def _peft_pair(tmp_path, seed, **cfg_kw):
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(12, 10)
            self.emb = torch.nn.Embedding(20, 6)
            self.head = torch.nn.Linear(10, 3)

    torch.manual_seed(0)
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["enc", "emb"], modules_to_save=["head"], init_lora_weights=False, **cfg_kw
    )
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        pm.base_model.model.head.modules_to_save["default"].weight.add_(0.05)
    folder = tmp_path / f"adapter{seed}"
    pm.save_pretrained(str(folder))
    merged = pm.merge_and_unload().state_dict()
    return base, folder, {k: merged[k] - base[k] for k in base}


@pytest.mark.parametrize("cfg", [{}, {"use_rslora": True, "alpha_pattern": {"emb": 2}}])
def test_peft_adapter_delta_matches_peft_merge(tmp_path, cfg):
    base, folder, want = _peft_pair(tmp_path, 1, **cfg)
    ad = open_checkpoint(folder)
    assert isinstance(ad, PeftAdapter)
    assert set(ad.delta_keys()) == {"enc.weight", "emb.weight", "head.weight", "head.bias"}
    for k in ad.delta_keys():
        torch.testing.assert_close(ad.delta(k, base[k]), want[k], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(ad.delta("enc.bias", base["enc.bias"])) == 0


def test_store_from_peft_adapters(tmp_path):
    pairs = [_peft_pair(tmp_path, s) for s in (1, 2, 3)]
    base = pairs[0][0]
    save_file(base, str(tmp_path / "base.safetensors"))
    st = Store(tmp_path / "s")
    m = ContinualMerger()
    keys = None
    for i, (_, folder, _) in enumerate(pairs):
        st.add_task_from_checkpoints(f"t{i}", tmp_path / "base.safetensors", folder)
        keys = keys or Store(tmp_path / "s").keys
        ad = PeftAdapter(folder)
        m.add_task(f"t{i}", {k: ad.delta(k, base[k]).float() for k in keys})
    assert set(keys) == {"enc.weight", "emb.weight", "head.weight", "head.bias"}
    st = Store(tmp_path / "s")
    assert st.manifest["tasks"][0]["source"]["kind"] == "peft-lora"
    for n in m.task_names:
        assert all(torch.equal(st.decouple(n)[k], v) for k, v in m.decouple(n).items())


# ---------------------------------------------------------------------------- memory


def test_streaming_merge_memory_stays_near_one_tensor(tmp_path):
    """A 32 MB model in 2 MB tensors, 2 tasks: peak RSS grows by under half the model's size."""
    script = textwrap.dedent(
        """
        import os, resource, sys, torch
        from condu_merge.safetensors_writer import StreamingSafetensorsWriter, TensorSpec
        from condu_merge.store import Store
        d = sys.argv[1]
        specs = [TensorSpec(f"l{i}.weight", torch.float32, (512, 1024)) for i in range(16)]
        ws = {n: StreamingSafetensorsWriter(os.path.join(d, n + ".safetensors"), specs) for n in ("base", "a", "b")}
        for i, s in enumerate(specs):
            g = torch.Generator().manual_seed(i)
            b = torch.randn(s.shape, generator=g)
            ws["base"].write(s.name, b)
            ws["a"].write(s.name, b + 0.01 * torch.randn(s.shape, generator=g))
            ws["b"].write(s.name, b + 0.01 * torch.randn(s.shape, generator=g))
        for w in ws.values():
            w.close()
        import bitarray, tqdm.auto  # imported by the store: not what is measured
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for n in ("a", "b"):
            Store(os.path.join(d, "s"), verify=False).add_task_from_checkpoints(
                n, os.path.join(d, "base.safetensors"), os.path.join(d, n + ".safetensors"), backend="torch")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
        """
    )
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    grew_mb = float(p.stdout.strip().splitlines()[-1])
    assert grew_mb < 16, f"peak RSS grew by {grew_mb:.1f} MB while merging a 32 MB model in 2 MB tensors"


@pytest.mark.parametrize("target", ["../outside.safetensors", "ABS", "sub/../../outside.safetensors"])
def test_sharded_index_may_not_point_outside_its_folder(tmp_path, target):
    from condu_merge.checkpoints import ShardedCheckpoint

    save_file({"w": torch.ones(3)}, str(tmp_path / "outside.safetensors"))
    folder = tmp_path / "ck"
    folder.mkdir()
    shard = str(tmp_path / "outside.safetensors") if target == "ABS" else target
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(FormatError, match="model.safetensors.index.json"):
        ShardedCheckpoint(folder / "model.safetensors.index.json")


@pytest.mark.parametrize("weight_map", [["a"], {"w": 3}, "x"])
def test_malformed_sharded_index_is_a_format_error(tmp_path, weight_map):
    from condu_merge.checkpoints import ShardedCheckpoint

    p = tmp_path / "model.safetensors.index.json"
    p.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FormatError, match="index.json"):
        ShardedCheckpoint(p)


def test_negative_shape_in_header_is_a_format_error(tmp_path):
    import struct

    h = json.dumps({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]}}).encode()
    h += b" " * ((-len(h)) % 8)
    p = tmp_path / "neg.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 8)
    with pytest.raises(FormatError, match="neg.safetensors"):
        SafetensorsFile(p)
