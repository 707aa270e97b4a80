import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from condu_merge import FormatError, TaskTrigger, load_triggers, save_triggers, unify


def _triggers(mode="tensor_mean"):
    g = torch.Generator().manual_seed(0)
    ds = [
        {"layer.0.w": torch.randn(13, 3, generator=g), "b": torch.randn(9, generator=g), "e": torch.zeros(0)}
        for _ in range(3)
    ]
    return unify(ds, rescaler=mode, task_names=["x", "y", "z"])[1]


@pytest.mark.parametrize("mode", ["tensor_mean", "per_tensor"])
def test_round_trip(tmp_path, mode):
    ts = _triggers(mode)
    path = tmp_path / "t.safetensors"
    save_triggers(path, ts)
    back = load_triggers(path)
    assert [t.task for t in back] == ["x", "y", "z"]
    for a, b in zip(ts, back):
        assert a.rescaler == b.rescaler  # exact: JSON floats round-trip
        assert a.names == b.names and dict(a.shapes) == dict(b.shapes)
        for k in a.names:
            assert torch.equal(a.packed[k], b.packed[k])
            assert torch.equal(a.mask(k), b.mask(k))


def test_file_holds_packed_uint8_and_no_pickle(tmp_path):
    ts = _triggers()
    path = tmp_path / "t.safetensors"
    save_triggers(path, ts)
    with safe_open(str(path), "pt") as fh:
        t = fh.get_tensor("0:layer.0.w")
        assert t.dtype == torch.uint8 and t.numel() == math.ceil(39 / 8)
        meta = fh.metadata()
    assert meta["format"] == "condu-merge/triggers"
    assert json.loads(meta["tasks"])[1]["task"] == "y"


def test_refuses_unknown_version(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(
        {"0:w": torch.zeros(1, dtype=torch.uint8)},
        str(path),
        metadata={"format": "condu-merge/triggers", "version": "99", "tasks": "[]"},
    )
    with pytest.raises(FormatError, match=r"t\.safetensors.*version '99'"):
        load_triggers(path)


def test_refuses_foreign_and_truncated_files(tmp_path):
    foreign = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(FormatError, match="not a condu-merge triggers file"):
        load_triggers(foreign)
    path = tmp_path / "t.safetensors"
    save_triggers(path, _triggers())
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 5])
    with pytest.raises(FormatError, match="trunc.safetensors"):
        load_triggers(trunc)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01garbage")
    with pytest.raises(FormatError, match="garbage.safetensors"):
        load_triggers(garbage)


def test_refuses_wrong_mask_length(tmp_path):
    path = tmp_path / "t.safetensors"
    meta = {
        "format": "condu-merge/triggers",
        "version": "1",
        "tasks": json.dumps([{"task": "a", "rescaler": 1.0, "shapes": {"w": [20]}, "order": ["w"]}]),
    }
    save_file({"0:w": torch.zeros(2, dtype=torch.uint8)}, str(path), metadata=meta)
    with pytest.raises(FormatError, match="'w'.*3 bytes"):
        load_triggers(path)


def test_trigger_validates_itself():
    with pytest.raises(ValueError, match="3 bytes"):
        TaskTrigger({"w": torch.zeros(2, dtype=torch.uint8)}, {"w": (20,)}, 1.0)
    with pytest.raises(ValueError, match="per-tensor rescaler"):
        TaskTrigger({"w": torch.zeros(3, dtype=torch.uint8)}, {"w": (20,)}, {})


@pytest.mark.parametrize(
    "tasks",
    [
        '{"task": "x"}',  # not a list
        '[{"task": "x", "rescaler": 1.0, "shapes": {"w": [4]}}]',  # no "order"
        '[{"task": "x", "rescaler": 1.0, "order": ["w"], "shapes": {}}]',  # no shape for w
        '[{"task": "x", "rescaler": "big", "order": ["w"], "shapes": {"w": [4]}}]',  # rescaler not a number
        '[{"task": "x", "rescaler": 1.0, "order": ["w"], "shapes": {"w": ["a"]}}]',  # bad shape
        '["x"]',  # a task that is not an object
    ],
)
def test_refuses_damaged_metadata_naming_the_file(tmp_path, tasks):
    """Valid JSON with missing or mistyped fields is a FormatError naming the file, not a KeyError."""
    path = tmp_path / "damaged.safetensors"
    save_file(
        {"0:w": torch.zeros(1, dtype=torch.uint8)},
        str(path),
        metadata={"format": "condu-merge/triggers", "version": "1", "tasks": tasks},
    )
    with pytest.raises(FormatError, match=r"damaged\.safetensors"):
        load_triggers(path)


def test_saves_numpy_and_torch_scalar_rescalers(tmp_path):
    import numpy as np

    trig = _triggers("per_tensor")[0]
    odd = TaskTrigger(dict(trig.packed), dict(trig.shapes), {k: np.float32(v) for k, v in trig.rescaler.items()}, "x")
    scalar = TaskTrigger(dict(trig.packed), dict(trig.shapes), np.float32(0.5), "y")
    save_triggers(tmp_path / "t.safetensors", [odd, scalar])
    back = load_triggers(tmp_path / "t.safetensors")
    assert back[0].rescaler == {k: float(np.float32(v)) for k, v in trig.rescaler.items()}
    assert back[1].rescaler == 0.5


def test_refuses_set_pad_bits_naming_tensor_and_task(tmp_path):
    """39 elements -> 5 bytes, bit 7 of the last byte is padding: a set pad bit means damage
    (popcount, hence the mask density, would count it)."""
    from condu_merge.packing import pack_mask, pad_bits_clear

    assert pad_bits_clear(pack_mask(torch.ones(39, dtype=torch.bool)), 39)
    assert pad_bits_clear(torch.tensor([0x7F], dtype=torch.uint8), 7)
    assert not pad_bits_clear(torch.tensor([0x80], dtype=torch.uint8), 7)
    assert pad_bits_clear(torch.tensor([0xFF], dtype=torch.uint8), 8)
    ts = _triggers()
    path = tmp_path / "t.safetensors"
    save_triggers(path, ts)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    bad = tensors["1:layer.0.w"].clone()
    bad[-1] |= 0x80
    tensors["1:layer.0.w"] = bad
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(FormatError, match=r"t\.safetensors.*'layer\.0\.w'.*task y.*pad bits"):
        load_triggers(path)


def test_threads_saving_the_same_path_never_collide(tmp_path):
    import threading

    ts = _triggers()
    path = tmp_path / "t.safetensors"
    errors = []

    def work(k):
        try:
            for _ in range(15):
                save_triggers(path, ts[: 1 + k % 3])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert 1 <= len(load_triggers(path)) <= 3
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary left behind
