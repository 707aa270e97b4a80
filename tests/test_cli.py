"""The ``condu-merge`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from condu_merge import ContinualMerger, delta_from_state_dicts
from condu_merge.cli import main
from condu_merge.digests import default_algorithm


def _files(tmp_path, n=3):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g), "ids": torch.arange(4)}
    save_file(base, str(tmp_path / "base.safetensors"))
    fts = []
    for i in range(n):
        ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        save_file(ft, str(tmp_path / f"ft{i}.safetensors"))
        fts.append(ft)
    return base, fts


def test_add_inspect_verify_export(tmp_path, capsys):
    base, fts = _files(tmp_path)
    store = str(tmp_path / "store")
    m = ContinualMerger()
    for i in range(3):
        rc = main(
            [
                "add-task",
                store,
                "--base",
                str(tmp_path / "base.safetensors"),
                "--finetuned",
                str(tmp_path / f"ft{i}.safetensors"),
                "--name",
                f"t{i}",
                "--json",
            ]
        )
        assert rc == 0
        out = json.loads(capsys.readouterr().out)
        assert out["tasks"] == [f"t{j}" for j in range(i + 1)]
        m.add_task(f"t{i}", delta_from_state_dicts(base, fts[i]))
    assert main(["inspect", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in info["tasks"]] == ["t0", "t1", "t2"]
    assert abs(info["storage"]["mask_bits_per_param"] - 1.0) < 0.01
    assert info["overlaps"]["overlap_bits"][0][0] == info["storage"]["params"] * info["tasks"][0]["density"]
    for i in range(3):
        bits_i = m.trigger(f"t{i}").density() * info["storage"]["params"]
        assert round(bits_i) == info["overlaps"]["overlap_bits"][i][i]
    both = sum(int((m.trigger("t0").mask(k) & m.trigger("t1").mask(k)).sum()) for k in ("w", "b"))
    assert info["overlaps"]["overlap_bits"][0][1] == both
    assert main(["inspect", store]) == 0
    text = capsys.readouterr().out
    assert "1377.92 MB" in text and "individual models" in text and "Jaccard" in text
    assert main(["verify", store]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["export", store, "--task", "t1", "--delta", "-o", str(tmp_path / "d.safetensors"), "-q"]) == 0
    d = load_file(str(tmp_path / "d.safetensors"))
    assert set(d) == {"w", "b"} and all(torch.equal(d[k], m.decouple("t1")[k]) for k in d)
    assert capsys.readouterr().out == ""  # -q


def test_user_errors_are_one_line_with_nonzero_exit(tmp_path, capsys):
    base, _ = _files(tmp_path, 1)
    store = str(tmp_path / "store")
    assert main(["inspect", store]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("condu-merge: error:") and "no condu-merge store" in err
    assert (
        main(
            [
                "add-task",
                store,
                "--base",
                str(tmp_path / "base.safetensors"),
                "--finetuned",
                str(tmp_path / "missing.safetensors"),
                "--name",
                "a",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "Traceback" not in err
    main(
        [
            "add-task",
            store,
            "--base",
            str(tmp_path / "base.safetensors"),
            "--finetuned",
            str(tmp_path / "ft0.safetensors"),
            "--name",
            "a",
            "-q",
        ]
    )
    raw = bytearray(open(tmp_path / "store" / "gen-000001" / "unified.safetensors", "rb").read())
    raw[-1] ^= 4
    open(tmp_path / "store" / "gen-000001" / "unified.safetensors", "wb").write(bytes(raw))
    assert main(["verify", store]) == 1
    err = capsys.readouterr().err
    assert "unified.safetensors" in err and f"{default_algorithm()} mismatch" in err and err.count("\n") == 1
    assert main(["export", store, "--task", "nope", "-o", str(tmp_path / "x.safetensors"), "--no-verify"]) == 1
    assert "'nope'" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    import pytest

    from condu_merge.errors import ConduError

    with pytest.raises((ConduError, FileNotFoundError)):
        main(["inspect", str(tmp_path / "none"), "--debug"])


def test_demo_in_process(capsys):
    assert main(["demo", "--random-deltas", "--tasks", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in out["experts"]] == ["task1", "task2", "task3"]
    assert all(0.5 < r["cosine"] <= 1.0 for r in out["experts"])
    assert out["storage"]["condu_total_bytes"] < out["storage"]["individual_bytes"]


def test_python_m_demo():
    p = subprocess.run(
        [sys.executable, "-m", "condu_merge", "demo", "--random-deltas"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert "merged 5 tasks" in p.stdout and "rel.L2 err" in p.stdout and "individual models" in p.stdout


def test_add_task_under_torchrun_routes_to_distributed(monkeypatch, tmp_path):
    import condu_merge.distributed as dist
    from condu_merge import cli as cli_mod

    seen = {}

    def fake(args):
        seen["store"], seen["name"] = args.store, args.name
        return 0

    monkeypatch.setattr(dist, "add_task_from_args", fake)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # torchrun's own variable: a real launch
    rc = cli_mod.main(
        ["add-task", str(tmp_path / "s"), "--base", "b.safetensors", "--finetuned", "f.safetensors", "--name", "t"]
    )
    assert rc == 0 and seen == {"store": str(tmp_path / "s"), "name": "t"}
