"""Rotary position embeddings and the context-extension methods built on them.

Every scaling method (`rope.scaling`) reduces to one inverse-frequency vector plus a scalar
that multiplies cos and sin, exactly as Hugging Face transformers defines them, so a
checkpoint trained here loads in transformers with identical attention logits
(`rope_to_hf`) and a transformers checkpoint can be extended here (`rope_from_hf`).

The one exception is `entropy_abf` (Entropy-ABF, Zhang et al. 2024, "Extending LLMs' Context
Window with 100 Samples"): plain RoPE with a larger base, plus a per-position factor on the
queries of all but the first layers (`query_scale`). transformers has no such factor, so its
export carries our settings under `LONGTRAIN_ROPE_KEY` for `rope_from_hf` to read back.

Shape legend:
    b  batch
    t  tokens held by this rank (positions are global, so they may not start at 0)
    h  attention heads
    d  head_dim (rotated dimension; always the full head)
    f  head_dim // 2 rotary frequencies

Over 450 lines on purpose: the scaling table (`_SCALINGS`) is read by the frequencies, the
validation and the transformers conversion alike; split, the conversion would import the
table's private names from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from longtrain.config.schema import RopeConfig

__all__ = [
    "LONGTRAIN_ROPE_KEY",
    "RotaryEmbedding",
    "apply_rotary",
    "query_scale",
    "rope_from_hf",
    "rope_inv_freq",
    "rope_to_hf",
]

# (rope, dim, original_max_position_embeddings, seq_len) -> (inv_freq_f float32, attention_scaling)
InvFreqFn = Callable[[RopeConfig, int, int, int | None], tuple[torch.Tensor, float]]
# (positions_bt int64, original_max_position_embeddings) -> query scale_bt float32
QueryScaleFn = Callable[[torch.Tensor, int], torch.Tensor]

# config.json key holding the RoPE settings of a scaling transformers cannot reproduce.
LONGTRAIN_ROPE_KEY = "longtrain_rope"


def _exponents_f(dim: int) -> torch.Tensor:
    # int64 arange then cast, as transformers does, so the float32 values match bit for bit.
    # Explicitly CPU: a model built under `torch.device("meta")` still needs real frequencies.
    return torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim


def _plain(
    rope: RopeConfig, dim: int, original: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    return 1.0 / (rope.theta ** _exponents_f(dim)), 1.0


def _linear(
    rope: RopeConfig, dim: int, original: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    # Dividing the frequencies by `factor` equals dividing the positions by it (interpolation).
    inv_freq_f, _ = _plain(rope, dim, original, seq_len)
    return inv_freq_f / rope.factor, 1.0


def _dynamic_ntk(
    rope: RopeConfig, dim: int, original: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    # Below the original length the base is untouched, so short sequences keep the pretrained
    # frequencies; above it the base grows with the length actually seen.
    seq_len = original if seq_len is None else max(seq_len, original)
    factor = rope.factor
    base = rope.theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _exponents_f(dim)), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, original: int) -> float:
    # The dimension whose wavelength fits `num_rotations` times into the original context.
    return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn(
    rope: RopeConfig, dim: int, original: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        # DeepSeek-style configs give both mscales; their ratio replaces the paper's 0.1*ln(s)+1.
        # Truthiness (not `is not None`) on purpose: transformers treats 0 as unset.
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(
                factor, rope.mscale_all_dim
            )
        else:
            attention_factor = _yarn_mscale(factor)

    low = _yarn_correction_dim(rope.beta_fast, dim, rope.theta, original)
    high = _yarn_correction_dim(rope.beta_slow, dim, rope.theta, original)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        # Avoids a zero-width ramp (division by zero) exactly as transformers does.
        high += 0.001

    pos_freqs_f = rope.theta ** _exponents_f(dim)
    inv_freq_extrapolation_f = 1.0 / pos_freqs_f
    inv_freq_interpolation_f = 1.0 / (factor * pos_freqs_f)
    dims_f = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
    ramp_f = torch.clamp((dims_f - low) / (high - low), 0, 1)
    # 1 for fast dimensions (kept as trained), 0 for slow ones (interpolated by `factor`).
    extrapolation_f = 1 - ramp_f
    inv_freq_f = (
        inv_freq_interpolation_f * (1 - extrapolation_f)
        + inv_freq_extrapolation_f * extrapolation_f
    )
    return inv_freq_f, float(attention_factor)


def _llama3(
    rope: RopeConfig, dim: int, original: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    inv_freq_f, _ = _plain(rope, dim, original, seq_len)
    factor = rope.factor
    low_freq_factor = rope.low_freq_factor
    high_freq_factor = rope.high_freq_factor
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor

    wavelen_f = 2 * math.pi / inv_freq_f
    # Long wavelengths (longer than the original context) are interpolated, short ones kept,
    # and the band in between is blended smoothly.
    scaled_f = torch.where(wavelen_f > low_freq_wavelen, inv_freq_f / factor, inv_freq_f)
    smooth_f = (original / wavelen_f - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_f = (1 - smooth_f) * scaled_f / factor + smooth_f * scaled_f
    is_medium_f = ~(wavelen_f < high_freq_wavelen) * ~(wavelen_f > low_freq_wavelen)
    return torch.where(is_medium_f, smoothed_f, scaled_f), 1.0


def _entropy_query_scale(positions_bt: torch.Tensor, original: int) -> torch.Tensor:
    # max(1, log(pos + 1) / log(original)). Positions inside the original context get exactly
    # 1 (not a float32 rounding of it), so short sequences see the pretrained logits unchanged.
    ratio_bt = torch.log1p(positions_bt.float()) * (1.0 / math.log(original))
    return torch.where(positions_bt >= original, ratio_bt.clamp_min(1.0), 1.0)


@dataclass(frozen=True)
class _Scaling:
    # transformers' `rope_type`
    hf_type: str
    inv_freq: InvFreqFn
    # RopeConfig fields exported into `rope_parameters` (None-valued ones are left out)
    hf_fields: tuple[str, ...] = ()
    # factor < 1 would shrink the context instead of extending it
    needs_factor: bool = False
    # transformers' dynamic NTK takes its original length from `max_position_embeddings`
    original_is_hf_max: bool = False
    # Factor on the queries of layers >= rope.entropy_unscaled_layers. transformers has no
    # such factor, so a scaling with one is also exported under LONGTRAIN_ROPE_KEY.
    query_scale: QueryScaleFn | None = None


_YARN_FIELDS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "truncate",
)
_LLAMA3_FIELDS = (
    "factor",
    "original_max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
)

# Insertion order matters for `rope_from_hf`: the first name with a given hf_type wins, so
# transformers' "default" reads back as "none" (abf is "none" with a larger theta).
_SCALINGS: dict[str, _Scaling] = {
    "none": _Scaling("default", _plain),
    "abf": _Scaling("default", _plain),
    "linear": _Scaling("linear", _linear, ("factor",), needs_factor=True),
    "dynamic_ntk": _Scaling(
        "dynamic", _dynamic_ntk, ("factor",), needs_factor=True, original_is_hf_max=True
    ),
    "yarn": _Scaling("yarn", _yarn, _YARN_FIELDS, needs_factor=True),
    "llama3": _Scaling("llama3", _llama3, _LLAMA3_FIELDS, needs_factor=True),
    "entropy_abf": _Scaling("default", _plain, query_scale=_entropy_query_scale),
}
# What LONGTRAIN_ROPE_KEY carries besides scaling and theta (the original length resolved).
_LONGTRAIN_FIELDS = ("original_max_position_embeddings", "entropy_unscaled_layers")
_FROM_HF_TYPE: dict[str, str] = {}
for _name, _spec in _SCALINGS.items():
    _FROM_HF_TYPE.setdefault(_spec.hf_type, _name)


def _validate(rope: RopeConfig, *, max_position_embeddings: int) -> _Scaling:
    spec = _SCALINGS.get(rope.scaling)
    if spec is None:
        raise ValueError(f"rope.scaling={rope.scaling!r} is not one of {sorted(_SCALINGS)}")
    if not rope.theta > 0:
        raise ValueError(f"rope.theta must be > 0, got {rope.theta}")
    if max_position_embeddings <= 0:
        raise ValueError(
            f"model.max_position_embeddings must be > 0, got {max_position_embeddings}"
        )
    original = rope.original_max_position_embeddings
    if original is not None and original <= 0:
        raise ValueError(
            f"rope.original_max_position_embeddings must be > 0 or None, got {original}"
        )
    if spec.needs_factor and not rope.factor >= 1.0:
        raise ValueError(
            f"rope.factor must be >= 1 for rope.scaling={rope.scaling!r}, got {rope.factor}"
        )
    if spec.query_scale is not None:
        if _original_max(rope, max_position_embeddings) < 2:
            raise ValueError(
                f"rope.scaling={rope.scaling!r} divides by log(original length): "
                f"rope.original_max_position_embeddings (or model.max_position_embeddings) "
                f"must be >= 2, got {_original_max(rope, max_position_embeddings)}"
            )
        if rope.entropy_unscaled_layers < 0:
            raise ValueError(
                f"rope.entropy_unscaled_layers must be >= 0, got {rope.entropy_unscaled_layers}"
            )
    if rope.scaling == "llama3" and not rope.high_freq_factor > rope.low_freq_factor:
        raise ValueError(
            f"rope.high_freq_factor ({rope.high_freq_factor}) must be greater than "
            f"rope.low_freq_factor ({rope.low_freq_factor}) for rope.scaling='llama3'"
        )
    return spec


def _validate_head_dim(rope: RopeConfig, head_dim: int) -> None:
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(
            f"RoPE rotates pairs of dimensions: head_dim must be even and > 0, got head_dim={head_dim}"
        )
    if rope.scaling == "dynamic_ntk" and head_dim <= 2:
        raise ValueError(
            f"rope.scaling='dynamic_ntk' needs head_dim > 2 (exponent d/(d-2)), got head_dim={head_dim}"
        )


def _original_max(rope: RopeConfig, max_position_embeddings: int) -> int:
    if rope.original_max_position_embeddings is None:
        return max_position_embeddings
    return rope.original_max_position_embeddings


def rope_inv_freq(
    rope: RopeConfig,
    *,
    head_dim: int,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for `rope`.

    Returns inv_freq_f float32 [head_dim // 2] on CPU, and attention_scaling (a float that
    multiplies cos and sin, as transformers does). `seq_len` is the global sequence length;
    only dynamic NTK reads it (None -> the original length, i.e. unscaled).
    """
    spec = _validate(rope, max_position_embeddings=max_position_embeddings)
    _validate_head_dim(rope, head_dim)
    original = _original_max(rope, max_position_embeddings)
    inv_freq_f, attention_scaling = spec.inv_freq(rope, head_dim, original, seq_len)
    return inv_freq_f.to(torch.float32), float(attention_scaling)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for global positions; one per model, shared by all layers."""

    inv_freq: torch.Tensor

    def __init__(self, rope: RopeConfig, *, head_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.original_max_position_embeddings = _original_max(rope, max_position_embeddings)
        self._dynamic = rope.scaling == "dynamic_ntk"
        inv_freq_f, self.attention_scaling = rope_inv_freq(
            rope, head_dim=head_dim, max_position_embeddings=max_position_embeddings
        )
        # A plain attribute, so module casts and moves never touch it (see `_apply`).
        self._inv_freq_master_f = inv_freq_f
        # Non-persistent: derived from config, so checkpoints neither carry nor depend on it.
        self.register_buffer("inv_freq", inv_freq_f.clone(), persistent=False)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> RotaryEmbedding:
        super()._apply(fn, recurse)
        # Refill from the master after every move or cast: `.to(bfloat16)` would round the
        # frequencies and `to_empty()` (meta-device init) would leave them uninitialized.
        self.inv_freq = self._inv_freq_master_f.to(self.inv_freq.device)
        return self

    def forward(
        self, positions_bt: torch.Tensor, *, seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_btd, sin_btd float32 [B, T, head_dim], already multiplied by attention_scaling.

        positions_bt: int64 [B, T], true global positions (they may restart per packed
        document). seq_len: the global sequence length, read only by dynamic NTK; None ->
        positions_bt.max() + 1. Under context parallelism pass it explicitly, since a rank's
        shard does not see the global maximum.
        """
        inv_freq_f = self.inv_freq
        attention_scaling = self.attention_scaling
        if self._dynamic:
            if seq_len is None:
                # Host sync, paid only by dynamic NTK and only when the caller omits seq_len.
                seq_len = int(positions_bt.max()) + 1
            if seq_len > self.original_max_position_embeddings:
                inv_freq_f, attention_scaling = rope_inv_freq(
                    self.rope,
                    head_dim=self.head_dim,
                    max_position_embeddings=self.max_position_embeddings,
                    seq_len=seq_len,
                )
        inv_freq_f = inv_freq_f.to(device=positions_bt.device, dtype=torch.float32)
        freqs_btf = positions_bt[..., None].float() * inv_freq_f
        # Duplicated halves match HF's rotate_half layout (pairs are (i, i + d/2), not (2i, 2i+1)).
        emb_btd = torch.cat((freqs_btf, freqs_btf), dim=-1)
        return emb_btd.cos() * attention_scaling, emb_btd.sin() * attention_scaling


def _rotate_half(x_bthd: torch.Tensor) -> torch.Tensor:
    x1_bthf, x2_bthf = x_bthd.chunk(2, dim=-1)
    return torch.cat((-x2_bthf, x1_bthf), dim=-1)


def apply_rotary(
    x_bthd: torch.Tensor,
    cos_btd: torch.Tensor,
    sin_btd: torch.Tensor,
    *,
    scale_bt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate x [B, T, H, D] (any float dtype) by cos/sin [B, T, D]; returns x's dtype.

    Uses HF Llama's rotate_half convention (dimension i pairs with i + D/2). The rotation is
    computed in float32 so bf16 inputs lose no precision beyond the final rounding.
    scale_bt: optional float32 [B, T] factor applied to the rotated x before that rounding
    (the query scale of `query_scale`).
    """
    if cos_btd.shape[-1] != x_bthd.shape[-1] or sin_btd.shape != cos_btd.shape:
        raise ValueError(
            f"cos/sin shapes {tuple(cos_btd.shape)}/{tuple(sin_btd.shape)} "
            f"do not match x {tuple(x_bthd.shape)}"
        )
    x_f32_bthd = x_bthd.float()
    cos_bt1d = cos_btd.float().unsqueeze(2)
    sin_bt1d = sin_btd.float().unsqueeze(2)
    out_bthd = x_f32_bthd * cos_bt1d + _rotate_half(x_f32_bthd) * sin_bt1d
    if scale_bt is not None:
        out_bthd = out_bthd * scale_bt.float()[:, :, None, None]
    return out_bthd.to(x_bthd.dtype)


def query_scale(
    rope: RopeConfig, positions_bt: torch.Tensor, *, max_position_embeddings: int
) -> torch.Tensor | None:
    """Per-token factor on the queries, or None when `rope.scaling` has none.

    Returns float32 [B, T] on positions_bt's device: for entropy_abf,
    max(1, log(pos + 1) / log(L)) with L the original training length
    (`rope.original_max_position_embeddings`, else `max_position_embeddings`), exactly 1 for
    pos < L. positions_bt: int64 [B, T], true global positions (restarting per packed
    document), so every context-parallel shard computes its own tokens' factors. Scaling a
    query multiplies its attention logits by the factor; it applies to layers with index >=
    `rope.entropy_unscaled_layers`, after the rotation.
    """
    spec = _validate(rope, max_position_embeddings=max_position_embeddings)
    if spec.query_scale is None:
        return None
    return spec.query_scale(positions_bt, _original_max(rope, max_position_embeddings))


def rope_to_hf(rope: RopeConfig, *, max_position_embeddings: int) -> dict[str, Any]:
    """Keys to merge into a Hugging Face config.json so transformers reproduces this RoPE.

    Returns `rope_theta`, `rope_scaling` (transformers-4 form; None for none/abf) and
    `rope_parameters` (transformers-5 form). transformers 5 still reads `rope_scaling` and
    prefers it over `rope_parameters`, so both always describe the same thing. For
    dynamic_ntk the dict also sets `max_position_embeddings` to the original length, because
    transformers' dynamic NTK uses that field as its threshold. For a scaling transformers
    cannot reproduce (entropy_abf: its query scale) the standard keys describe the RoPE
    transformers will apply (plain, with our theta) and `LONGTRAIN_ROPE_KEY` holds our
    settings, which `rope_from_hf` reads back.
    """
    spec = _validate(rope, max_position_embeddings=max_position_embeddings)
    original = _original_max(rope, max_position_embeddings)
    params: dict[str, Any] = {"rope_type": spec.hf_type}
    for name in spec.hf_fields:
        value = original if name == "original_max_position_embeddings" else getattr(rope, name)
        if value is not None:
            params[name] = value
    out: dict[str, Any] = {
        "rope_theta": float(rope.theta),
        # "type" is the only spelling transformers < 4.43 reads; later versions accept both.
        "rope_scaling": None if spec.hf_type == "default" else {"type": spec.hf_type, **params},
        "rope_parameters": {**params, "rope_theta": float(rope.theta)},
    }
    if spec.original_is_hf_max:
        out["max_position_embeddings"] = original
    if spec.query_scale is not None:
        own = {name: original if name == "original_max_position_embeddings" else getattr(rope, name)
               for name in _LONGTRAIN_FIELDS}
        out[LONGTRAIN_ROPE_KEY] = {"scaling": rope.scaling, "theta": float(rope.theta), **own}
    return out


def _cast_like_field(name: str, value: Any) -> Any:
    default = getattr(RopeConfig(), name)
    if isinstance(default, bool):
        return bool(value)
    if name == "original_max_position_embeddings" or isinstance(default, int):
        return int(value)
    return float(value)


def _from_longtrain_key(own: Any, standard: RopeConfig) -> RopeConfig:
    fields = ("scaling", "theta", *_LONGTRAIN_FIELDS)
    if not isinstance(own, dict) or set(own) != set(fields):
        raise ValueError(f"{LONGTRAIN_ROPE_KEY}={own!r} must be an object with keys {list(fields)}")
    spec = _SCALINGS.get(own["scaling"])
    if spec is None or spec.query_scale is None:
        raise ValueError(
            f"{LONGTRAIN_ROPE_KEY}.scaling={own['scaling']!r} is not a scaling that needs it; "
            f"expected one of {sorted(n for n, s in _SCALINGS.items() if s.query_scale)}"
        )
    try:
        values = {name: _cast_like_field(name, own[name]) for name in fields if name != "scaling"}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{LONGTRAIN_ROPE_KEY}={own!r} has a malformed value ({exc})") from exc
    rope = RopeConfig(scaling=own["scaling"], **values)
    # The standard keys are what transformers applies; if they were edited apart from ours,
    # neither can be trusted.
    if standard.theta != rope.theta or _SCALINGS[standard.scaling].hf_type != spec.hf_type:
        raise ValueError(
            f"{LONGTRAIN_ROPE_KEY} (scaling={rope.scaling!r}, theta={rope.theta}) disagrees with "
            f"the standard keys (rope type {_SCALINGS[standard.scaling].hf_type!r}, "
            f"rope_theta={standard.theta})"
        )
    return rope


def rope_from_hf(hf_config: dict[str, Any]) -> RopeConfig:
    """RopeConfig equivalent to a Hugging Face config.json dict.

    Reads `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4;
    "type" or "rope_type"), with transformers' precedence: a non-empty `rope_scaling` wins.
    The original length is resolved the way transformers resolves it (a top-level
    `original_max_position_embeddings`, then the dict, then `max_position_embeddings`; for
    dynamic always `max_position_embeddings`), so the result never depends on our defaults.
    Our own `LONGTRAIN_ROPE_KEY` (written by `rope_to_hf` for entropy_abf), when present,
    gives the scaling; it must agree with the standard keys.
    """
    params = dict(hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {})
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError(f"per-layer rope_parameters (keys {sorted(params)}) are not supported")
    hf_type = params.get("rope_type", params.get("type", "default"))
    name = _FROM_HF_TYPE.get(hf_type)
    if name is None:
        raise ValueError(
            f"Hugging Face rope_type={hf_type!r} is not supported; supported: {sorted(_FROM_HF_TYPE)}"
        )
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only full-head RoPE)")

    spec = _SCALINGS[name]
    theta = params.get("rope_theta")
    if theta is None:
        theta = hf_config.get("rope_theta", RopeConfig().theta)
    values: dict[str, Any] = {"scaling": name, "theta": float(theta)}
    if spec.needs_factor and params.get("factor") is None:
        raise ValueError(f"Hugging Face rope_type={hf_type!r} needs a 'factor', got {params}")
    for field in spec.hf_fields:
        if params.get(field) is not None:
            values[field] = _cast_like_field(field, params[field])

    hf_max = hf_config.get("max_position_embeddings")
    if spec.original_is_hf_max:
        values["original_max_position_embeddings"] = hf_max
    elif "original_max_position_embeddings" in spec.hf_fields:
        # transformers lets a top-level value (Phi-3 style) override the one in the dict.
        original = hf_config.get(
            "original_max_position_embeddings", values.get("original_max_position_embeddings")
        )
        values["original_max_position_embeddings"] = hf_max if original is None else int(original)
    standard = RopeConfig(**values)
    if hf_config.get(LONGTRAIN_ROPE_KEY) is not None:
        return _from_longtrain_key(hf_config[LONGTRAIN_ROPE_KEY], standard)
    return standard
