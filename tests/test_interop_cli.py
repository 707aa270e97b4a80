"""The CLI answers at once and cleanly: ``import condu_merge`` / ``--help`` / ``inspect`` load no
torch, the torch-free store view gives the Store's numbers, a closed pipe ends quietly, and a failed
first ``add-task`` leaves no folder behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from condu_merge.cli import main
from condu_merge.store import Store
from condu_merge.store_view import StoreView, ViewError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _store(tmp_path, n=3, rescaler="per_tensor"):
    g = torch.Generator().manual_seed(0)
    store = Store(tmp_path / "store")
    shapes = {"a": (37, 5), "b": (3,), "c": (64, 9)}
    for i in range(n):
        store.add_task(f"t{i}", {k: torch.randn(s, generator=g) for k, s in shapes.items()}, rescaler=rescaler)
    return store


def test_view_equals_the_store(tmp_path):
    st = _store(tmp_path)
    v = StoreView(st.root)
    assert v.storage() == st.storage()
    assert v.mask_stats() == st.mask_stats()
    st.close()


def test_view_defers_damaged_stores_to_the_store(tmp_path, capsys):
    st = _store(tmp_path, 2)
    root = st.root
    st.close()
    mask = os.path.join(root, Store(root).manifest["generation_dir"], "masks", "0001.safetensors")
    with open(mask, "r+b") as fh:
        fh.truncate(os.path.getsize(mask) - 1)
    with pytest.raises(ViewError):
        StoreView(root)
    assert main(["inspect", root]) == 1
    err = capsys.readouterr().err
    assert err.startswith("condu-merge: error:") and "0001.safetensors" in err


def test_import_help_and_inspect_load_no_torch(tmp_path):
    st = _store(tmp_path, 2)
    code = (
        "import sys; from condu_merge.cli import main; import condu_merge; "
        f"rc = main(['inspect', {st.root!r}, '--json']); "
        "assert rc == 0 and 'torch' not in sys.modules and 'numba' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]"
    )
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tasks"][1]["name"] == "t1"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, condu_merge; assert 'torch' not in sys.modules; "
            "from condu_merge import unify, __all__; assert callable(unify); "
            "assert all(hasattr(condu_merge, n) for n in __all__); "
            # the API's modules import torch on first use (condu_merge._lazy), and then work
            "import torch; u, tr = unify([{'w': torch.tensor([1.0, -2.0])}, {'w': torch.tensor([3.0, 1.0])}]); "
            "assert u['w'].tolist() == [3.0, -2.0], u",
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_the_program_gives_openblas_one_thread_unless_told(tmp_path):
    st = _store(tmp_path, 1)
    code = (
        "import os, sys; from condu_merge.cli import entry; "
        f"sys.argv = ['condu-merge', 'inspect', {st.root!r}, '--json']; rc = entry(); "
        "import numpy; assert rc == 0; print(os.environ['OPENBLAS_NUM_THREADS'], file=sys.stderr)"
    )
    for preset, want in ((None, "1"), ("3", "3")):
        env = _env()
        env.pop("OPENBLAS_NUM_THREADS", None)
        if preset:
            env["OPENBLAS_NUM_THREADS"] = preset
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert r.returncode == 0 and r.stderr.strip().splitlines()[-1] == want, r.stderr


def test_closed_pipe_ends_quietly(tmp_path):
    st = _store(tmp_path, 2)
    p = subprocess.Popen(
        [sys.executable, "-m", "condu_merge", "inspect", st.root, "--json"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.read(10)
    p.stdout.close()  # what `| head -c 10` does
    err = p.stderr.read().decode()
    assert p.wait() == 0 and err == ""


def test_failed_first_add_task_leaves_no_store_folder(tmp_path, capsys):
    base = {"w": torch.zeros(4, 3)}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file({"w": torch.zeros(5, 3)}, str(tmp_path / "f.safetensors"))  # shape mismatch: refused inside the lock
    store = tmp_path / "new_store"
    rc = main(
        [
            "add-task",
            str(store),
            "--base",
            str(tmp_path / "b.safetensors"),
            "--finetuned",
            str(tmp_path / "f.safetensors"),
            "--name",
            "x",
        ]
    )
    assert rc == 1 and "shape" in capsys.readouterr().err
    assert not store.exists()
    # a folder the user made beforehand stays (only what the failed write created goes)
    store.mkdir()
    (store / "notes.txt").write_text("mine")
    assert (
        main(
            [
                "add-task",
                str(store),
                "--base",
                str(tmp_path / "b.safetensors"),
                "--finetuned",
                str(tmp_path / "f.safetensors"),
                "--name",
                "x",
            ]
        )
        == 1
    )
    assert sorted(os.listdir(store)) == ["notes.txt"]  # a foreign non-empty folder is refused before any write
