"""Issue 17: never touch what the store does not own, refuse every damaged or hostile input by
name (one line, the file and the key), scale past 1,000 tasks at a low open-file limit."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from condu_merge import ContinualMerger
from condu_merge.checkpoints import SafetensorsFile, open_checkpoint
from condu_merge.cli import main
from condu_merge.errors import ConduError, DtypeMismatchError, FormatError
from condu_merge.store import MANIFEST, Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def bounded(seconds: float):
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``."""

    def on_alarm(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _ckpts(tmp_path, n=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(12, 8, generator=g).to(dtype), "b": torch.randn(8, generator=g).to(dtype)}
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i in range(n):
        ft = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        p = tmp_path / f"ft{i}.safetensors"
        save_file(ft, str(p))
        paths.append(str(p))
    return str(tmp_path / "base.safetensors"), paths


def _add(store, base, ft, name, *extra):
    return main(["add-task", str(store), "--base", base, "--finetuned", ft, "--name", name, "-q", *extra])


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("condu-merge: error: "), err
    assert "Traceback" not in err and "--debug" not in err, err
    return err


def _rewrite_manifest(store, edit):
    p = os.path.join(str(store), MANIFEST)
    with open(p) as fh:
        m = json.load(fh)
    edit(m)
    body = {k: v for k, v in m.items() if k != "checksum"}
    m["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    with open(p, "w") as fh:
        json.dump(m, fh)


def _tree(path) -> dict:
    """Every entry under ``path`` (not following symlinks) with its content or link target."""
    out = {}
    for dirpath, dirs, files in os.walk(path):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, path)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                with open(p, "rb") as fh:
                    out[rel] = ("file", fh.read())
    return out


# ---------------------------------------------------------------------------- 1. the lock


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "foreign"])
def test_a_planted_lock_file_is_refused_and_its_target_untouched(tmp_path, capsys, kind):
    base, fts = _ckpts(tmp_path)
    store = tmp_path / "st"
    assert _add(store, base, fts[0], "a") == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data\n")
    os.unlink(store / ".lock")
    if kind == "symlink":
        os.symlink(victim, store / ".lock")
    elif kind == "hardlink":
        os.link(victim, store / ".lock")
    else:
        (store / ".lock").write_text("my notes, not a pid\n")
    assert _add(store, base, fts[1], "b") == 1
    err = _err(capsys)
    assert ".lock" in err
    assert victim.read_text() == "precious data\n"
    assert Store(store).task_names == ["a"]
    if kind == "foreign":
        assert (store / ".lock").read_text() == "my notes, not a pid\n"


# ---------------------------------------------------------------------------- 2. foreign files


def _plant_foreign(store, outside):
    os.makedirs(store / "gen-results")
    (store / "gen-results" / "notes.txt").write_text("notes")
    os.makedirs(store / "gen-2024")
    (store / "gen-2024" / "data.csv").write_text("1,2")
    os.makedirs(store / "gen-000900" / "masks")
    (store / "gen-000900" / "mine.txt").write_text("not a store file")
    (store / "manifest.json.tmp-notes").write_text("keep")
    (store / "README.txt").write_text("readme")
    os.makedirs(outside / "target")
    (outside / "target" / "unrelated.txt").write_text("unrelated")
    os.symlink(outside / "target", store / "gen-000800")
    os.symlink(outside / "target" / "unrelated.txt", store / "manifest.json.tmp-77777777")


def test_foreign_files_and_symlinks_survive_add_task_export_and_save(tmp_path, capsys):
    base, fts = _ckpts(tmp_path, 3)
    store = tmp_path / "st"
    outside = tmp_path / "outside"
    assert _add(store, base, fts[0], "a") == 0
    _plant_foreign(store, outside)
    foreign = {
        k: v
        for k, v in _tree(store).items()
        if not k.startswith(("gen-00000", "manifest.json", ".lock")) or k.startswith("manifest.json.tmp")
    }
    out_before = _tree(outside)
    # a refused task (NaN), a committed one, an export, a save, save_prototypes
    nan = tmp_path / "nan.safetensors"
    save_file({"w": torch.full((12, 8), float("nan")), "b": torch.zeros(8)}, str(nan))
    assert _add(store, base, str(nan), "bad") == 1
    capsys.readouterr()
    assert _add(store, base, fts[1], "b") == 0
    assert main(["export", str(store), "--task", "a", "-o", str(tmp_path / "a.safetensors"), "-q"]) == 0
    with Store(store) as st:
        st.save_prototypes("a", {"p": torch.ones(3)})
        merger = ContinualMerger.from_store(st)
    merger.save(store)
    assert _add(store, base, fts[2], "c") == 0
    after = _tree(store)
    for k, v in foreign.items():
        assert after.get(k) == v, k
    assert _tree(outside) == out_before
    assert Store(store).task_names == ["a", "b", "c"]


def test_a_symlinked_generation_is_never_deleted_through(tmp_path):
    base, fts = _ckpts(tmp_path)
    store = tmp_path / "st"
    with Store(store) as st:
        st.add_task_from_checkpoints("a", base, fts[0])
        gen = st.manifest["generation_dir"]
    os.rename(store / gen, tmp_path / "moved")
    (tmp_path / "moved" / "unrelated.txt").write_text("unrelated")
    os.symlink(tmp_path / "moved", store / gen)
    before = _tree(tmp_path / "moved")
    with Store(store) as st:
        st.add_task_from_checkpoints("b", base, fts[1])
    assert _tree(tmp_path / "moved") == before
    assert Store(store).task_names == ["a", "b"]


def test_a_store_is_not_created_in_a_non_empty_folder(tmp_path, capsys):
    base, fts = _ckpts(tmp_path)
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "notes.txt").write_text("notes")
    assert _add(folder, base, fts[0], "a") == 1
    assert "proj" in _err(capsys) and "not empty" in capsys.readouterr().err + "not empty"
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    m = ContinualMerger()
    m.add_task("a", {"w": torch.randn(3)})
    with pytest.raises(ConduError, match="not empty"):
        m.save(folder)
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    # an empty folder, or one holding only a killed first write's leftovers, is fine
    (tmp_path / "empty").mkdir()
    m.save(tmp_path / "empty")
    assert ContinualMerger.load(tmp_path / "empty").task_names == ["a"]


# ---------------------------------------------------------------------------- 3. export targets


def test_export_refuses_store_base_and_source_paths_and_existing_outputs(tmp_path, capsys):
    base, fts = _ckpts(tmp_path)
    store = tmp_path / "st"
    assert _add(store, base, fts[0], "a") == 0
    with Store(store) as st:
        gen = st.manifest["generation_dir"]
    snapshot = _tree(store)
    base_bytes = open(base, "rb").read()
    ft_bytes = open(fts[0], "rb").read()
    link = tmp_path / "link.safetensors"
    os.symlink(store / MANIFEST, link)
    for target in (
        base,
        fts[0],
        store / MANIFEST,
        store / gen / "unified.safetensors",
        store / "new.safetensors",
        link,
    ):
        for force in ([], ["--force"]):
            assert main(["export", str(store), "--task", "a", "-o", str(target), "-q", *force]) == 1, target
            _err(capsys)
    assert _tree(store) == snapshot and open(base, "rb").read() == base_bytes and open(fts[0], "rb").read() == ft_bytes
    assert os.readlink(link) == str(store / MANIFEST)
    # a sharded source: every file of its folder is an input
    d = tmp_path / "shards"
    d.mkdir()
    save_file(load_file(fts[1]), str(d / "model-00001.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001.safetensors", "b": "model-00001.safetensors"}})
    )
    assert _add(store, base, str(d / "model.safetensors.index.json"), "sharded") == 0
    assert main(["export", str(store), "--task", "a", "-o", str(d / "model-00001.safetensors"), "-q", "--force"]) == 1
    assert "source of task 'sharded'" in _err(capsys)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"someone's file")
    assert main(["export", str(store), "--task", "a", "-o", str(out), "-q"]) == 1
    assert "--force" in _err(capsys) and out.read_bytes() == b"someone's file"
    assert main(["export", str(store), "--task", "a", "-o", str(out), "-q", "--force"]) == 0
    assert set(load_file(str(out))) == {"w", "b"}
    Store(store).verify()


# ---------------------------------------------------------------------------- 4. hostile regexes


def _adapter(folder, cfg: dict | list | str, A=None, B=None, module="w"):
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 8, generator=g) if A is None else A
    B = torch.randn(12, 2, generator=g) if B is None else B
    save_file(
        {f"base_model.model.{module}.lora_A.weight": A, f"base_model.model.{module}.lora_B.weight": B},
        os.path.join(folder, "adapter_model.safetensors"),
    )
    with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
        fh.write(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(folder)


@pytest.mark.parametrize("pat", ["(.*.*)*x", "(a+)+$", "(a|aa)*c", "(x+x+)+y"])
def test_catastrophic_alpha_pattern_does_not_hang(tmp_path, pat):
    base, _ = _ckpts(tmp_path)
    module = "a" * 40
    save_file({module + ".weight": torch.randn(12, 8)}, base)
    ad = _adapter(
        tmp_path / "ad",
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {pat: 16}, "rank_pattern": {pat: 2}},
        module=module,
    )
    with bounded(20):
        try:
            with Store(tmp_path / "st") as st:
                st.add_task_from_checkpoints("t", base, ad)
        except ConduError as exc:  # refused as too costly: fine, as long as it names the file and pattern
            assert "adapter_config.json" in str(exc) and pat in str(exc)


def test_pattern_matching_is_peft_s(tmp_path):
    """Same key as PEFT's ``get_pattern_key`` on ordinary patterns, for both LoRA readers."""
    peft_other = pytest.importorskip("peft.utils.other")
    from condu_merge.checkpoints import peft_pattern_key

    pats = ["q", "attn.q", "layers.0.attn.q", r"layers\.\d+\.mlp", "q|v", "^x", "mlp.*", ".*fc", "k"]
    modules = [
        "q",
        "attn.q",
        "layers.0.attn.q",
        "layers.12.mlp",
        "model.v",
        "xq",
        "a.mlp.fc",
        "k.q",
        "kk",
        "layers.0.attn.qq",
    ]
    for m in modules:
        for i in range(len(pats)):
            keys = pats[i:] + pats[:i]
            want = peft_other.get_pattern_key(keys, m)
            got = peft_pattern_key(keys, m, "cfg.json")
            assert (got if got is not None else m) == want, (keys, m)


def test_bad_regex_in_adapter_config_is_named(tmp_path, capsys):
    base, _ = _ckpts(tmp_path)
    ad = _adapter(tmp_path / "ad", {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {"(": 16}})
    assert _add(tmp_path / "st", base, ad, "t") == 1
    err = _err(capsys)
    assert "adapter_config.json" in err and "'('" in err


# ---------------------------------------------------------------------------- 5. thousands of tasks


def test_five_thousand_tasks_at_a_low_open_file_limit(tmp_path):
    """5,000 tasks under a limit of 128 open files: save, open (hashes verified), add a task,
    decouple, save prototypes, inspect and export. On tmpfs when there is one: this is about
    descriptors, and 5,000 fsyncs per write on a slow disk would make the test slow, not better."""
    shm = "/dev/shm"
    work = tmp_path
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        import tempfile

        work = tempfile.mkdtemp(prefix="condu-5000-", dir=shm)
    root = os.path.join(str(work), "st")
    script = textwrap.dedent(
        """
        import resource, sys, torch
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
        from condu_merge import ContinualMerger
        from condu_merge.cli import main
        from condu_merge.store import Store
        from condu_merge.trigger import TaskTrigger
        from condu_merge.packing import pack_mask
        T, root = 5000, sys.argv[1]
        g = torch.Generator().manual_seed(0)
        shapes = {"w": (3, 4), "b": (5,)}
        u = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        trs = [TaskTrigger({k: pack_mask(torch.rand(s, generator=g) < 0.5) for k, s in shapes.items()}, shapes, 0.5, f"t{i}")
               for i in range(T)]
        ContinualMerger.from_session(u, trs, "tensor_mean").save(root)
        st = Store(root, verify=False)
        assert len(st.task_names) == T
        st.add_task("new", {k: torch.randn(s, generator=g) for k, s in shapes.items()})
        st = Store(root)  # every file's sha256
        assert st.task_names[-1] == "new" and len(st.task_names) == T + 1
        assert set(st.decouple("t4999")) == {"w", "b"}
        st.save_prototypes("t10", {"p": torch.ones(2)})
        assert torch.equal(Store(root, verify=False).load_prototypes("t10")["p"], torch.ones(2))
        assert main(["inspect", root, "--no-overlaps", "-q"]) == 0
        assert main(["export", root, "--task", "t3", "--delta", "--no-verify", "-o", root + "-x.safetensors", "-q"]) == 0
        print("ok", Store(root, verify=False).storage()["tasks"])
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, env=env, timeout=300)
    finally:
        if work is not tmp_path:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ok 5001" in p.stdout


# ---------------------------------------------------------------------------- 6. dtype kind


def test_integer_finetuned_tensor_against_float_base_is_refused(tmp_path, capsys):
    base, fts = _ckpts(tmp_path)
    bad = tmp_path / "int.safetensors"
    save_file({"w": torch.zeros(12, 8, dtype=torch.int64), "b": torch.zeros(8)}, str(bad))
    assert _add(tmp_path / "st", base, str(bad), "t") == 1
    err = _err(capsys)
    assert "int.safetensors" in err and "'w'" in err and "int64" in err
    with Store(tmp_path / "st2") as st:
        st.add_task_from_checkpoints("a", base, fts[0])
        with pytest.raises(DtypeMismatchError, match="int.safetensors.*'w'"):
            st.add_task_from_checkpoints("t", base, str(bad))
        assert st.task_names == ["a"]


# ---------------------------------------------------------------------------- 7. manifest fields


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["tasks"][0].update(rescaler=float("nan")),
        lambda m: m["tasks"][0].update(rescaler=float("inf")),
        lambda m: m["tasks"][0].update(rescaler=-0.5),
        lambda m: m["tasks"][0].update(rescaler="0.5"),
        lambda m: m.update(version=True),
        lambda m: m.update(version=1.0),
        lambda m: m.update(rescaler="bogus"),
        lambda m: m["tasks"][0].pop("mask_bits"),
        lambda m: m["tasks"][0].update(mask_bits="x"),
        lambda m: m["tasks"][0].update(mask_bits=10**9),
        lambda m: m["tasks"][1].update(masks=m["tasks"][0]["masks"]),
        lambda m: m.update(generation="3"),
        lambda m: m.update(base=[1, 2]),
        lambda m: m.update(selection={"include": "w"}),
        lambda m: m["tasks"][0].update(source=7),
        lambda m: m["tensors"][0].update(shape=[2**62, 2**62]),
        lambda m: m["files"]["unified.safetensors"].update(bytes=True),
    ],
)
def test_manifest_fields_are_validated_even_with_a_recomputed_checksum(tmp_path, capsys, edit):
    base, fts = _ckpts(tmp_path)
    store = tmp_path / "st"
    assert _add(store, base, fts[0], "a") == 0 and _add(store, base, fts[1], "b") == 0
    _rewrite_manifest(store, edit)
    with pytest.raises(FormatError, match="manifest.json"):
        Store(store)
    for argv in (
        ["verify", str(store)],
        ["inspect", str(store)],
        ["export", str(store), "--task", "a", "--delta", "-o", str(tmp_path / "o.safetensors")],
    ):
        assert main(argv) == 1
        assert "manifest.json" in _err(capsys)


def test_per_tensor_rescalers_are_validated(tmp_path):
    base, fts = _ckpts(tmp_path)
    store = tmp_path / "st"
    assert _add(store, base, fts[0], "a", "--rescaler", "per_tensor") == 0
    Store(store)
    _rewrite_manifest(store, lambda m: m["tasks"][0]["rescaler"].update(w=float("nan")))
    with pytest.raises(FormatError, match="manifest.json.*'a'"):
        Store(store)


# ---------------------------------------------------------------------------- 8. reads verify


def _flip(path, offset=-1):
    with open(path, "r+b") as fh:
        fh.seek(offset, os.SEEK_END)
        b = fh.read(1)
        fh.seek(offset, os.SEEK_END)
        fh.write(bytes([b[0] ^ 1]))


@pytest.mark.parametrize("damage", ["u", "mask", "swap"])
def test_inspect_verifies_unless_told_not_to(tmp_path, capsys, damage):
    base, fts = _ckpts(tmp_path)
    store = tmp_path / "st"
    assert _add(store, base, fts[0], "a") == 0 and _add(store, base, fts[1], "b") == 0
    gen = store / Store(store).manifest["generation_dir"]
    if damage == "u":
        _flip(gen / "unified.safetensors")
    elif damage == "mask":
        _flip(gen / "masks" / "0001.safetensors")
    else:
        os.rename(gen / "masks" / "0000.safetensors", gen / "x")
        os.rename(gen / "masks" / "0001.safetensors", gen / "masks" / "0000.safetensors")
        os.rename(gen / "x", gen / "masks" / "0001.safetensors")
    assert main(["inspect", str(store)]) == 1
    assert "safetensors" in _err(capsys)
    if damage == "swap":  # the mask files' headers name their task: caught even without hashing
        assert main(["inspect", str(store), "--no-verify"]) == 1
        assert "task #1" in _err(capsys)
    else:
        assert main(["inspect", str(store), "--no-verify"]) == 0
        assert "not verified" in capsys.readouterr().out


def test_add_task_does_not_commit_over_damaged_prototypes(tmp_path, capsys):
    base, fts = _ckpts(tmp_path)
    store = tmp_path / "st"
    assert _add(store, base, fts[0], "a") == 0
    with Store(store) as st:
        st.save_prototypes("a", {"p": torch.arange(6.0)})
        rel = st.task_info("a")["prototypes"]
        gen = st.gen_dir
    _flip(os.path.join(gen, rel))
    before = open(store / MANIFEST).read()
    assert _add(store, base, fts[1], "b") == 1
    assert "prototypes" in _err(capsys)
    assert open(store / MANIFEST).read() == before
    with pytest.raises(FormatError, match="prototypes"):
        Store(store, verify=False).load_prototypes("a")


# ---------------------------------------------------------------------------- 9. errors name file and key


def _raw_safetensors(path, header: bytes | str, data: bytes = b""):
    if isinstance(header, str):
        header = header.encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + data)
    return str(path)


@pytest.mark.parametrize(
    "header,what",
    [
        ('{"w":{"dtype":"F32","shape":[0,18446744073709551616],"data_offsets":[0,0]}}', "'w'"),
        ('{"w":{"dtype":"F32","shape":[1e999],"data_offsets":[0,4]}}', "'w'"),
        ('{"w":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,4]}}', "5000 digits"),
        ('{"w":{"dtype":"F32","shape":["abc"],"data_offsets":[0,4]}}', "'w'"),
        ('{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', "'w'"),
        (
            '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            "overlap",
        ),
        ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}}', "'w'"),
        ('{"w":[1,2]}', "'w'"),
        ('{"__metadata__":[1]}', "metadata"),
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
        ('{"a":' * 50000 + "1" + "}" * 50000, "nested too deeply"),
    ],
    ids=[
        "huge-dim",
        "inf-dim",
        "5000-digits",
        "str-dim",
        "bool-dim",
        "overlap",
        "float-offset",
        "entry-list",
        "metadata-list",
        "deep-list",
        "deep-object",
    ],
)
def test_hostile_safetensors_headers_are_one_line_errors(tmp_path, capsys, header, what):
    base, _ = _ckpts(tmp_path)
    bad = _raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 8)
    with pytest.raises(FormatError) as ei:
        SafetensorsFile(bad)
    assert "bad.safetensors" in str(ei.value) and what in str(ei.value) and "\n" not in str(ei.value)
    assert _add(tmp_path / "st", base, bad, "t") == 1
    assert "bad.safetensors" in _err(capsys)


def test_deep_json_elsewhere_is_a_format_error(tmp_path, capsys):
    base, fts = _ckpts(tmp_path)
    deep = "[" * 100000 + "]" * 100000
    d = tmp_path / "shards"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text('{"weight_map":' + deep + "}")
    ad = _adapter(tmp_path / "ad", deep)
    for ft in (str(d / "model.safetensors.index.json"), ad):
        assert _add(tmp_path / "st", base, ft, "t") == 1
        assert "json" in _err(capsys)
    store = tmp_path / "st2"
    assert _add(store, base, fts[0], "a") == 0
    (store / MANIFEST).write_text(deep)
    assert main(["inspect", str(store)]) == 1
    assert "manifest.json" in _err(capsys)


@pytest.mark.parametrize(
    "cfg,A,B,what",
    [
        ({"r": 0, "lora_alpha": 4}, torch.zeros(0, 8), torch.zeros(12, 0), "rank"),
        ({"r": 2, "lora_alpha": 4}, torch.randn(2, 8), torch.randn(12, 3), "lora_B"),
        ({"r": 2, "lora_alpha": 4}, torch.randn(2, 7), torch.randn(12, 2), "shape"),
        ({"r": 2, "lora_alpha": "abc"}, None, None, "lora_alpha"),
        ({"r": 2, "lora_alpha": float("inf")}, None, None, "lora_alpha"),
        ({"r": 2, "lora_alpha": 4, "alpha_pattern": [1]}, None, None, "alpha_pattern"),
        ({"r": 2, "lora_alpha": 4, "alpha_pattern": {"w": "x"}}, None, None, "alpha_pattern"),
        ([1, 2], None, None, "JSON object"),
        ({"r": 2, "lora_alpha": 4, "use_dora": True}, None, None, "DoRA"),
    ],
)
def test_bad_lora_adapters_are_one_line_errors(tmp_path, capsys, cfg, A, B, what):
    base = str(tmp_path / "base.safetensors")
    save_file({"w.weight": torch.randn(12, 8)}, base)
    if isinstance(cfg, dict):
        cfg = {"peft_type": "LORA", **cfg}
    ad = _adapter(tmp_path / "ad", cfg, A, B)
    assert _add(tmp_path / "st", base, ad, "t") == 1
    err = _err(capsys)
    assert "ad" in err and what in err, err


def test_bad_index_and_manifest_types_are_named(tmp_path, capsys):
    base, fts = _ckpts(tmp_path)
    d = tmp_path / "shards"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text("[1, 2]")
    assert _add(tmp_path / "st", base, str(d / "model.safetensors.index.json"), "t") == 1
    assert "index.json" in _err(capsys)
    store = tmp_path / "st2"
    assert _add(store, base, fts[0], "a") == 0
    _rewrite_manifest(store, lambda m: m.update(tasks=[[1]]))
    assert main(["inspect", str(store)]) == 1
    assert "manifest.json" in _err(capsys)


def test_no_space_left_names_the_file(tmp_path, capsys, monkeypatch):
    from condu_merge import safetensors_writer

    base, fts = _ckpts(tmp_path)
    store = tmp_path / "st"
    assert _add(store, base, fts[0], "a") == 0
    before = open(store / MANIFEST).read()
    real = safetensors_writer.StreamingSafetensorsWriter._put

    def full(self, data):
        if "masks" in self.path or "out" in self.path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(safetensors_writer.StreamingSafetensorsWriter, "_put", full)
    assert _add(store, base, fts[1], "b") == 1
    err = _err(capsys)
    assert "No space left" in err and str(store) in err and ".safetensors" in err
    assert main(["export", str(store), "--task", "a", "-o", str(tmp_path / "out.safetensors")]) == 1
    err = _err(capsys)
    assert "No space left" in err and "out.safetensors" in err
    assert open(store / MANIFEST).read() == before
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_fp16_difference_overflow_is_explained(tmp_path, capsys):
    save_file({"w": torch.full((4,), -60000.0, dtype=torch.float16)}, str(tmp_path / "b.safetensors"))
    save_file({"w": torch.full((4,), 60000.0, dtype=torch.float16)}, str(tmp_path / "f.safetensors"))
    assert _add(tmp_path / "st", str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors"), "t") == 1
    err = _err(capsys)
    assert "overflows float16" in err and "--dtype float32" in err and "'w'" in err and "f.safetensors" in err
    assert (
        _add(
            tmp_path / "st", str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors"), "t", "--dtype", "float32"
        )
        == 0
    )


def test_a_bin_that_is_really_safetensors_is_read(tmp_path):
    base, fts = _ckpts(tmp_path)
    os.rename(fts[0], tmp_path / "pytorch_model.bin")
    ck = open_checkpoint(tmp_path / "pytorch_model.bin")
    assert isinstance(ck, SafetensorsFile) and set(ck.keys()) == {"w", "b"}
    with Store(tmp_path / "st") as st:
        st.add_task_from_checkpoints("t", base, str(tmp_path / "pytorch_model.bin"))


def test_symlinked_shards_are_read_through(tmp_path):
    """Decision (docs/store.md): reads follow symlinks -- the Hugging Face cache keeps every file as
    a symlink into ``blobs/`` -- while the index's names must stay inside its folder."""
    base, fts = _ckpts(tmp_path)
    d = tmp_path / "snap"
    d.mkdir()
    os.symlink(fts[0], d / "model-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001.safetensors", "b": "model-00001.safetensors"}})
    )
    with Store(tmp_path / "st") as st:
        st.add_task_from_checkpoints("t", base, str(d))
        assert st.task_names == ["t"]


# ---------------------------------------------------------------------------- 10. minor


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def test_json_into_a_closed_pipe_after_a_commit_is_rc_0(tmp_path):
    base, fts = _ckpts(tmp_path)
    r, w = os.pipe()
    os.close(r)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "condu_merge",
            "--json",
            "add-task",
            str(tmp_path / "st"),
            "--base",
            base,
            "--finetuned",
            fts[0],
            "--name",
            "t",
        ],
        stdout=w,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        timeout=120,
    )
    os.close(w)
    assert p.returncode == 0, p.stderr
    assert "Broken pipe" not in p.stderr and "Traceback" not in p.stderr
    assert Store(tmp_path / "st").task_names == ["t"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stale_distributed_environment_does_not_hang(tmp_path):
    base, fts = _ckpts(tmp_path)
    env = dict(
        _env(),
        WORLD_SIZE="2",
        RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        CONDU_MERGE_RENDEZVOUS_TIMEOUT="3",
    )
    env.pop("TORCHELASTIC_RUN_ID", None)
    env.pop("GROUP_RANK", None)
    t0 = time.time()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "condu_merge",
            "add-task",
            str(tmp_path / "st"),
            "--base",
            base,
            "--finetuned",
            fts[0],
            "--name",
            "t",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "WORLD_SIZE" in p.stderr  # said once why it runs in one process
    assert Store(tmp_path / "st").task_names == ["t"]
    # the explicit distributed entry point rendezvous, and times out with a clear line
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "condu_merge.distributed",
            "add-task",
            str(tmp_path / "st"),
            "--base",
            base,
            "--finetuned",
            fts[1],
            "--name",
            "u",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "rendezvous" in lines[0] and "127.0.0.1" in lines[0] and "3" in lines[0], p.stderr
    assert time.time() - t0 < 90
    assert Store(tmp_path / "st").task_names == ["t"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_files_of_dead_writers_are_cleaned(tmp_path):
    from condu_merge.safetensors_writer import save_file_streaming

    base, fts = _ckpts(tmp_path)
    store = tmp_path / "st"
    assert _add(store, base, fts[0], "a") == 0
    dead = _dead_pid()
    out = tmp_path / "a.safetensors"
    # a killed export's leftover (our header) and someone else's file of the same shape of name
    save_file_streaming(
        {"w": torch.ones(1000)}, f"{out}.tmp-{dead}", {"condu-merge-task": "a", "condu-merge-store": str(store)}
    )
    os.truncate(f"{out}.tmp-{dead}", 200)  # killed mid-write: the header and a part of the data
    (tmp_path / f"other.safetensors.tmp-{dead}").write_text("not ours")
    (store / f"manifest.json.tmp-{dead}").write_text("{}")
    (store / f"manifest.json.tmp-{os.getpid()}x").write_text("{}")
    assert main(["export", str(store), "--task", "a", "-o", str(out), "-q"]) == 0
    assert not os.path.exists(f"{out}.tmp-{dead}")
    assert (tmp_path / f"other.safetensors.tmp-{dead}").read_text() == "not ours"
    assert _add(store, base, fts[1], "b") == 0
    assert not (store / f"manifest.json.tmp-{dead}").exists()
    assert (store / f"manifest.json.tmp-{os.getpid()}x").exists()


@pytest.mark.parametrize(
    "first,later,what",
    [
        (["--rescaler", "l1"], ["--rescaler", "tensor_mean"], ("l1", "tensor_mean")),
        ([], ["--dtype", "float16"], ("float32", "float16")),
        (["--include", "w"], ["--include", "*"], ("['w']", "['*']")),
        ([], ["--exclude", "b"], ("[]", "['b']")),
    ],
)
def test_later_tasks_refuse_options_that_differ_from_the_manifest(tmp_path, capsys, first, later, what):
    base, fts = _ckpts(tmp_path)
    store = tmp_path / "st"
    assert _add(store, base, fts[0], "a", *first) == 0
    before = open(store / MANIFEST).read()
    assert _add(store, base, fts[1], "b", *later) == 1
    err = _err(capsys)
    assert all(w in err for w in what), err
    assert open(store / MANIFEST).read() == before
    # the same values (or none) are fine
    assert _add(store, base, fts[1], "b", *first) == 0
