"""Stores of PEFT LoRA adapters that stay LoRA-sized: the paper's factor-wise ConDU (LoRA).

A task is an adapter folder; its delta is ``(A_t − A_0, B_t − B_0)`` per module, keyed
``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, where ``(A_0, B_0)`` is the shared
initialisation (``init=``, a PEFT folder saved before training; without it the zero init, i.e.
the factors are merged as they are). The store's ``u`` and masks cover the factors only, so
it is about the size of one adapter plus one bit per factor element and task.

Every task records its source (kind ``peft-lora-factors``): the adapter's path, its
``adapter_config.json`` (so an export carries ``task_type``, ``base_model_name_or_path``,
``target_modules``, ``r``, ``lora_alpha``, ``fan_in_fan_out``), the base checkpoint's identity and
the init's path and fingerprint. All adapters of a store agree on targets, ranks and scaling
(:func:`~condu_merge.adapters.lora.check_compatible`'s fields) and on base and init.

A decoupled expert is the adapter ``init + λ M ⊙ u`` (:func:`expert_adapter`); its full weights
are ``W + s · B A`` (:func:`expert_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from ._lazy import torch

from .adapters.lora import (
    CONFIG_NAME,
    FACTOR_CONFIG_FIELDS,
    TRUNCATION_WARN,
    WEIGHTS_NAME,
    LoraAdapter,
    LoraCompatibilityError,
    dense_delta,
    export_peft,
    factor_delta,
    factor_expert,
    lora_param_name,
)
from .checkpoints import PeftAdapter, checkpoint_identity, open_checkpoint
from .digests import default_algorithm, record_algorithm
from .errors import FormatError, KeyMismatchError, ShapeMismatchError
from .manifest_check import LORA_FACTORS_KIND as KIND, LORA_MODES, is_lora_store, lora_mode

__all__ = [
    "KIND",
    "LORA_MODES",
    "add_adapter_task",
    "expert_adapter",
    "expert_weights",
    "export_adapter",
    "export_dense_adapter",
    "is_lora_store",
    "lora_mode",
]


def _zero_init(ad: LoraAdapter) -> LoraAdapter:
    return LoraAdapter(
        config=dict(ad.config),
        factors={m: (torch.zeros_like(a), torch.zeros_like(b)) for m, (a, b) in ad.factors.items()},
    )


def _check_against_base(ad: LoraAdapter, base, where: str) -> dict[str, Any]:
    """Every module adapts a 2-D base weight of the factors' shape (``[out, in]``, or ``[in, out]``
    with ``fan_in_fan_out``); returns the config with ``fan_in_fan_out`` as the base needs it."""
    if ad.config.get("use_dora"):
        raise LoraCompatibilityError(f"{where}: DoRA adapters are not supported (their delta is not B·A)")
    keys = set(base.keys())
    cfg = dict(ad.config)
    fifo = bool(cfg.get("fan_in_fan_out"))
    for m, (a, b) in ad.factors.items():
        name = lora_param_name(m)
        if name not in keys:
            raise KeyMismatchError(f"{where}: LoRA module {m!r} adapts {name!r}, which the base {base.path} lacks")
        shape = tuple(base.spec(name).shape)
        out_in = (b.shape[0], a.shape[1])
        if a.dim() != 2 or b.dim() != 2:
            raise ShapeMismatchError(
                f"{where}: module {m!r} has non-linear LoRA factors (A {tuple(a.shape)}); use --lora dense"
            )
        want = out_in[::-1] if fifo else out_in
        if shape != want:
            hint = " (fan_in_fan_out would fit: the config is wrong)" if shape == want[::-1] else ""
            raise ShapeMismatchError(
                f"{where}: module {m!r}: shape mismatch: B A is {want}, the base weight {name!r} is {shape}{hint}"
            )
    return cfg


def _config_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    t = cfg.get("target_modules")
    return {
        **{k: cfg.get(k) or None for k in FACTOR_CONFIG_FIELDS},
        "target_modules": sorted(t) if isinstance(t, (list, tuple, set)) else t,
    }


def add_adapter_task(
    store,
    name: str,
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    *,
    init: str | os.PathLike | None = None,
    rescaler: str = "tensor_mean",
    backend: str = "auto",
    progress: bool = False,
    source_extra: Mapping[str, Any] | None = None,
) -> None:
    """Fold PEFT adapter ``adapter`` into ``store`` factor-wise (see the module docstring).

    The first task fixes targets, ranks, scaling, base and init; a later one that differs is
    refused naming the field, and so is a dense store (created with ``--lora dense``)."""
    adapter = os.fspath(adapter)
    where = adapter
    try:
        ad = LoraAdapter.load(adapter)
    except FormatError as exc:
        raise FormatError(
            f"{exc} (a factor-wise store needs plain LoRA A/B factors; --lora dense merges it as full weights)"
        ) from None
    bck = open_checkpoint(base)
    try:
        if isinstance(bck, PeftAdapter):
            raise ValueError(f"{base}: the base must be a full checkpoint, not an adapter")
        cfg = _check_against_base(ad, bck, where)
        prev = store.manifest["tasks"] if store.manifest else []
        if prev and not is_lora_store(store):
            raise LoraCompatibilityError(
                f"{store.root}: this store holds dense deltas (--lora dense); adapter {where} cannot be added factor-wise "
                "(pass --lora dense, or use a new store)"
            )
        init_ad = LoraAdapter.load(init) if init is not None else None
        # the base's identity in the digest the store's first task recorded it in (so they compare),
        # else in the digest this store writes now
        base0 = (prev[0].get("source") or {}).get("base") if prev else None
        algo = record_algorithm(base0) or default_algorithm()
        ident = checkpoint_identity(bck, algo)
        init_rec = (
            {"path": os.path.abspath(os.fspath(init)), "fingerprint": init_ad.fingerprint()}
            if init_ad and init is not None
            else None
        )
        if prev:
            src0 = prev[0]["source"]
            a, b = _config_fields(src0["adapter_config"]), _config_fields(cfg)
            for k in a:
                if a[k] != b[k]:
                    raise LoraCompatibilityError(
                        f"{where}: config {k}={b[k]!r} differs from the store's {a[k]!r} (task {prev[0]['name']!r}); factor-wise merge refused"
                    )
            if (src0.get("base") or {}).get(algo) not in (None, ident[algo]):
                raise ValueError(
                    f"{base}: differs from the base the store's adapters were added against ({src0['base']['path']})"
                )
            fp0 = (src0.get("init") or {}).get("fingerprint")
            if fp0 != (init_rec or {}).get("fingerprint"):
                raise LoraCompatibilityError(
                    f"{where}: initialisation {'(zero)' if init_rec is None else init_rec['path']} differs from the store's "
                    f"{'(zero)' if fp0 is None else src0['init']['path']}; factor-wise deltas need one shared init"
                )
        delta = (
            factor_delta(ad, init_ad)
            if init_ad is not None
            else {
                f"{m}.lora_{x}.weight": t
                for m, (a_, b_) in sorted(ad.factors.items())
                for x, t in (("A", a_), ("B", b_))
            }
        )
        if init_ad is None:
            delta = {k: delta[k] for k in sorted(delta)}
    finally:
        bck.close()
    source = {
        "path": os.path.abspath(adapter),
        "kind": KIND,
        "adapter_config": cfg,
        "bytes": os.path.getsize(os.path.join(adapter, WEIGHTS_NAME)),
        "base": ident,
        "init": init_rec,
        **(source_extra or {}),
    }
    store.add_task(name, delta, rescaler=rescaler, backend=backend, progress=progress, source=source)


def _init_of(store, src: Mapping[str, Any], like: LoraAdapter) -> LoraAdapter:
    rec = src.get("init")
    if rec is None:
        return _zero_init(like)
    init = LoraAdapter.load(rec["path"])
    if init.fingerprint() != rec["fingerprint"]:
        raise FormatError(
            f"{rec['path']}: this LoRA init changed since the store recorded it (fingerprint {rec['fingerprint'][:12]}…)"
        )
    return init


def expert_adapter(store, task: str, *, backend: str = "auto") -> LoraAdapter:
    """Task ``task``'s decoupled adapter ``init + λ M ⊙ u`` with the task's own config."""
    src = store.task_info(task).get("source") or {}
    if src.get("kind") != KIND:
        raise ValueError(f"{store.root}: task {task!r} is not a factor-wise LoRA task")
    delta = dict(store.iter_decouple(task, backend=backend))
    modules = sorted({k[: -len(".lora_A.weight")] for k in delta if k.endswith(".lora_A.weight")})
    like = LoraAdapter(
        config=dict(src["adapter_config"]),
        factors={m: (delta[f"{m}.lora_A.weight"], delta[f"{m}.lora_B.weight"]) for m in modules},
    )
    init = _init_of(store, src, like)
    ex = factor_expert(init, delta)
    ex.config = dict(src["adapter_config"])
    ex.init_fingerprint = None
    return ex


def export_adapter(
    store, task: str, folder: str, *, task_type: str | None = None, backend: str = "auto"
) -> dict[str, Any]:
    """Write task ``task``'s decoupled adapter as a PEFT folder (``adapter_config.json`` is the
    source's, ``inference_mode`` on; ``task_type`` overrides the recorded one)."""
    ex = expert_adapter(store, task, backend=backend)
    ex.config["inference_mode"] = True
    if task_type is not None:
        ex.config["task_type"] = task_type
    ex.save(folder)
    size = os.path.getsize(os.path.join(folder, WEIGHTS_NAME))
    return {
        "tensors": 2 * len(ex.factors),
        "bytes": size,
        "files": [CONFIG_NAME, WEIGHTS_NAME],
        "task_type": ex.config.get("task_type"),
        "truncation_error": 0.0,
    }


def expert_weights(store, task: str, base, *, backend: str = "auto") -> tuple[list, Iterator[tuple[str, torch.Tensor]]]:
    """``(specs in base order, iterator of (key, W or W + s · B A))`` of the decoupled adapter on
    ``base`` (``s · B A`` in float32, then cast to ``W``'s dtype)."""
    ex = expert_adapter(store, task, backend=backend)
    dense = {lora_param_name(k[: -len(".weight")]): d for k, d in dense_delta(ex).items()}
    specs = [base.spec(k) for k in base.keys()]
    missing = set(dense) - set(base.keys())
    if missing:
        raise KeyMismatchError(f"{base.path}: base lacks adapted weights {sorted(missing)[:5]}")

    def gen():
        for s in specs:
            w = base.get(s.name)
            if s.name in dense:
                d = dense[s.name]
                if tuple(d.shape) != tuple(w.shape):
                    raise ShapeMismatchError(
                        f"{base.path}: {s.name!r} is {tuple(w.shape)}, the adapter's B A is {tuple(d.shape)}"
                    )
                w = (w.to(torch.promote_types(w.dtype, torch.float32)) + d).to(w.dtype)
            yield s.name, w

    return specs, gen()


def export_dense_adapter(
    store,
    task: str,
    folder: str,
    *,
    rank: int | None = None,
    task_type: str | None = None,
    backend: str = "auto",
    warn_above: float = TRUNCATION_WARN,
) -> dict[str, Any]:
    """A dense store's expert as a PEFT folder by truncated SVD (:func:`export_peft`): rank,
    ``lora_alpha``, ``fan_in_fan_out``, ``task_type`` and base model from the task's source adapter
    when it still exists (``rank``/``task_type`` override); warns above ``warn_above``."""
    src = store.task_info(task).get("source") or {}
    cfg: dict[str, Any] = {}
    cpath = os.path.join(src.get("path") or "", CONFIG_NAME)
    if src.get("kind") == "peft-lora" and os.path.isfile(cpath):
        import json

        with open(cpath, encoding="utf-8") as fh:
            cfg = json.load(fh)
    r = rank or cfg.get("r")
    if not r:
        raise ValueError(
            f"task {task!r}: the LoRA rank of a dense export is unknown (its source adapter is gone); pass --rank"
        )
    delta = dict(store.iter_decouple(task, backend=backend))
    bad = [k for k, v in delta.items() if v.dim() != 2 or not k.endswith(".weight")]
    if bad:
        raise ValueError(
            f"task {task!r}: tensors {bad[:3]} are not 2-D weights; a PEFT export needs a store of LoRA targets"
        )
    alpha = cfg.get("lora_alpha") if cfg.get("r") == r else None
    rep = export_peft(
        delta,
        folder,
        int(r),
        lora_alpha=alpha,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
        task_type=task_type or cfg.get("task_type"),
        warn_above=warn_above,
    )
    return {
        "tensors": 2 * len(delta),
        "bytes": os.path.getsize(os.path.join(folder, WEIGHTS_NAME)),
        "files": [CONFIG_NAME, WEIGHTS_NAME],
        "rank": rep.rank,
        "truncation_error": rep.total,
        "truncation_warning": rep.total > warn_above,
        "task_type": task_type or cfg.get("task_type"),
    }
