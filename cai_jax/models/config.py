"""Model shapes: the frozen dataclass the Flax module reads, and the size ladder.

A `TransformerConfig` is hashable (Flax modules need static attributes). Experiment
configs hold a `model` ConfigDict; `model_config_from_dict` turns it into this
dataclass after applying the named ladder entry and any per-field overrides.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from cai_jax.models.matmul import check_matmul_dtype

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
HEADS = ("lm", "scalar")
ROPE_SCALINGS = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How a model rescales RoPE's inverse frequencies (HF config.json's
    `rope_scaling`, or `rope_parameters` in transformers 5); models/rope.py
    applies it.

    "linear": every frequency divided by `factor` (positions interpolated).
    "llama3" (Llama 3.1 onwards): rotations with wavelengths shorter than
    original_max_position_embeddings / high_freq_factor are kept, those longer
    than original_max_position_embeddings / low_freq_factor are slowed by
    `factor`, and the band between is blended linearly in
    original_max_position_embeddings / wavelength.
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None  # llama3 only, as are the two below
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALINGS:
            raise ValueError(f"model.rope_scaling.rope_type is {self.rope_type!r}; one of {ROPE_SCALINGS}")
        llama3 = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        given = [k for k in llama3 if getattr(self, k) is not None]
        if self.rope_type == "llama3" and len(given) < len(llama3):
            missing = next(k for k in llama3 if k not in given)
            raise ValueError(f"model.rope_scaling 'llama3' needs {missing}")
        if self.rope_type == "linear" and given:
            raise ValueError(f"model.rope_scaling 'linear' takes only a factor, not {given[0]}")
        if self.rope_type == "llama3" and not self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"model.rope_scaling 'llama3': low_freq_factor ({self.low_freq_factor}) must be "
                             f"below high_freq_factor ({self.high_freq_factor})")
        if not self.factor > 0:
            raise ValueError(f"model.rope_scaling.factor is {self.factor}; must be positive")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything that fixes the shapes and numerics of a decoder."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int = 2048
    # Architecture family switches: llama = RoPE + RMSNorm + SwiGLU;
    # gpt2 = learned positions + LayerNorm + GELU MLP + biases.
    arch: str = "llama"
    rope_theta: float = 10000.0
    # None: plain RoPE. A dict (as model.json holds it) becomes a RopeScaling.
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v only.
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Precision of the matrix products (models/matmul.py): "bfloat16" rounds
    # their operands and sums in float32, 3-4x faster on CPUs with AMX.
    matmul_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    heads: tuple[str, ...] = ("lm",)

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"model.arch is {self.arch!r}; must be 'llama' or 'gpt2'")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be a multiple of "
                f"model.num_kv_heads ({self.num_kv_heads})")
        if self.rope_scaling is not None and self.arch != "llama":
            raise ValueError(f"model.rope_scaling is for RoPE (arch 'llama'); arch {self.arch!r} has none")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"model.head_dim ({self.head_dim}) must be even for RoPE")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name} is {getattr(self, name)!r}; one of {sorted(DTYPES)}")
        check_matmul_dtype(self.matmul_dtype)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat is {self.remat!r}; one of {REMAT_POLICIES}")
        bad = [h for h in self.heads if h not in HEADS]
        if bad or not self.heads:
            raise ValueError(f"model.heads is {self.heads!r}; a non-empty subset of {HEADS}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (LM head included when untied), computed from shapes."""
        d, f = self.d_model, self.mlp_dim
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        if self.out_bias:
            attn += d
        mlp = (3 if self.arch == "llama" else 2) * d * f
        if self.mlp_bias:
            mlp += f + d
        norms = (2 if self.arch == "llama" else 4) * d
        per_layer = attn + mlp + norms
        total = self.num_layers * per_layer + self.vocab_size * d
        total += d if self.arch == "llama" else 2 * d  # final norm
        if self.arch == "gpt2":
            total += self.max_seq_len * d
        if "lm" in self.heads and not self.tie_embeddings:
            total += d * self.vocab_size
        if "scalar" in self.heads:
            total += d + 1
        return total


def _llama(d_model: int, num_layers: int, num_heads: int, num_kv_heads: int, mlp_dim: int,
           vocab_size: int = 65536, **kw) -> dict[str, Any]:
    return dict(arch="llama", vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
                num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=d_model // num_heads,
                mlp_dim=mlp_dim, **kw)


def _paper_size(num_layers: int) -> dict[str, Any]:
    # Askell et al. 2021 (the model family CAI used) published only a few shapes;
    # d_model = 128 * n_layers (head_dim 128, one head per layer) matches the two
    # that are known (52B: 64 x 8192, 13B: 40 x 5120) and, with a SwiGLU width of
    # 8/3 d (about 12 * L * d^2 weights outside the embeddings), lands each size's
    # non-embedding count within 5% of its nominal value.
    d = 128 * num_layers
    mlp = int(round(8 * d / 3 / 256)) * 256
    return _llama(d, num_layers, num_heads=num_layers, num_kv_heads=num_layers, mlp_dim=mlp,
                  max_seq_len=2048, rope_theta=10000.0, tie_embeddings=False)


# The size ladder. `tiny` runs tests in seconds; `smollm2-135m` is the bundled
# default; the rest are the paper's sizes (Perez et al. 2022 / Bai et al. 2022).
MODEL_LADDER: dict[str, dict[str, Any]] = {
    "tiny": _llama(64, 2, num_heads=4, num_kv_heads=2, mlp_dim=128, vocab_size=49152,
                   max_seq_len=512, rope_theta=10000.0, tie_embeddings=True),
    "tiny-gpt2": dict(arch="gpt2", vocab_size=49152, d_model=64, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=16, mlp_dim=256, max_seq_len=512,
                      qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True),
    "smollm2-135m": _llama(576, 30, num_heads=9, num_kv_heads=3, mlp_dim=1536, vocab_size=49152,
                           max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True),
    # The packaged GGUF's shapes (qwen2: biases on q, k, v; its own output head).
    "qwen2.5-coder-0.5b": _llama(896, 24, num_heads=14, num_kv_heads=2, mlp_dim=4864, vocab_size=151936,
                                 max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                                 tie_embeddings=False),
    "810m": _paper_size(16),
    "1.6b": _paper_size(20),
    "3.5b": _paper_size(26),
    "6.4b": _paper_size(32),
    "13b": _paper_size(40),
    "22b": _paper_size(48),
    "52b": _paper_size(64),
}

FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}


def hf_rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """An HF config.json's RoPE settings as one dict with "rope_type" and
    "rope_theta": transformers 5 writes them as `rope_parameters`, earlier
    versions as `rope_scaling` (type under "type" or "rope_type") beside a
    top-level `rope_theta`. As transformers reads them, `rope_scaling` wins
    over `rope_parameters`, and a theta inside the dict over the top-level one."""
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope["rope_type"] = rope.get("rope_type") or rope.pop("type", None) or "default"
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope.setdefault("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return rope


def rope_scaling_from_hf(hf: Mapping[str, Any]) -> RopeScaling | None:
    """The RopeScaling an HF config.json asks for; None for plain RoPE or a
    kind we do not model (hf_features_not_modelled names it)."""
    rope = hf_rope_parameters(hf)
    kind = rope["rope_type"]
    if kind not in ROPE_SCALINGS:
        return None
    keys = ["factor"] + (["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
                         if kind == "llama3" else [])
    missing = [k for k in keys if rope.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling {kind!r} has no {missing[0]!r}")
    return RopeScaling(rope_type=kind, **{k: rope[k] for k in keys})


def hf_sliding_window(hf: Mapping[str, Any]) -> int | None:
    """The attention window an HF config.json asks for, when some layer would
    see fewer keys than max_position_embeddings allows; None for full
    attention. As transformers reads it: Qwen2 slides only with
    use_sliding_window and then only in layers from max_window_layers on;
    Mistral slides whenever sliding_window is set (default 4096)."""
    kind = hf.get("model_type")
    window = hf.get("sliding_window", 4096 if kind == "mistral" else None)
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        slides = "sliding_attention" in layer_types
    elif kind == "qwen2":
        slides = bool(hf.get("use_sliding_window")) and \
            hf.get("max_window_layers", 28) < hf.get("num_hidden_layers", 0)
    else:
        slides = kind == "mistral"
    if not slides or window is None or window >= hf.get("max_position_embeddings", 2048):
        return None
    return int(window)


def hf_features_not_modelled(hf: Mapping[str, Any]) -> list[str]:
    """What an HF config.json asks for that a TransformerConfig cannot hold,
    one sentence each: a RoPE scaling other than linear and llama3, and
    sliding-window attention. None of it changes a shape (tools/aot may go on
    with a note), but real weights in our model would compute something else:
    loading them refuses (weights/hf.py)."""
    notes = []
    rope = hf_rope_parameters(hf)
    if rope["rope_type"] not in ("default",) + ROPE_SCALINGS:
        notes.append(f"rope_scaling {rope['rope_type']!r} (factor {rope.get('factor')}) is not modelled "
                     f"(only {', '.join(ROPE_SCALINGS)}): the rotary frequencies would be wrong")
    if rope["partial_rotary_factor"] != 1.0:
        notes.append(f"partial_rotary_factor {rope['partial_rotary_factor']} is not modelled: "
                     "RoPE would turn the whole head")
    window = hf_sliding_window(hf)
    if window is not None:
        notes.append(f"sliding-window attention (window {window}) is not modelled: "
                     "every layer would attend to the whole context")
    return notes


def model_config_from_dict(model: Mapping[str, Any]) -> TransformerConfig:
    """Builds a TransformerConfig from `config.model`.

    `model.name` selects a ladder entry; any other key whose value is not None
    overrides that entry's field (so `--config.model.num_layers=4` works).
    """
    model = dict(model)
    name = model.pop("name", None)
    if name is not None and name not in MODEL_LADDER:
        raise ValueError(f"config.model.name is {name!r}; known sizes: {sorted(MODEL_LADDER)}")
    fields = dict(MODEL_LADDER[name]) if name else {}
    for key, value in model.items():
        if key in ("source",):  # where the weights come from; not a shape
            continue
        if key not in FIELDS:
            raise ValueError(f"config.model.{key} is not a model field; known: {sorted(FIELDS)}")
        if value is not None:
            fields[key] = tuple(value) if key == "heads" else value
    missing = FIELDS - fields.keys() - {f.name for f in dataclasses.fields(TransformerConfig)
                                        if f.default is not dataclasses.MISSING}
    if missing:
        raise ValueError(f"config.model is missing {sorted(missing)} (set model.name or each field)")
    return TransformerConfig(**fields)
