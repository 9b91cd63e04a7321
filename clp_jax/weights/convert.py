"""Hugging Face safetensors and GGUF -> Flax parameters, without torch.

One declarative table maps each Hugging Face tensor name to a parameter path of `Qwen2` and a
transform per weight kind. HF stores linear weights `[out, in]` and so does `Qwen2` (one copy serves
both activation layouts, see model/layers.Proj): the transforms only split head dimensions. GGUF names are first renamed to
their Hugging Face equivalents, so both sources go through the same table, the same shape asserts
and the same check that every parameter is set exactly once.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Callable, Iterable, Iterator

import gguf
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from tqdm.auto import tqdm

from clp_jax.model import files as user_files
from clp_jax.model.config import ModelConfig
from clp_jax.model.qwen2 import Qwen2, abstract_model

Array = np.ndarray | jnp.ndarray


def _identity(w, cfg):
    return w


def _heads_out(w, cfg):  # [N*H, D] -> [N, H, D] (q/k/v: Flax keeps HF's [out, in])
    return w.reshape(-1, cfg.head_dim, w.shape[-1])


def _heads_bias(w, cfg):  # [N*H] -> [N, H]
    return w.reshape(-1, cfg.head_dim)


def _heads_in(w, cfg):  # [D, N*H] -> [D, N, H]
    return w.reshape(w.shape[0], -1, cfg.head_dim)


# (Hugging Face name pattern, Flax parameter path template, transform)
HF_TO_FLAX: tuple[tuple[str, str, Callable], ...] = (
    (r"model\.embed_tokens\.weight", "embed.embedding", _identity),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.attn_norm.scale", _identity),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.{0}.attn.q.kernel", _heads_out),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.{0}.attn.k.kernel", _heads_out),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.{0}.attn.v.kernel", _heads_out),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", "layers.{0}.attn.q.bias", _heads_bias),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", "layers.{0}.attn.k.bias", _heads_bias),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", "layers.{0}.attn.v.bias", _heads_bias),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{0}.attn.o.kernel", _heads_in),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.mlp_norm.scale", _identity),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{0}.mlp.gate.kernel", _identity),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{0}.mlp.up.kernel", _identity),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{0}.mlp.down.kernel", _identity),
    (r"model\.norm\.weight", "final_norm.scale", _identity),
    (r"lm_head\.weight", "lm_head.kernel", _identity),
)

# GGUF (llama.cpp) tensor name -> Hugging Face name. Qwen2 uses NeoX-style RoPE, so llama.cpp stores
# q/k without the interleaving permutation it applies to LLaMA: no inverse permutation is needed.
GGUF_TO_HF: tuple[tuple[str, str], ...] = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{0}.self_attn.q_proj.{1}"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{0}.self_attn.k_proj.{1}"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{0}.self_attn.v_proj.{1}"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{0}.mlp.down_proj.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
)


# MiMo-MTP layers stored beside the backbone (weights/mimo.py reads them; the backbone skips them)
MTP_PREFIX = "model.mtp_layers."


class ConversionError(ValueError):
    """A checkpoint does not match the model it is converted into."""


def _rename(name: str, table) -> tuple[str, Callable | None] | None:
    for pattern, template, *transform in table:
        m = re.fullmatch(pattern, name)
        if m:
            return template.format(*m.groups()), (transform[0] if transform else None)
    return None


def _path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def params_from_tensors(cfg: ModelConfig, tensors: Iterable[tuple[str, Array]]) -> Qwen2:
    """Builds a `Qwen2` from (Hugging Face name, array [out, in]) pairs.

    Asserts each converted shape against the model's, that no parameter is set twice, that none is
    missing, and handles tied embeddings (a stored `lm_head.weight` equal to the embedding is dropped).
    """
    graphdef, abstract = nnx.split(abstract_model(cfg))
    expected = {_path_key(p): v for p, v in nnx.to_flat_state(abstract)}
    values: dict[str, Array] = {}
    tied_head = None
    for name, w in tensors:
        renamed = _rename(name, HF_TO_FLAX)
        if renamed is None:
            if name.endswith("rotary_emb.inv_freq") or name.startswith(MTP_PREFIX):  # buffers; MTP layers
                continue
            raise ConversionError(f"Unexpected tensor {name!r} in a Qwen2 checkpoint.")
        key, transform = renamed
        if key == "lm_head.kernel" and cfg.tie_word_embeddings:
            tied_head = w
            continue
        if key not in expected:
            raise ConversionError(f"Tensor {name!r} maps to {key!r}, which the model (config: "
                                  f"{cfg.num_layers} layers) does not have.")
        if key in values:
            raise ConversionError(f"Parameter {key!r} is set twice (again by {name!r}).")
        want = tuple(expected[key].shape)
        try:
            converted = transform(w, cfg)
        except (TypeError, ValueError):  # e.g. a reshape that cannot fit
            converted = None
        if converted is None or tuple(converted.shape) != want:
            raise ConversionError(f"{name!r} of shape {tuple(w.shape)} does not fit {key!r} of "
                                  f"shape {want} (config: {cfg}).")
        w = converted
        values[key] = jnp.asarray(w, dtype=cfg.jnp_param_dtype)
    missing = sorted(set(expected) - set(values))
    if missing:
        hint = " (an untied model needs lm_head.weight)" if "lm_head.kernel" in missing else ""
        raise ConversionError(f"Checkpoint is missing {len(missing)} parameter(s){hint}: {missing[:8]}")
    if tied_head is not None and not np.allclose(np.asarray(tied_head, np.float32),
                                                 np.asarray(values["embed.embedding"], np.float32)):
        raise ConversionError("Config says tie_word_embeddings, but lm_head.weight differs from the "
                              "embedding; set tie_word_embeddings=false.")
    return model_from_flat(graphdef, abstract, values)


def model_from_flat(graphdef, abstract, values: dict[str, Array]) -> Qwen2:
    """Merges flat `{'layers.0.attn.q.kernel': array}` values into the abstract state."""
    flat = nnx.to_flat_state(abstract)
    leaves = []
    for path, var in flat:
        leaves.append((path, var.replace(values[_path_key(path)])))
    state = nnx.from_flat_state(leaves)
    return nnx.merge(graphdef, state)


def flat_params(model: Qwen2) -> dict[str, jnp.ndarray]:
    """The inverse of `model_from_flat`: `{'layers.0.attn.q.kernel': array}`."""
    return {_path_key(p): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ---------------------------------------------------------------- back to Hugging Face

_INVERSE: dict[Callable, Callable] = {
    _identity: lambda w, cfg: w,
    _heads_out: lambda w, cfg: w.reshape(-1, w.shape[-1]),  # [N, H, D] -> [N*H, D]
    _heads_bias: lambda w, cfg: w.reshape(-1),  # [N, H] -> [N*H]
    _heads_in: lambda w, cfg: w.reshape(w.shape[0], -1),  # [D, N, H] -> [D, N*H]
}


def hf_tensors(model: Qwen2) -> dict[str, np.ndarray]:
    """The inverse of `params_from_tensors`: Hugging Face names and `[out, in]` arrays (float32).

    Drives a transformers `Qwen2ForCausalLM` with exactly these weights (the benchmark's peers).
    """
    return flat_to_hf(flat_params(model), model.cfg)


def flat_to_hf(flat: dict[str, Array], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Flat Flax parameters (`{'layers.0.attn.q.kernel': array}`, any subset of a `Qwen2`'s) -> Hugging
    Face names and `[out, in]` float32 arrays, through HF_TO_FLAX read backwards."""
    table = [(re.escape(template).replace(r"\{0\}", r"(\d+)"), pattern, transform)
             for pattern, template, transform in HF_TO_FLAX]
    out = {}
    for key, value in flat.items():
        for flax_pattern, hf_pattern, transform in table:
            m = re.fullmatch(flax_pattern, key)
            if m:
                name = hf_pattern.replace(r"(\d+)", "{0}").replace("\\.", ".").format(*m.groups())
                out[name] = np.array(_INVERSE[transform](np.asarray(value, np.float32), cfg), order="C")
                break
        else:
            raise ConversionError(f"No Hugging Face name for parameter {key!r}.")
    return out


def hf_to_flat(tensors: Iterable[tuple[str, Array]], cfg: ModelConfig) -> dict[str, Array]:
    """(Hugging Face name, array) pairs -> flat Flax parameters, transformed but not shape-checked
    (`params_from_tensors` checks a whole model; callers of this check their own part)."""
    out = {}
    for name, w in tensors:
        renamed = _rename(name, HF_TO_FLAX)
        if renamed is None:
            raise ConversionError(f"Unexpected tensor {name!r} in a Qwen2 checkpoint.")
        key, transform = renamed
        out[key] = transform(w, cfg)
    return out


# ---------------------------------------------------------------- Hugging Face directory


def index_files(index: str) -> list[str]:
    """The weight files a sharded checkpoint's model.safetensors.index.json names (its weight_map's values)."""
    fix = "Copy the checkpoint again: its index must map every tensor name to a .safetensors file."
    weight_map = user_files.read_json_object(index, "Safetensors index", required=("weight_map",),
                                             hint=fix)["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise user_files.FileFormatError(f"Safetensors index {index!r}: 'weight_map' must map tensor names to "
                                         f"file names. {fix}")
    return sorted(set(weight_map.values()))


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, jnp.ndarray]]:
    """Yields (name, array) from a single or sharded safetensors checkpoint (bf16 kept as bf16)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        files = [os.path.join(model_dir, f) for f in index_files(index)]
    else:
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in {model_dir!r}. Qwen2 checkpoints in "
                                "pytorch_model.bin format are not supported; re-save with safetensors.")
    for path in files:
        if not os.path.exists(path):
            raise FileNotFoundError(f"Shard {path!r} named by the safetensors index is missing.")
        with safe_open(path, framework="flax") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def convert_hf_dir(model_dir: str, **config_overrides) -> Qwen2:
    """Converts a Hugging Face Qwen2 checkpoint directory into a `Qwen2` module."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{model_dir!r} has no config.json; is it a Hugging Face model directory?")
    cfg = ModelConfig.from_hf_config(config_path, **config_overrides)
    return params_from_tensors(cfg, iter_safetensors(model_dir))


# ---------------------------------------------------------------- GGUF


def gguf_metadata(reader) -> dict:
    """Scalar and string key/values of a GGUF file (arrays such as the vocabulary are skipped)."""
    meta = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        meta[key] = field.contents()
    return meta


def convert_gguf(path: str, *, progress: bool = False, reader=None, **config_overrides) -> Qwen2:
    """Converts a Qwen2 `.gguf` file into a `Qwen2` module, dequantizing with the gguf package.

    Pass an open `gguf.GGUFReader` as `reader` to share it (opening a 0.5B file takes ~9 s).
    """
    reader = reader or gguf.GGUFReader(path)
    meta = gguf_metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ConversionError(f"{path!r} has no token_embd.weight; is it a Qwen2 GGUF?")
    vocab_size = int(by_name["token_embd.weight"].shape[-1])
    cfg = ModelConfig.from_gguf_metadata(meta, vocab_size=vocab_size,
                                         tied="output.weight" not in by_name, **config_overrides)

    def tensors():
        for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
            renamed = _rename(t.name, GGUF_TO_HF)
            if renamed is None:
                raise ConversionError(f"Unexpected tensor {t.name!r} in a qwen2 GGUF file.")
            w = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy, [out, in]
            yield renamed[0], np.asarray(w, np.float32)

    return params_from_tensors(cfg, tensors())
