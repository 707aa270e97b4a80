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
