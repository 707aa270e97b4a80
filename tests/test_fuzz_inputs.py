"""Fuzzing what the library reads from untrusted files: safetensors headers, store manifests and
PEFT adapter configs. Every outcome must be a success or one of the library's own errors
(:class:`condu_merge.errors.ConduError`) naming the file -- never a bare Python or C++ exception,
never a hang (each case runs under an alarm)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import tempfile

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import (  # noqa: E402
    HealthCheck,
    given,
    settings,
    strategies as st,
)
from safetensors.torch import save_file  # noqa: E402

from condu_merge.checkpoints import SafetensorsFile, TaskDelta, open_checkpoint  # noqa: E402
from condu_merge.errors import ConduError  # noqa: E402
from condu_merge.store import MANIFEST, Store  # noqa: E402

CASE_SECONDS = 10.0
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def bounded(seconds: float = CASE_SECONDS):
    def on_alarm(*_):
        raise TimeoutError(f"a fuzz case ran longer than {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _outcome(fn, where: str) -> None:
    """Run ``fn``: success, or a ConduError whose one-line message names ``where``."""
    with bounded():
        try:
            fn()
        except ConduError as exc:
            msg = str(exc)
            assert where in msg, msg
            assert "\n" not in msg, msg


# values JSON can hold, the awkward ones included (huge ints, inf/nan floats, deep nesting)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from([0, 1, -1, 2**63, 2**64, "abc", "F32", "U8", "(", "(.*.*)*x"]),
)
_json = st.recursive(
    _scalars,
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)),
    max_leaves=12,
)


def _dumps(obj) -> str:
    return json.dumps(obj, allow_nan=True)


# ---------------------------------------------------------------------------- safetensors headers

_dims = st.one_of(st.integers(min_value=0, max_value=6), st.sampled_from([-1, 2**31, 2**62, 2**63, 2**64]), _scalars)
_entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "BOOL", "F8_E4M3", "X9"]), _scalars),
        "shape": st.one_of(st.lists(_dims, max_size=3), _scalars),
        "data_offsets": st.one_of(
            st.lists(st.one_of(st.integers(min_value=-4, max_value=200), _scalars), min_size=2, max_size=2), _json
        ),
    }
)
_header = st.one_of(
    st.dictionaries(st.text(min_size=1, max_size=5), st.one_of(_entry, _json), max_size=4),
    st.dictionaries(st.just("__metadata__"), _json, max_size=1),
    _json,
)


@FUZZ
@given(
    header=_header,
    data=st.binary(max_size=160),
    raw=st.one_of(st.none(), st.binary(max_size=40)),
    depth=st.sampled_from([0, 0, 0, 5000]),
)
def test_fuzz_safetensors_headers(header, data, raw, depth):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fuzz.safetensors")
        text = raw if raw is not None else ("[" * depth + _dumps(header) + "]" * depth).encode()
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(text)) + text + data)

        def use():
            with SafetensorsFile(path) as f:
                for k in f.keys():
                    t = f.get(k)
                    assert tuple(t.shape) == tuple(f.spec(k).shape)
            ck = open_checkpoint(path)
            ck.close()

        _outcome(use, path)


# ---------------------------------------------------------------------------- store manifests


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fuzz") / "st")
    g = torch.Generator().manual_seed(0)
    with Store(root) as s:
        for i in range(2):
            s.add_task(
                f"t{i}", {"w": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}, rescaler="per_tensor"
            )
        s.save_prototypes("t0", {"p": torch.ones(2)})
    return root


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(data=st.data())
def test_fuzz_manifests_with_recomputed_checksums(good_store, data):
    with open(os.path.join(good_store, MANIFEST)) as fh:
        m = json.load(fh)
    paths = [p for p in _paths(m) if p and p[0] != "checksum"]
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        where = data.draw(st.sampled_from(paths))
        node = m
        for k in where[:-1]:
            node = node[k]
        if isinstance(node, dict) and data.draw(st.booleans()) and where[-1] in node and len(where) > 1:
            del node[where[-1]]
        else:
            node[where[-1]] = data.draw(_json)
        paths = [p for p in _paths(m) if p and p[0] != "checksum"]
        if not paths:
            break
    body = {k: v for k, v in m.items() if k != "checksum"}
    with contextlib.suppress(ValueError, TypeError):
        m["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    with tempfile.TemporaryDirectory() as d:
        root = os.path.join(d, "st")
        shutil.copytree(good_store, root)
        with open(os.path.join(root, MANIFEST), "w") as fh:
            fh.write(_dumps(m))

        def use():
            with Store(root) as s:
                for t in s.task_names:
                    s.decouple(t)
                    s.load_prototypes(t)
                s.storage()
                s.mask_stats()

        _outcome(use, root)


# ---------------------------------------------------------------------------- adapter configs

_pattern = st.text(alphabet="().*+?|[]{}\\^$ab.w0,", max_size=10)
_config = st.fixed_dictionaries(
    {},
    optional={
        "peft_type": st.one_of(st.just("LORA"), _scalars),
        "r": st.one_of(st.integers(min_value=-1, max_value=4), _scalars),
        "lora_alpha": st.one_of(st.floats(min_value=-2, max_value=64), _scalars),
        "alpha_pattern": st.one_of(
            st.dictionaries(_pattern, st.one_of(st.floats(min_value=0, max_value=32), _scalars), max_size=3), _json
        ),
        "rank_pattern": st.one_of(
            st.dictionaries(_pattern, st.one_of(st.integers(min_value=0, max_value=4), _scalars), max_size=3), _json
        ),
        "use_rslora": _scalars,
        "fan_in_fan_out": st.booleans(),
        "use_dora": st.one_of(st.just(False), _scalars),
    },
)


@FUZZ
@given(
    cfg=st.one_of(_config, _json),
    rank=st.integers(min_value=0, max_value=3),
    rank_b=st.integers(min_value=0, max_value=3),
    cols=st.sampled_from([8, 7]),
)
def test_fuzz_adapter_configs(tmp_path_factory, cfg, rank, rank_b, cols):
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base.safetensors")
        save_file({"blk.w.weight": torch.randn(12, 8), "blk.b": torch.randn(8)}, base)
        ad = os.path.join(d, "ad")
        os.makedirs(ad)
        save_file(
            {
                "base_model.model.blk.w.lora_A.weight": torch.randn(rank, cols),
                "base_model.model.blk.w.lora_B.weight": torch.randn(12, rank_b),
            },
            os.path.join(ad, "adapter_model.safetensors"),
        )
        with open(os.path.join(ad, "adapter_config.json"), "w") as fh:
            fh.write(_dumps(cfg))

        def use():
            td = TaskDelta(open_checkpoint(base), open_checkpoint(ad))
            try:
                for k in td.default_keys():
                    td.check(k, tuple(td.base.spec(k).shape))
                    td.delta(k, torch.float32)
            finally:
                td.close()

        _outcome(use, ad)
