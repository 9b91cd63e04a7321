"""Frozen configuration dataclasses for the Qwen2 backbone.

`ModelConfig` is the single description of a backbone's geometry and numerics. It is built from a
Hugging Face `config.json` (`from_hf_config`) or from GGUF metadata (`from_gguf_metadata`), is
hashable (usable as a static jit argument) and validates itself on construction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from clp_jax.model import files

MATMUL_LAYOUTS = ("auto", "rows", "cols")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str) -> Any:
    """Maps a dtype name ('float32', 'bfloat16', 'float16') to the jnp dtype."""
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Geometry and numerics of a Qwen2 / Qwen2.5 decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations, matmuls and the KV cache
    # Activation layout of the dots (weights are stored [out, in] either way; see layers.Proj):
    # "rows" (x @ W^T), "cols" (W @ x^T kept transposed through the layers), or "auto": the
    # environment variable CLP_MATMUL_LAYOUT if set, else "cols" on XLA:CPU and "rows" elsewhere.
    matmul_layout: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}) for grouped-query attention.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        parse_dtype(self.param_dtype)
        parse_dtype(self.dtype)
        if self.matmul_layout not in MATMUL_LAYOUTS:
            raise ValueError(f"ModelConfig.matmul_layout must be one of {MATMUL_LAYOUTS}, "
                             f"got {self.matmul_layout!r}.")

    @property
    def jnp_param_dtype(self):
        return parse_dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return parse_dtype(self.dtype)

    @property
    def num_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields: {sorted(unknown)}.")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | str, **overrides) -> "ModelConfig":
        """Builds a config from a Hugging Face Qwen2 `config.json` (a dict or a path)."""
        if isinstance(hf, str):
            hf = files.read_json_object(hf, "Model config")
        model_type = hf.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ValueError(f"Only Qwen2/Qwen2.5 checkpoints are supported, got model_type={model_type!r}.")
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling and rope_scaling.get("type", rope_scaling.get("rope_type")) not in (None, "default"):
            raise ValueError(f"rope_scaling={rope_scaling} is not supported; remove it for contexts "
                             "within max_position_embeddings.")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers 5 nests it under rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
        num_heads = hf["num_attention_heads"]
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads", num_heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, vocab_size: int, tied: bool,
                           **overrides) -> "ModelConfig":
        """Builds a config from GGUF key/values (`qwen2.*`); vocab and tying come from the tensors."""
        arch = meta.get("general.architecture")
        if arch != "qwen2":
            raise ValueError(f"Only GGUF files of architecture 'qwen2' are supported, got {arch!r}.")
        num_heads = int(meta["qwen2.attention.head_count"])
        hidden = int(meta["qwen2.embedding_length"])
        fields = dict(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(meta["qwen2.feed_forward_length"]),
            num_layers=int(meta["qwen2.block_count"]),
            num_heads=num_heads,
            num_kv_heads=int(meta.get("qwen2.attention.head_count_kv", num_heads)),
            head_dim=hidden // num_heads,
            rope_theta=float(meta.get("qwen2.rope.freq_base", 1_000_000.0)),
            # GGUF stores eps as float32 (9.99999997e-07); round back to the float the model was trained with.
            rms_norm_eps=float(f"{float(meta.get('qwen2.attention.layer_norm_rms_epsilon', 1e-6)):.6g}"),
            tie_word_embeddings=tied,
            max_position_embeddings=int(meta.get("qwen2.context_length", 32768)),
        )
        fields.update(overrides)
        return cls(**fields)


# Geometries of the published Qwen2.5 checkpoints (their config.json), for planning without a download.
QWEN25_GEOMETRIES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                       num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                                       num_heads=12, num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "Qwen/Qwen2.5-3B-Instruct": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                                     num_heads=16, num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                                     num_heads=28, num_kv_heads=4, head_dim=128, tie_word_embeddings=False),
}


def known_geometry(name: str, **overrides) -> ModelConfig:
    """ModelConfig of a published Qwen2.5 model by hub id (base or -Instruct), without downloading it."""
    key = name if name in QWEN25_GEOMETRIES else f"{name}-Instruct"
    if key not in QWEN25_GEOMETRIES:
        raise ValueError(f"No known geometry for {name!r}; known: {', '.join(QWEN25_GEOMETRIES)}.")
    return ModelConfig(**QWEN25_GEOMETRIES[key], **overrides)
