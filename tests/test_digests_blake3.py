"""BLAKE3 as the store's file digest: the default where the ``blake3`` package is installed,
``$CONDU_MERGE_DIGEST`` to choose, the format version bumped only for manifests that record
BLAKE3, sha256 stores (and stores mixing both across generations) still read and written, damage
found in either digest naming the file, and a BLAKE3 store refused with a clear error (nothing
written) where the package is missing."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from condu_merge import ContinualMerger, FormatError, digests
from condu_merge.cli import main
from condu_merge.digests import (
    DIGEST_ENV,
    check_record,
    default_algorithm,
    file_digest,
    manifest_algorithms,
    new_hasher,
    record_digest,
)
from condu_merge.errors import DigestUnavailableError, MergeInputError
from condu_merge.pipeline import STORE_VERSIONS, check_base_identity, read_manifest
from condu_merge.store import MANIFEST, Store
from condu_merge.store_view import StoreView
from condu_merge.strategy_store import StrategyStore

pytest.importorskip("blake3")

SHAPES = {"enc.weight": (33, 17), "enc.bias": (5,), "head.weight": (64, 40)}


def _deltas(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(n)]


def _checkpoints(tmp_path, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    fts = []
    for i in range(n):
        p = tmp_path / f"ft{i}.safetensors"
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(p))
        fts.append(p)
    return tmp_path / "base.safetensors", fts


def _manifest(root) -> dict:
    return json.loads((root / MANIFEST).read_text())


def _snapshot(root) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes (to show that nothing was written)."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _flip(path, at=-5):
    raw = bytearray(open(path, "rb").read())
    raw[at] ^= 0x10
    open(path, "wb").write(bytes(raw))


@pytest.fixture
def blake3_env(monkeypatch):
    monkeypatch.delenv(DIGEST_ENV, raising=False)  # the default: blake3, the package is installed
    return monkeypatch


# ---------------------------------------------------------------------------- the choice


def test_default_algorithm_and_its_variable(monkeypatch):
    monkeypatch.delenv(DIGEST_ENV, raising=False)
    assert default_algorithm() == "blake3"
    monkeypatch.setenv(DIGEST_ENV, "")
    assert default_algorithm() == "blake3"  # empty counts as unset
    monkeypatch.setenv(DIGEST_ENV, "sha256")
    assert default_algorithm() == "sha256"
    monkeypatch.setenv(DIGEST_ENV, "blake3")
    assert default_algorithm() == "blake3"
    monkeypatch.setenv(DIGEST_ENV, "md5")
    with pytest.raises(DigestUnavailableError, match=r"\$CONDU_MERGE_DIGEST='md5' is not a digest.*sha256, blake3"):
        default_algorithm()
    monkeypatch.setattr(digests, "blake3_available", lambda: False)
    monkeypatch.setenv(DIGEST_ENV, "blake3")
    with pytest.raises(DigestUnavailableError, match=r"\$CONDU_MERGE_DIGEST=blake3.*pip install blake3"):
        default_algorithm()
    monkeypatch.delenv(DIGEST_ENV)
    assert default_algorithm() == "sha256"  # without the package the default falls back


def test_a_bad_variable_writes_nothing(tmp_path, monkeypatch):
    Store(tmp_path / "s").add_task("t0", _deltas(1)[0])
    before = _snapshot(tmp_path / "s")
    monkeypatch.setenv(DIGEST_ENV, "sha-256")
    with pytest.raises(DigestUnavailableError, match="CONDU_MERGE_DIGEST"):
        Store(tmp_path / "s").add_task("t1", _deltas(1, seed=1)[0])
    assert _snapshot(tmp_path / "s") == before


def test_check_record_names_file_algorithm_expected_and_got(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"0123456789")
    for algo in ("sha256", "blake3"):
        rec = {algo: file_digest(p, algo), "bytes": 10}
        check_record(p, rec)
        check_record(p, rec, data=b"0123456789")
        check_record(p, rec, got=rec[algo])
        check_record(p, rec, got="0" * 64, got_algo="other")  # a digest in another algorithm: read again
        bad = new_hasher(algo)
        bad.update(b"0123456788")
        with pytest.raises(
            FormatError, match=rf"f\.bin: {algo} mismatch.*records {algo} {rec[algo]}.*has {bad.hexdigest()}"
        ):
            check_record(p, rec, data=b"0123456788")
        with pytest.raises(FormatError, match=rf"f\.bin: {algo} mismatch"):
            check_record(p, rec, got="0" * 64)


# ---------------------------------------------------------------------------- blake3 stores


def test_blake3_store_round_trip(tmp_path, blake3_env, capsys):
    m = ContinualMerger()
    st = Store(tmp_path / "s")
    for i, d in enumerate(_deltas(3)):
        m.add_task(f"t{i}", d)
        st.add_task(f"t{i}", d)
    st.save_prototypes("t1", {"p": torch.arange(4.0)})
    man = _manifest(tmp_path / "s")
    assert man["version"] == 2 and manifest_algorithms(man) == {"blake3"}
    for rel, info in man["files"].items():
        assert set(info) == {"blake3", "bytes"}
        assert info["blake3"] == file_digest(os.path.join(tmp_path / "s", man["generation_dir"], rel), "blake3")
    st2 = Store(tmp_path / "s")  # every file checked
    assert st2.verify().algorithms == ("blake3",)
    for name in m.task_names:
        ref, got = m.decouple(name), st2.decouple(name)
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert torch.equal(st2.load_prototypes("t1")["p"], torch.arange(4.0))
    view = StoreView(tmp_path / "s", verify=True)  # the torch-free view reads version 2, checks blake3
    assert view.storage() == st2.storage()
    assert ContinualMerger.load(tmp_path / "s").task_names == ["t0", "t1", "t2"]
    assert main(["verify", str(tmp_path / "s")]) == 0
    assert "tasks verified (blake3)" in capsys.readouterr().out


def test_base_identity_and_strategy_store_in_blake3(tmp_path, blake3_env):
    base, fts = _checkpoints(tmp_path, 2)
    st = Store(tmp_path / "s")
    st.add_task_from_checkpoints("a", base, fts[0])
    st.add_task_from_checkpoints("b", base, fts[1])
    rec = _manifest(tmp_path / "s")["base"]
    assert set(rec) == {"path", "blake3", "bytes"} and rec["blake3"] == file_digest(base, "blake3")
    ss = StrategyStore(tmp_path / "ties")
    ss.add_task_from_checkpoints("a", base, fts[0], method="ties")
    ss.add_task_from_checkpoints("b", base, fts[1])
    m = _manifest(tmp_path / "ties")
    assert m["version"] == 3 and manifest_algorithms(m) == {"blake3"}
    assert StrategyStore(tmp_path / "ties").verify().algorithms == ("blake3",)


def test_no_second_full_read_when_records_are_blake3(tmp_path, blake3_env):
    """The old generation and the base are checked from the merge's own read, in BLAKE3: no
    separate pass over any file (with and without the background hasher)."""
    import condu_merge.checkpoints as ck
    import condu_merge.pipeline as pipeline

    base, fts = _checkpoints(tmp_path, 4)

    def no_pass(path, algo="sha256", chunk=0):
        raise AssertionError(f"a separate {algo} pass over {path}")

    Store(tmp_path / "s").add_task_from_checkpoints("t0", base, fts[0])
    StrategyStore(tmp_path / "mm").add_task_from_checkpoints("t0", base, fts[0], method="magmax")
    blake3_env.setattr(digests, "file_digest", no_pass)
    blake3_env.setattr(ck, "file_digest", no_pass)
    Store(tmp_path / "s", verify=False).add_task_from_checkpoints("t1", base, fts[1])
    StrategyStore(tmp_path / "mm", verify=False).add_task_from_checkpoints("t1", base, fts[1])
    blake3_env.setattr(pipeline, "BACKGROUND_BYTES", 0)  # no background hasher: still the read's own hash
    Store(tmp_path / "s", verify=False).add_task_from_checkpoints("t2", base, fts[2])
    blake3_env.undo()
    assert Store(tmp_path / "s").task_names == ["t0", "t1", "t2"]
    assert StrategyStore(tmp_path / "mm").task_names == ["t0", "t1"]


@pytest.mark.parametrize("target", ["unified.safetensors", "masks/0001.safetensors", "prototypes/0000.safetensors"])
def test_a_flipped_byte_in_a_blake3_file_is_found_naming_it(tmp_path, blake3_env, capsys, target):
    st = Store(tmp_path / "s")
    for i, d in enumerate(_deltas(2)):
        st.add_task(f"t{i}", d)
    st.save_prototypes("t0", {"p": torch.arange(6.0)})
    root = tmp_path / "s"
    _flip(os.path.join(st.gen_dir, target))
    before = _snapshot(root)
    pat = target.replace("/", ".") + ": blake3 mismatch"
    with pytest.raises(FormatError, match=pat):
        Store(root)
    with pytest.raises(FormatError, match=pat):
        ContinualMerger.load(root)
    with pytest.raises(FormatError, match=pat):  # a writer reading it (no verify) still notices
        Store(root, verify=False).add_task("t9", _deltas(1, seed=5)[0])
    if target.startswith("prototypes"):
        with pytest.raises(FormatError, match=pat):
            Store(root, verify=False).load_prototypes("t0")
    assert _snapshot(root) == before  # nothing committed
    assert main(["verify", str(root)]) == 1
    err = capsys.readouterr().err
    assert target in err and "blake3 mismatch" in err and err.count("\n") == 1


@pytest.mark.parametrize("method,target", [("ties", "tau/0000.safetensors"), ("magmax", "merged.safetensors")])
def test_a_flipped_byte_in_a_blake3_strategy_store(tmp_path, blake3_env, method, target):
    base, fts = _checkpoints(tmp_path, 3)
    ss = StrategyStore(tmp_path / "t")
    ss.add_task_from_checkpoints("a", base, fts[0], method=method)
    ss.add_task_from_checkpoints("b", base, fts[1])
    _flip(os.path.join(ss.gen_dir, target))
    pat = target.replace("/", ".") + ": blake3 mismatch"
    with pytest.raises(FormatError, match=pat):
        StrategyStore(tmp_path / "t")
    if method == "magmax":  # a slot the merge reads: its check is the read's own
        with pytest.raises(FormatError, match=pat):
            StrategyStore(tmp_path / "t", verify=False).add_task_from_checkpoints("c", base, fts[2])
        assert StrategyStore(tmp_path / "t", verify=False).task_names == ["a", "b"]


# ---------------------------------------------------------------------------- sha256 stores


def test_sha256_store_keeps_the_old_version_and_reads(tmp_path, monkeypatch):
    monkeypatch.setenv(DIGEST_ENV, "sha256")
    base, fts = _checkpoints(tmp_path, 2)
    st = Store(tmp_path / "s")
    for i, ft in enumerate(fts):
        st.add_task_from_checkpoints(f"t{i}", base, ft)
    st.save_prototypes("t0", {"p": torch.ones(3)})
    root = tmp_path / "s"
    m = _manifest(root)
    assert m["version"] == 1 and manifest_algorithms(m) == {"sha256"}
    for rel, info in m["files"].items():
        raw = open(os.path.join(root, m["generation_dir"], rel), "rb").read()
        assert set(info) == {"sha256", "bytes"} and info["sha256"] == hashlib.sha256(raw).hexdigest()
    assert m["base"]["sha256"] == hashlib.sha256(base.read_bytes()).hexdigest() and "blake3" not in m["base"]
    assert read_manifest(str(root), None, 1) is not None  # what a reader of version 1 accepts
    StoreView(root, verify=True)
    ss = StrategyStore(tmp_path / "ties")
    ss.add_task_from_checkpoints("a", base, fts[0], method="ties")
    assert _manifest(tmp_path / "ties")["version"] == 2  # the strategy store's pre-BLAKE3 version
    monkeypatch.delenv(DIGEST_ENV)  # readable when the default is blake3
    assert Store(root).verify().algorithms == ("sha256",)
    assert StrategyStore(tmp_path / "ties").verify().algorithms == ("sha256",)
    _flip(os.path.join(Store(root).gen_dir, "masks/0000.safetensors"))
    with pytest.raises(FormatError, match=r"masks.0000\.safetensors: sha256 mismatch"):
        Store(root)


def test_store_view_reads_every_store_version():
    from condu_merge import store_view

    assert store_view._VERSIONS == STORE_VERSIONS


# ---------------------------------------------------------------------------- mixed generations


def test_generations_mixing_sha256_and_blake3(tmp_path, monkeypatch, capsys):
    base, fts = _checkpoints(tmp_path, 5)
    root = tmp_path / "s"
    monkeypatch.setenv(DIGEST_ENV, "sha256")
    st = Store(root)
    st.add_task_from_checkpoints("t0", base, fts[0])
    st.save_prototypes("t0", {"p": torch.arange(3.0)})
    m1 = _manifest(root)
    assert m1["version"] == 1
    monkeypatch.delenv(DIGEST_ENV)  # blake3 from now on
    Store(root).add_task_from_checkpoints("t1", base, fts[1])
    m2 = _manifest(root)
    assert m2["version"] == 2
    assert set(m2["files"]["unified.safetensors"]) == {"blake3", "bytes"}
    assert m2["files"]["prototypes/0000.safetensors"] == m1["files"]["prototypes/0000.safetensors"]  # carried
    assert m2["base"] == m1["base"] and "sha256" in m2["base"]  # recorded once, checked in its own digest
    st = Store(root)  # every file in its own algorithm
    assert st.verify().algorithms == ("blake3", "sha256")
    assert torch.equal(st.load_prototypes("t0")["p"], torch.arange(3.0))
    assert main(["verify", str(root)]) == 0
    assert "verified (blake3, sha256)" in capsys.readouterr().out
    from condu_merge.distributed import distributed_add_task_from_checkpoints

    distributed_add_task_from_checkpoints(root, "t2", base, fts[2])  # ranks check sha256 and blake3 records
    assert record_digest(_manifest(root)["files"]["masks/0002.safetensors"])[0] == "blake3"
    # a changed base is refused against its sha256 record while the store writes blake3
    _flip(base, -1)
    with pytest.raises(MergeInputError, match="modified since.*sha256"):
        Store(root).add_task_from_checkpoints("t3", base, fts[3])
    _flip(base, -1)
    monkeypatch.setenv(DIGEST_ENV, "sha256")  # back to sha256: no blake3 record left, version 1 again
    Store(root).add_task_from_checkpoints("t3", base, fts[3])
    m4 = _manifest(root)
    assert manifest_algorithms(m4) == {"sha256"} and m4["version"] == 1
    assert Store(root).task_names == ["t0", "t1", "t2", "t3"]


def test_strategy_store_mixing_carries_sha256_task_vectors(tmp_path, monkeypatch):
    base, fts = _checkpoints(tmp_path, 3)
    monkeypatch.setenv(DIGEST_ENV, "sha256")
    ss = StrategyStore(tmp_path / "t")
    ss.add_task_from_checkpoints("a", base, fts[0], method="ties")
    monkeypatch.delenv(DIGEST_ENV)
    ss.add_task_from_checkpoints("b", base, fts[1])
    m = _manifest(tmp_path / "t")
    assert m["version"] == 3
    assert record_digest(m["files"]["tau/0000.safetensors"])[0] == "sha256"  # hard-linked, its record kept
    assert record_digest(m["files"]["tau/0001.safetensors"])[0] == "blake3"
    assert StrategyStore(tmp_path / "t").verify().algorithms == ("blake3", "sha256")


def test_base_check_does_not_skip_a_blake3_record(tmp_path, monkeypatch):
    """The base check compares in the record's digest; a record of BLAKE3 (no sha256 key) is
    checked, not skipped, whatever the default is."""
    from condu_merge.checkpoints import open_checkpoint

    base, _ = _checkpoints(tmp_path, 0)
    rec = {"path": str(base), "blake3": file_digest(base, "blake3"), "bytes": base.stat().st_size}
    monkeypatch.setenv(DIGEST_ENV, "sha256")
    with open_checkpoint(base) as bck:
        check_base_identity({"base": rec}, bck)
        check_base_identity({"base": rec}, bck, "0" * 64, digest_algo="sha256")  # another algorithm's: hashed again
        with pytest.raises(MergeInputError, match="modified since.*blake3"):
            check_base_identity({"base": rec}, bck, "0" * 64)  # the caller's read, in the record's digest
    _flip(base, -1)
    with open_checkpoint(base) as bck, pytest.raises(MergeInputError, match="modified since.*blake3"):
        check_base_identity({"base": rec}, bck)


# ---------------------------------------------------------------------------- without the package


def test_blake3_store_without_the_package_is_refused_clearly(tmp_path, blake3_env, capsys):
    base, fts = _checkpoints(tmp_path, 2)
    st = Store(tmp_path / "s")
    st.add_task_from_checkpoints("t0", base, fts[0])
    StrategyStore(tmp_path / "ties").add_task_from_checkpoints("t0", base, fts[0], method="ties")
    before = _snapshot(tmp_path / "s"), _snapshot(tmp_path / "ties")
    blake3_env.setitem(sys.modules, "blake3", None)  # `import blake3` raises ImportError now
    assert not digests.blake3_available()
    with pytest.raises(DigestUnavailableError, match="pip install blake3"):
        new_hasher("blake3")
    for open_it in (lambda: Store(tmp_path / "s"), lambda: Store(tmp_path / "s", verify=False)):
        with pytest.raises(
            DigestUnavailableError, match=r"manifest\.json: this store records BLAKE3.*pip install blake3"
        ):
            open_it()
    with pytest.raises(DigestUnavailableError, match="pip install blake3"):
        Store(tmp_path / "s", verify=False).add_task_from_checkpoints("t1", base, fts[1])
    with pytest.raises(DigestUnavailableError, match="pip install blake3"):
        StrategyStore(tmp_path / "ties", verify=False)
    assert main(["verify", str(tmp_path / "s")]) == 1
    assert "pip install blake3" in capsys.readouterr().err
    for no_verify in ([], ["--no-verify"]):
        assert main(["inspect", str(tmp_path / "s"), *no_verify]) == 1
        assert "pip install blake3" in capsys.readouterr().err
    assert (_snapshot(tmp_path / "s"), _snapshot(tmp_path / "ties")) == before  # nothing modified
    # without the package a new store is sha256, version 1, and works
    Store(tmp_path / "new").add_task("t0", _deltas(1)[0])
    m = _manifest(tmp_path / "new")
    assert m["version"] == 1 and manifest_algorithms(m) == {"sha256"}
    assert Store(tmp_path / "new").task_names == ["t0"]


def test_a_manifest_entry_without_any_digest_is_refused(tmp_path, blake3_env):
    from condu_merge.manifest_check import check_manifest_structure

    Store(tmp_path / "s").add_task("t0", _deltas(1)[0])
    m = _manifest(tmp_path / "s")
    check_manifest_structure(m, "m.json")
    del m["files"]["unified.safetensors"]["blake3"]
    with pytest.raises(FormatError, match="unified.safetensors.*lacks a byte count or a digest"):
        check_manifest_structure(m, "m.json")


def test_the_base_is_hashed_off_the_merging_thread(tmp_path, blake3_env):
    """add-task's read of the base is hashed by a background worker (the merge thread only
    reads), and the digest it records and checks is still the file's."""
    import contextlib

    import condu_merge.pipeline as pipeline

    base, fts = _checkpoints(tmp_path, 2)
    seen: list[int] = []
    real = pipeline.background_hasher

    @contextlib.contextmanager
    def spy(wanted=True):
        with real(wanted) as worker:
            assert worker is not None
            submit = worker.submit

            def counted(fn, nbytes=0):
                seen.append(nbytes)
                submit(fn, nbytes)

            worker.submit = counted
            yield worker

    blake3_env.setattr(pipeline, "background_hasher", spy)
    st = Store(tmp_path / "s")
    st.add_task_from_checkpoints("a", base, fts[0])
    first = sum(seen)
    st.add_task_from_checkpoints("b", base, fts[1])  # checked against the record, from the worker's hash
    assert first > 0.9 * os.path.getsize(base) and sum(seen) > 1.8 * os.path.getsize(base)
    assert _manifest(tmp_path / "s")["base"]["blake3"] == file_digest(base, "blake3")
    ss = StrategyStore(tmp_path / "ties")
    ss.add_task_from_checkpoints("a", base, fts[0], method="ties")
    assert sum(seen) > 2.7 * os.path.getsize(base)
