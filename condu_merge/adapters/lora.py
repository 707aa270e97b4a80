"""PEFT LoRA adapters: load/save, factor-wise and dense ConDU merges, export by truncated SVD.

A LoRA module adds ``ΔW = s · B A`` to a base weight ``W [out, in]``, with ``A [r, in]``,
``B [out, r]`` and scaling ``s = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``;
per-module ``rank_pattern`` / ``alpha_pattern`` honoured). A PEFT adapter folder holds
``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``...lora_B.weight``.

Two merge modes:

* **factor-wise** (the paper's ConDU (LoRA)): a task's delta is ``(A_t − A_0, B_t − B_0)`` per
  module, relative to the *shared initialisation* ``(A_0, B_0)``; the factors themselves are
  unified element-wise. Adapters must agree in ranks, targets, scaling and initialisation, or
  the merge is refused (:class:`LoraCompatibilityError`). A decoupled expert is ``init + δ̃``,
  a regular adapter (:func:`factor_expert`).
* **dense**: each module's ``ΔW = s · B A`` is merged as a full-weight delta keyed
  ``<module>.weight`` (the base model's own names, so :class:`~condu_merge.adapters.ClipExperts`
  and :func:`~condu_merge.adapters.swap_params` apply it directly). :func:`export_peft` turns a
  decoupled dense expert back into a PEFT folder of rank ``r`` by truncated SVD and reports the
  truncation error.

Other LoRA formats (e.g. a training script's own factors on attention/MLP projections) enter
through :meth:`LoraAdapter.from_factors`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checkpoints import check_lora_config, peft_pattern_key, read_json
from ..errors import ConduError, FormatError, KeyMismatchError, ShapeMismatchError

__all__ = [
    "CONFIG_NAME",
    "FACTOR_CONFIG_FIELDS",
    "INIT_RECORD_NAME",
    "TRUNCATION_WARN",
    "WEIGHTS_NAME",
    "ExportReport",
    "LoraAdapter",
    "LoraCompatibilityError",
    "TruncationWarning",
    "check_compatible",
    "dense_delta",
    "export_peft",
    "factor_delta",
    "factor_expert",
    "init_lora",
    "lora_module_name",
    "lora_param_name",
    "lora_transform",
    "lora_weights",
    "record_init",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
INIT_RECORD_NAME = "condu_lora_init.json"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.([A-Za-z0-9_\-]+))?\.weight$")

# config fields that must agree for a factor-wise merge (they change what the factors mean)
FACTOR_CONFIG_FIELDS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "init_lora_weights",
    "use_dora",
    "lora_bias",
)
_MUST_MATCH = FACTOR_CONFIG_FIELDS
TRUNCATION_WARN = 0.1
"""Relative truncation error of :func:`export_peft` above which it warns (:class:`TruncationWarning`)."""


class TruncationWarning(UserWarning):
    """A rank-``r`` export loses more than :data:`TRUNCATION_WARN` of the expert's ΔW (relative Frobenius)."""


class LoraCompatibilityError(ConduError, ValueError):
    """LoRA adapters that cannot be merged factor-wise (rank, targets, scaling or init differ)."""


def _pattern_key(patterns: Mapping[str, Any], module: str, where: str = CONFIG_NAME) -> str | None:
    """PEFT's rule: a ``rank_pattern``/``alpha_pattern`` key matches a module name it ends
    (at a dot boundary), read as a regular expression -- matched with a timeout, since the
    patterns come from an untrusted file (:func:`condu_merge.checkpoints.peft_pattern_key`)."""
    return peft_pattern_key(patterns, module, where)


@dataclass
class LoraAdapter:
    """One LoRA adapter: ``factors[module] = (A, B)`` plus its PEFT config (a plain dict).

    ``path`` is where it was loaded from (used in error messages only)."""

    config: dict[str, Any]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    path: str | None = None
    init_fingerprint: str | None = field(default=None)

    # ------------------------------------------------------------------ io
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LoraAdapter:
        """Read a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = os.fspath(path)
        cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FormatError(f"{p}: missing; a PEFT LoRA folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            config = read_json(cfg_path, "the adapter config")
        except OSError as e:
            raise FormatError(f"{cfg_path}: unreadable adapter config ({e})") from None
        if not isinstance(config, dict):
            raise FormatError(f"{cfg_path}: not a JSON object")
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise FormatError(
                f"{cfg_path}: not a LoRA adapter config (peft_type={config.get('peft_type') if isinstance(config, dict) else None!r})"
            )
        check_lora_config(config, cfg_path)
        try:
            tensors = load_file(w_path)
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{w_path}: unreadable safetensors file ({e})") from None
        init = None
        rec = os.path.join(path, INIT_RECORD_NAME)
        if os.path.isfile(rec):
            try:
                with open(rec, encoding="utf-8") as f:
                    init = json.load(f)["init_fingerprint"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise FormatError(f"{rec}: unreadable init record ({e})") from None
        return cls(config=config, factors=_parse_factors(tensors, w_path), path=path, init_fingerprint=init)

    @classmethod
    def from_factors(
        cls,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        *,
        r: int,
        lora_alpha: float,
        use_rslora: bool = False,
        base_model_name_or_path: str | None = None,
    ) -> LoraAdapter:
        """Wrap factors of any origin: ``factors[module] = (A [r, in], B [out, r])``, module names
        as in the base model (``...q_proj``, without ``.weight``)."""
        for m, (a, b) in factors.items():
            if a.shape[0] != r or b.shape[1] != r:
                raise ShapeMismatchError(f"module {m!r}: A {tuple(a.shape)} / B {tuple(b.shape)} are not rank {r}")
        config = _peft_config(
            sorted(factors),
            r=r,
            lora_alpha=lora_alpha,
            use_rslora=use_rslora,
            base_model_name_or_path=base_model_name_or_path,
        )
        return cls(config=config, factors={m: (a, b) for m, (a, b) in factors.items()})

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write a PEFT folder that ``peft.PeftModel.from_pretrained(base, path)`` loads."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        tensors = {}
        for m, (a, b) in self.factors.items():
            tensors[f"{_PREFIX}{m}.lora_A.weight"] = a.detach().contiguous().cpu()
            tensors[f"{_PREFIX}{m}.lora_B.weight"] = b.detach().contiguous().cpu()
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=2, sort_keys=True)
        if self.init_fingerprint is not None:
            record_init(path, self.init_fingerprint)
        return path

    # ------------------------------------------------------------------ math
    @property
    def modules(self) -> list[str]:
        return sorted(self.factors)

    def rank(self, module: str) -> int:
        pat = _pattern_key(self.config.get("rank_pattern") or {}, module, self._config_where())
        return int(self.config["rank_pattern"][pat]) if pat is not None else int(self.config["r"])

    def scaling(self, module: str) -> float:
        """``lora_alpha / r`` for this module (``/ √r`` with ``use_rslora``), patterns honoured."""
        r = self.rank(module)
        pat = _pattern_key(self.config.get("alpha_pattern") or {}, module, self._config_where())
        alpha = float(self.config["alpha_pattern"][pat]) if pat is not None else float(self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def fingerprint(self) -> str:
        """SHA-256 over module names, shapes, dtypes and bytes of the factors (identifies an init)."""
        h = hashlib.sha256()
        for m in self.modules:
            for t in self.factors[m]:
                c = t.detach().contiguous().cpu()
                h.update(f"{m}|{tuple(c.shape)}|{c.dtype}|".encode())
                h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _config_where(self) -> str:
        return os.path.join(self.path, CONFIG_NAME) if self.path else CONFIG_NAME

    def who(self) -> str:
        return f"adapter {self.path!r}" if self.path else "adapter"

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraAdapter:
        """The same adapter (config, path, recorded init) with its factors moved/cast."""
        return LoraAdapter(
            config=self.config,
            path=self.path,
            init_fingerprint=self.init_fingerprint,
            factors={
                m: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
                for m, (a, b) in self.factors.items()
            },
        )


def _parse_factors(tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        m = _KEY.match(k)
        if m is None:
            raise FormatError(
                f"{where}: tensor {k!r} is not a LoRA factor (lora_A/lora_B); DoRA magnitudes, LoRA "
                "biases, embedding LoRA and modules_to_save are not supported"
            )
        slot = parts.setdefault(m.group(1), {})
        if m.group(2) in slot:
            # two adapter names (lora_A.default / lora_A.other) for one module: which one is meant?
            raise FormatError(
                f"{where}: module {m.group(1)!r} has more than one {m.group(2)} tensor "
                f"(several adapter names in one file); save one adapter per folder"
            )
        slot[m.group(2)] = t
    out = {}
    for mod, p in parts.items():
        if set(p) != {"lora_A", "lora_B"}:
            raise FormatError(f"{where}: module {mod!r} has {sorted(p)} but needs both lora_A and lora_B")
        a, b = p["lora_A"], p["lora_B"]
        if a.shape[0] != b.shape[1]:
            raise ShapeMismatchError(
                f"{where}: module {mod!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on the rank"
            )
        out[mod] = (a, b)
    return out


def _peft_config(
    modules: Sequence[str],
    *,
    r: int,
    lora_alpha: float,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
    task_type: str | None = None,
) -> dict[str, Any]:
    """A minimal LoRA ``adapter_config.json`` (PEFT fills the rest with its defaults); targets are
    full module names, so exactly those modules get a LoRA."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": lora_alpha,
        "target_modules": list(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": bool(fan_in_fan_out),
        "use_rslora": use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
    }


def record_init(path: str | os.PathLike[str], init: LoraAdapter | str) -> str:
    """Write ``condu_lora_init.json`` into an adapter folder: the fingerprint of the shared
    initialisation it was trained from (call it right after training, with the init adapter)."""
    fp = init if isinstance(init, str) else init.fingerprint()
    rec = os.path.join(os.fspath(path), INIT_RECORD_NAME)
    with open(rec, "w", encoding="utf-8") as f:
        json.dump({"init_fingerprint": fp}, f)
    return rec


# ---------------------------------------------------------------------------- factor-wise


def _targets(cfg: Mapping[str, Any]) -> Any:
    t = cfg.get("target_modules")
    return sorted(t) if isinstance(t, (list, tuple, set)) else t


def check_compatible(adapters: Sequence[LoraAdapter], init: LoraAdapter) -> None:
    """Refuse (``LoraCompatibilityError`` naming the adapter and the field) unless every adapter
    has the init's modules, factor shapes (ranks), scaling settings, targets and base model,
    and any recorded initialisation fingerprint equals the init's."""
    ref_fp = None
    for ad in adapters:
        who = ad.who()
        for k in _MUST_MATCH:
            a, b = ad.config.get(k), init.config.get(k)
            if (a or None) != (b or None) and a != b:
                raise LoraCompatibilityError(
                    f"{who}: config {k}={a!r} differs from the init's {b!r}; factor-wise merge refused"
                )
        if _targets(ad.config) != _targets(init.config):
            raise LoraCompatibilityError(
                f"{who}: target_modules {_targets(ad.config)!r} differ from the init's {_targets(init.config)!r}; factor-wise merge refused"
            )
        ba, bi = ad.config.get("base_model_name_or_path"), init.config.get("base_model_name_or_path")
        if ba and bi and ba != bi:
            raise LoraCompatibilityError(f"{who}: base model {ba!r} differs from the init's {bi!r}")
        if set(ad.factors) != set(init.factors):
            missing, extra = sorted(set(init.factors) - set(ad.factors)), sorted(set(ad.factors) - set(init.factors))
            raise LoraCompatibilityError(
                f"{who}: LoRA modules differ from the init's (missing {missing[:5]}, extra {extra[:5]})"
            )
        for m, (a, b) in ad.factors.items():
            a0, b0 = init.factors[m]
            if a.shape != a0.shape or b.shape != b0.shape:
                raise LoraCompatibilityError(
                    f"{who}: module {m!r} has A {tuple(a.shape)} / B {tuple(b.shape)}, the init A {tuple(a0.shape)} / "
                    f"B {tuple(b0.shape)} (rank {a.shape[0]} vs {a0.shape[0]}); factor-wise merge refused"
                )
            if a.dtype != a0.dtype or b.dtype != b0.dtype:
                raise LoraCompatibilityError(f"{who}: module {m!r} dtype {a.dtype} differs from the init's {a0.dtype}")
        if ad.init_fingerprint is not None:
            ref_fp = ref_fp or init.fingerprint()
            if ad.init_fingerprint != ref_fp:
                raise LoraCompatibilityError(
                    f"{who}: recorded initialisation {ad.init_fingerprint[:12]}… is not the given init "
                    f"({ref_fp[:12]}…); the factors do not share a starting point, factor-wise merge refused"
                )


def factor_delta(adapter: LoraAdapter, init: LoraAdapter) -> dict[str, torch.Tensor]:
    """The task delta for a factor-wise merge: ``{<module>.lora_A.weight: A_t − A_0,
    <module>.lora_B.weight: B_t − B_0}`` (after :func:`check_compatible`)."""
    check_compatible([adapter], init)
    out = {}
    for m in init.modules:
        (a, b), (a0, b0) = adapter.factors[m], init.factors[m]
        out[f"{m}.lora_A.weight"] = a - a0
        out[f"{m}.lora_B.weight"] = b - b0
    return out


def factor_expert(init: LoraAdapter, delta: Mapping[str, torch.Tensor]) -> LoraAdapter:
    """``init + δ̃`` as an adapter with the init's config (``delta`` from ``decouple``)."""
    expected = {f"{m}.lora_{x}.weight" for m in init.modules for x in "AB"}
    if set(delta) != expected:
        missing, extra = sorted(expected - set(delta)), sorted(set(delta) - expected)
        raise KeyMismatchError(
            f"factor delta does not match the init's modules (missing {missing[:5]}, extra {extra[:5]})"
        )
    factors = {}
    for m, (a0, b0) in init.factors.items():
        da, db = delta[f"{m}.lora_A.weight"], delta[f"{m}.lora_B.weight"]
        factors[m] = ((a0 + da.to(a0.dtype)).to(a0.dtype), (b0 + db.to(b0.dtype)).to(b0.dtype))
    return LoraAdapter(config=dict(init.config), factors=factors, init_fingerprint=init.fingerprint())


# ---------------------------------------------------------------------------- dense


def dense_delta(adapter: LoraAdapter, *, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """``{<module>.weight: s · B A}`` per module (float32 by default). Linear LoRA gives
    ``[out, in]``; conv LoRA (``A [r, in, kh, kw]``, ``B [out, r, 1, 1]``) gives the kernel
    ``(B.flatten(1) @ A.flatten(1)).reshape(out, in, kh, kw)``; ``fan_in_fan_out`` transposes."""
    out = {}
    for m in adapter.modules:
        a, b = adapter.factors[m]
        wide = dtype or a.dtype
        if a.dim() == 2 and b.dim() == 2:
            d = b.to(wide) @ a.to(wide)
            if adapter.config.get("fan_in_fan_out"):
                d = d.t()
        elif a.dim() == 4 and b.dim() == 4 and b.shape[2:] == (1, 1):
            d = (b.flatten(1).to(wide) @ a.flatten(1).to(wide)).reshape(b.shape[0], *a.shape[1:])
        else:
            raise ShapeMismatchError(
                f"{adapter.who()}: module {m!r}: unsupported LoRA factor shapes A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
        if a.shape[0] != adapter.rank(m):
            # the scaling alpha/r reads r from the config: it must be the factors' rank
            raise ShapeMismatchError(
                f"{adapter.who()}: module {m!r}: factors have rank {a.shape[0]} but the config "
                f"(r / rank_pattern) says {adapter.rank(m)}; the scaling would be wrong"
            )
        out[f"{m}.weight"] = (d * adapter.scaling(m)).contiguous()
    return out


@dataclass(frozen=True)
class ExportReport:
    """Truncation error of :func:`export_peft`: per module ``‖ΔW − ΔW_r‖_F / ‖ΔW‖_F`` (0 for a
    zero ΔW) and over all modules ``√(Σ‖ΔW − ΔW_r‖²) / √(Σ‖ΔW‖²)``; ``rank`` as written."""

    rank: int
    per_module: dict[str, float]
    total: float
    path: str


def _is_conv1d(model: nn.Module, module: str) -> bool:
    """A GPT-2-style ``Conv1D`` (weight stored ``[in, out]``), recognised by class name so that
    transformers need not be imported."""
    try:
        return type(model.get_submodule(module)).__name__ == "Conv1D"
    except AttributeError:
        raise KeyMismatchError(f"the model has no module {module!r}") from None


def export_peft(
    delta: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    rank: int,
    *,
    lora_alpha: float | None = None,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool | None = None,
    model: nn.Module | None = None,
    task_type: str | None = None,
    warn_above: float | None = TRUNCATION_WARN,
) -> ExportReport:
    """Write a dense expert ``{<module>.weight: ΔW [out, in]}`` as a PEFT LoRA folder of rank ``rank``.

    ``fan_in_fan_out=True`` is for modules that store their weight as ``[in, out]`` (GPT-2's
    ``Conv1D``): ``ΔW`` is then given in that stored layout, factorised as ``ΔWᵀ`` and the
    config says ``fan_in_fan_out`` so PEFT transposes back (PEFT refuses such modules otherwise).
    ``None`` (default) detects it from ``model`` (the base model: every module a ``Conv1D``
    → ``True``, none → ``False``, a mix is refused), or ``False`` without a model.
    ``task_type`` (e.g. ``"CAUSAL_LM"``) is written to the config, so
    ``AutoPeftModelFor….from_pretrained`` picks the right class. A total truncation error above
    ``warn_above`` issues a :class:`TruncationWarning` (``None``: never).

    Per module ``ΔW = U S Vᵀ`` (SVD in float64), ``ΔW_r = U_r S_r V_rᵀ`` (Eckart–Young: the best
    rank-``r`` approximation in Frobenius norm); with ``s = lora_alpha / r`` (default
    ``lora_alpha = r``, so ``s = 1``) the factors are ``B = U_r √S_r / √s``, ``A = √S_r V_rᵀ / √s``,
    so that ``s · B A = ΔW_r``. Matrices of rank below ``r`` are padded with zero factors. The
    residual comes from the discarded singular values. Factors keep ``ΔW``'s dtype.
    """
    if rank < 1:
        raise ValueError(f"export rank must be >= 1, got {rank}")
    alpha = float(rank) if lora_alpha is None else float(lora_alpha)
    scale = alpha / rank
    if scale <= 0:
        raise ValueError(f"lora_alpha must be positive, got {lora_alpha}")
    if fan_in_fan_out is None:
        kinds = {_is_conv1d(model, k[: -len(".weight")]) for k in delta} if model is not None else {False}
        if len(kinds) > 1:
            raise ValueError("the delta mixes Conv1D ([in, out]) and Linear modules; export them separately")
        fan_in_fan_out = kinds.pop() if kinds else False
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    per_module: dict[str, float] = {}
    res2 = tot2 = 0.0
    for key, d in delta.items():
        if not key.endswith(".weight"):
            raise KeyMismatchError(f"dense delta key {key!r} is not a '<module>.weight' name")
        if d.dim() != 2:
            raise ShapeMismatchError(
                f"dense delta {key!r} has shape {tuple(d.shape)}; only 2-D (linear) weights export to LoRA"
            )
        module = key[: -len(".weight")]
        w = d.detach().to(torch.float64)
        if fan_in_fan_out:
            w = w.t()  # the stored [in, out] layout -> the [out, in] that B A has
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt() / math.sqrt(scale)
        b = torch.zeros(w.shape[0], rank, dtype=torch.float64, device=w.device)
        a = torch.zeros(rank, w.shape[1], dtype=torch.float64, device=w.device)
        b[:, :k] = u[:, :k] * root
        a[:k] = root[:, None] * vh[:k]
        r2, t2 = float((s[k:] ** 2).sum()), float((s**2).sum())
        per_module[module] = math.sqrt(r2 / t2) if t2 > 0 else 0.0
        res2, tot2 = res2 + r2, tot2 + t2
        factors[module] = (a.to(d.dtype).cpu(), b.to(d.dtype).cpu())
    ad = LoraAdapter(
        config=_peft_config(
            sorted(factors),
            r=rank,
            lora_alpha=alpha,
            base_model_name_or_path=base_model_name_or_path,
            fan_in_fan_out=fan_in_fan_out,
            task_type=task_type,
        ),
        factors=factors,
    )
    out = ad.save(path)
    total = math.sqrt(res2 / tot2) if tot2 > 0 else 0.0
    if warn_above is not None and total > warn_above:
        import warnings

        worst = max(per_module, key=per_module.__getitem__)
        warnings.warn(
            f"export_peft: rank-{rank} truncation error {total:.3f} (relative Frobenius of ΔW) exceeds {warn_above}; "
            f"worst module {worst!r}: {per_module[worst]:.3f}; raise the rank",
            TruncationWarning,
            stacklevel=2,
        )
    return ExportReport(rank=rank, per_module=per_module, total=total, path=out)


def peft_lora_parameters(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.nn.Parameter]:
    """The live LoRA factor parameters of a PEFT model, keyed ``<module>.lora_A.weight`` /
    ``<module>.lora_B.weight`` (the module names :class:`LoraAdapter` uses: PEFT's saved keys
    without the ``base_model.model.`` prefix and the adapter name).

    This is what a :class:`~condu_merge.strategies.ContinualStrategy` over LoRA factors needs
    (PAM's global LoRA): ``base = {k: p.detach().clone() for k, p in params.items()}``, copy
    ``start.params`` into the parameters before training, hand the same mapping to
    ``start.hook.attach(params, optimizer=opt)`` and to ``end_task(params=...)``."""
    out: dict[str, torch.nn.Parameter] = {}
    for name, p in model.named_parameters():
        m = _KEY.match(name)
        if m is None or m.group(3) != adapter_name:
            continue
        key = f"{m.group(1)}.{m.group(2)}.weight"
        if key in out:
            raise LoraCompatibilityError(f"two parameters of adapter {adapter_name!r} map to {key!r}")
        out[key] = p
    if not out:
        raise KeyMismatchError(
            f"the model has no LoRA parameters of adapter {adapter_name!r} (lora_A/lora_B.{adapter_name}.weight)"
        )
    return out


# ---------------------------------------------------------------------------- LoRA on a model

# nn.MultiheadAttention (open_clip's attention, torch's Transformer layers) holds the fused q/k/v
# projection as a parameter ``in_proj_weight`` of the attention module, not as a Linear: its LoRA
# "module" is named ``<attn>.in_proj`` and adapts ``<attn>.in_proj_weight``.
_FUSED_SUFFIX = "attn.in_proj"


def lora_param_name(module: str) -> str:
    """The model parameter a LoRA module adapts: ``<module>.weight``, except a fused attention
    projection (module ``...attn.in_proj`` -> parameter ``...attn.in_proj_weight`` of
    ``nn.MultiheadAttention``, e.g. open_clip's)."""
    return module + "_weight" if module.endswith(_FUSED_SUFFIX) else module + ".weight"


def lora_module_name(param: str) -> str:
    """Inverse of :func:`lora_param_name`: the LoRA module name of a weight parameter."""
    if param.endswith(_FUSED_SUFFIX + "_weight"):
        return param[: -len("_weight")]
    if not param.endswith(".weight"):
        raise KeyMismatchError(f"parameter {param!r} is neither '<module>.weight' nor a fused '...attn.in_proj_weight'")
    return param[: -len(".weight")]


def init_lora(
    model: nn.Module,
    modules: Sequence[str],
    *,
    rank: int,
    lora_alpha: float,
    seed: int,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
) -> LoraAdapter:
    """A shared LoRA initialisation for ``modules`` of ``model``, as PEFT initialises LoRA:
    ``A [r, in]`` Kaiming-uniform with ``a = √5``, i.e. ``U(−b, b)`` with
    ``b = gain · √(3 / in) = √(6 / ((1 + a²) · in)) = 1 / √in``, and ``B [out, r] = 0`` (so the
    adapted model starts at ``θ_0``). Float32 on the CPU, drawn from a generator seeded with
    ``seed`` module after module in the given order: the same arguments give the same bytes.

    Every task of a factor-wise ConDU (LoRA) session starts from this one init; save it
    (:meth:`LoraAdapter.save`, a PEFT folder) and pass it to :func:`factor_delta` /
    :func:`factor_expert`. ``modules`` are LoRA module names (:func:`lora_param_name` gives the
    adapted parameter, which must be a 2-D weight of ``model``); PEFT itself cannot target a
    fused ``in_proj_weight``, this function can."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not modules:
        raise ValueError("init_lora needs at least one module")
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(int(seed))
    factors = {}
    for m in modules:
        name = lora_param_name(m)
        if name not in params:
            raise KeyMismatchError(f"LoRA module {m!r}: the model has no parameter {name!r}")
        if params[name].dim() != 2:
            raise ShapeMismatchError(
                f"LoRA module {m!r}: parameter {name!r} has shape {tuple(params[name].shape)}, not a 2-D weight"
            )
        out_f, in_f = params[name].shape
        bound = math.sqrt(6.0 / ((1 + 5.0) * in_f))  # kaiming_uniform_(a=√5)
        factors[m] = ((torch.rand(rank, in_f, generator=g) * 2 - 1) * bound, torch.zeros(out_f, rank))
    return LoraAdapter.from_factors(
        factors, r=rank, lora_alpha=lora_alpha, use_rslora=use_rslora, base_model_name_or_path=base_model_name_or_path
    )


def _dense_by_param(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {lora_param_name(k[: -len(".weight")]): d for k, d in dense_delta(adapter).items()}


def lora_weights(model: nn.Module, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """``{W: W + s · B A}`` for every module of ``adapter`` under the model's parameter names
    (``s · B A`` from :func:`dense_delta`, computed on the factors' device in float32, then cast
    to ``W``'s device and dtype), ``W`` read (detached) from ``model`` (θ_0). Differentiable in
    the factors: pass the result to :func:`~condu_merge.adapters.functional_forward` /
    :func:`~condu_merge.adapters.clip_encode` to train them, or to
    :func:`~condu_merge.adapters.swap_params` to evaluate. ``W`` is θ_0 even inside a swap
    (:func:`~condu_merge.adapters.clip.pristine_tensor`)."""
    from .clip import pristine_tensor

    params = dict(model.named_parameters())
    out = {}
    for name, d in _dense_by_param(adapter).items():
        if name not in params:
            raise KeyMismatchError(f"{adapter.who()}: the model has no parameter {name!r}")
        w = pristine_tensor(model, name)
        out[name] = w + d.to(w.device, w.dtype)
    return out


def lora_transform(
    init: LoraAdapter, model: nn.Module
) -> Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """For :meth:`ClipExperts.from_store(..., transform=...) <condu_merge.adapters.ClipExperts.from_store>`:
    maps a decoupled factor-wise delta ``δ̃_t`` (keys ``<module>.lora_A.weight`` /
    ``...lora_B.weight``) to the full-weight delta ``{param: s · B_t A_t}`` with
    ``(A_t, B_t) = init + δ̃_t`` (:func:`factor_expert`), so the expert is ``W + s · B_t A_t``.

    ``s · B A`` is computed in float32 on the model's device with autocast off and without
    gradients (the same numbers whether or not the caller runs under autocast)."""

    def transform(delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        adapter = factor_expert(init, delta)
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            return _dense_by_param(adapter.to(device))

    return transform
