import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from condu_merge import pack_mask, packed_nbytes, popcount, unpack_mask


@pytest.mark.parametrize("n", list(range(33)) + [1000, 1001, 4095])
def test_round_trip_every_length_mod_8(n):
    g = torch.Generator().manual_seed(n)
    m = torch.rand(n, generator=g) < 0.5
    p = pack_mask(m)
    assert p.dtype == torch.uint8 and p.numel() == packed_nbytes(n) == (n + 7) // 8
    assert torch.equal(unpack_mask(p, n), m)
    assert popcount(p) == int(m.sum())


@given(st.lists(st.booleans(), max_size=200))
def test_matches_numpy_little_bit_order(bits):
    m = torch.tensor(bits, dtype=torch.bool)
    expected = np.packbits(np.array(bits, dtype=bool), bitorder="little")
    assert pack_mask(m).numpy().tobytes() == expected.tobytes()


def test_bit_layout_explicit():
    m = torch.zeros(10, dtype=torch.bool)
    m[0] = m[3] = m[9] = True  # byte0 = 1 + 8, byte1 = bit 1
    assert pack_mask(m).tolist() == [9, 2]


def test_pad_bits_zero_and_shape_restored():
    m = torch.ones(3, 5, dtype=torch.bool)
    p = pack_mask(m)
    assert p.tolist() == [255, 127]  # 15 bits set, the 16th (pad) clear
    assert unpack_mask(p, shape=(3, 5)).shape == (3, 5)


def test_errors():
    with pytest.raises(TypeError):
        pack_mask(torch.ones(3))
    with pytest.raises(ValueError, match="expected 2 for 9"):
        unpack_mask(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(ValueError):
        unpack_mask(torch.zeros(2, dtype=torch.uint8), numel=9, shape=(2, 2))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
def test_stack_rows_equals_torch_stack(dtype, k):
    from condu_merge.packing import stack_rows

    g = torch.Generator().manual_seed(k)
    rows = [torch.randint(0, 256, (37,), generator=g).to(dtype) for _ in range(k)]
    got = stack_rows(rows)
    ref = torch.stack(rows)
    assert got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref)
    got[0].zero_() if dtype != torch.bool else got[0].fill_(False)  # a copy: the rows are untouched
    assert torch.equal(rows[0], ref[0])


def test_stack_rows_refuses_what_torch_stack_refuses():
    from condu_merge.packing import stack_rows

    with pytest.raises((RuntimeError, ValueError)):
        stack_rows([torch.zeros(3, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)])
    with pytest.raises(RuntimeError):
        stack_rows([])
    # mixed dtypes go to torch.stack (its promotion), not numpy's
    mixed = stack_rows([torch.ones(2, dtype=torch.uint8), torch.ones(2, dtype=torch.float32)])
    assert torch.equal(mixed, torch.stack([torch.ones(2, dtype=torch.uint8), torch.ones(2, dtype=torch.float32)]))


def test_stack_rows_keeps_or_moves_the_device():
    from condu_merge.packing import stack_rows

    rows = [torch.arange(4, dtype=torch.uint8), torch.arange(4, dtype=torch.uint8)]
    assert stack_rows(rows).device.type == "cpu" and stack_rows(rows, "cpu").device.type == "cpu"
    meta = [torch.empty(4, dtype=torch.uint8, device="meta")] * 2
    assert stack_rows(meta).device.type == "meta"  # rows elsewhere stay there, as torch.stack keeps them
    assert stack_rows(rows, torch.device("meta")).device.type == "meta"  # and move where asked
