"""Hashing while reading: a file's sha256 from the merge's own read (skipped bytes filled in),
and the store's base check on that hash (one read of the base per add-task)."""

import hashlib
import json
import os

import pytest
import torch

from condu_merge.checkpoints import SafetensorsFile
from condu_merge.digests import default_algorithm, file_digest
from condu_merge.errors import MergeInputError
from condu_merge.safetensors_writer import save_file_streaming
from condu_merge.store import Store


def _sd(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(7 + 3 * i, generator=g) for i in range(n)}


def test_sequential_sha256_fills_skipped_bytes(tmp_path):
    p = tmp_path / "a.safetensors"
    sha, _ = save_file_streaming({**_sd(0), "ids": torch.arange(4)}, p)
    with SafetensorsFile(p) as f:
        for k in f.keys()[::2]:  # every other tensor: the gaps and the tail are hashed on demand
            f.get(k)
        assert f.sequential_sha256() == sha == hashlib.sha256(p.read_bytes()).hexdigest()
    with SafetensorsFile(p) as f:
        keys = f.keys()
        f.get(keys[2])
        f.get(keys[0])  # behind the hash: no sequential hash any more
        assert f.sequential_sha256() is None
    with SafetensorsFile(p) as f:
        f.no_read_hash()
        f.get(f.keys()[0])
        assert f.sequential_sha256() is None


def test_store_base_check_uses_the_read(tmp_path):
    base = _sd(0)
    bpath = tmp_path / "base.safetensors"
    bsha, _ = save_file_streaming(base, bpath)
    fts = []
    for t in range(2):
        p = tmp_path / f"ft{t}.safetensors"
        save_file_streaming({k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}, p)
        fts.append(p)
    root = tmp_path / "store"
    with Store(root) as st:
        st.add_task_from_checkpoints("a", bpath, fts[0])
        algo = default_algorithm()
        assert st.manifest["base"][algo] == (bsha if algo == "sha256" else file_digest(bpath, algo))
        assert st.manifest["base"]["path"] == os.path.abspath(bpath)
    before = json.loads((root / "manifest.json").read_text())
    raw = bytearray(bpath.read_bytes())
    raw[-1] ^= 0x01  # same size, one bit of the last tensor differs
    bpath.write_bytes(bytes(raw))
    with Store(root) as st, pytest.raises(MergeInputError, match="modified since"):
        st.add_task_from_checkpoints("b", bpath, fts[1])
    assert json.loads((root / "manifest.json").read_text()) == before  # nothing committed
    with Store(root) as st:
        st.add_task_from_checkpoints("b", bpath, fts[1], check_base=False)
        assert st.task_names == ["a", "b"]
