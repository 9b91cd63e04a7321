"""MiMo-MTP: the layout in which serving engines (vLLM, sglang-jax) load one MTP draft layer beside a Qwen2
target, written from and read back into clp_jax's draft layer.

An exported directory is the target's Hugging Face directory (config.json, model.safetensors, tokenizer
files with the chat template, generation_config.json) whose safetensors also hold the draft layer under
`model.mtp_layers.0.*`, and whose config.json says `architectures = ["MiMoForCausalLM"]`,
`model_type = "qwen2"` (engines build the target as Qwen2; transformers knows no "mimo") and
`num_nextn_predict_layers = 1`. clp_jax's own record (k, the confidence calibration, where the heads came
from) rides in config.json under "clp_jax"; the CLP, which no engine reads, in `clp_jax_heads.npz`.

The draft layer (drafting/draft_layer.py) maps one to one:

    clp_jax DraftLayer                      MiMo-MTP layer (prefix model.mtp_layers.0.)
    norm_feature.scale [D]                  hidden_layernorm.weight [D]
    norm_token.scale [D]                    token_layernorm.weight [D]
    fuse [2D, D] (x @ fuse)                 input_proj.weight [D, 2D] = fuse^T (Linear(2D -> D), no bias)
      rows 0:D read the feature, D:2D the   input_proj reads cat[hidden_layernorm(h), token_layernorm(e)]:
      token embedding                       the same order
    layer.* (one Qwen2 decoder layer)       input_layernorm, self_attn.*, post_attention_layernorm, mlp.*
                                            (engines load them as mtp_block.*)
    the backbone's final_norm (borrowed)    final_layernorm.weight (after the block, before the LM head)
    the backbone's embedding and LM head    the target's embed_tokens and lm_head (shared, not duplicated)

Two things the format computes differently (see docs/serving.md): vLLM's MiMo target hands the MTP layer
its hidden states before the final norm (clp_jax's draft layer reads them after it: the same drafts only
where the final norm's weight is all ones), and vLLM zeroes the token embedding at position 0.
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from clp_jax.model import files
from clp_jax.model.config import ModelConfig
from clp_jax.weights import convert
from clp_jax.weights.convert import MTP_PREFIX, flat_to_hf, hf_tensors, hf_to_flat

ARCHITECTURE = "MiMoForCausalLM"
MTP = MTP_PREFIX + "0."  # the one MTP layer
WEIGHTS = "model.safetensors"
EXTRAS = "clp_jax_heads.npz"  # the CLP: clp_jax's own, read by no engine
RECORD = "clp_jax"  # config.json key of clp_jax's record
# MTP-layer names that are not the decoder block's, and the DraftLayer parameter of each (None: the
# backbone's final norm, which the draft layer borrows)
_OWN = {"hidden_layernorm.weight": "norm_feature.scale", "token_layernorm.weight": "norm_token.scale",
        "input_proj.weight": "fuse", "final_layernorm.weight": None}
# the block's geometry that an engine takes from the target's config: the draft layer must share it
_BLOCK_FIELDS = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
                 "rms_norm_eps")


class FormatError(ValueError):
    """What the MiMo-MTP format cannot carry, or a directory that is not a MiMo-MTP export."""


# ---------------------------------------------------------------- tensors


def draft_layer_tensors(drafter, backbone_cfg: ModelConfig, final_norm) -> dict[str, np.ndarray]:
    """A DraftLayer's parameters -> `model.mtp_layers.0.*` tensors (float32, Hugging Face's [out, in])."""
    flat = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(drafter, nnx.Param))}
    own = {param: name for name, param in _OWN.items() if param}  # DraftLayer path -> MiMo name
    block = {"layers.0." + k[len("layer."):]: v for k, v in flat.items() if k.startswith("layer.")}
    unknown = sorted(set(flat) - set(own) - {k for k in flat if k.startswith("layer.")})
    if unknown:
        raise FormatError(f"Draft-layer parameters {unknown} have no MiMo-MTP name.")
    out = {MTP + name[len("model.layers.0."):]: w for name, w in flat_to_hf(block, backbone_cfg).items()}
    for param, name in own.items():
        w = np.asarray(flat[param], np.float32)
        out[MTP + name] = np.ascontiguousarray(w.T if param == "fuse" else w)  # fuse [2D, D] -> [D, 2D]
    out[MTP + "final_layernorm.weight"] = np.asarray(final_norm, np.float32)  # [D]
    return out


def draft_layer_params(tensors: dict, cfg: ModelConfig) -> tuple[dict, np.ndarray]:
    """`model.mtp_layers.0.*` tensors -> (DraftLayer parameters by flat path, final_layernorm [D])."""
    own, block = {}, []
    for name, w in tensors.items():
        rest = name[len(MTP):]
        if rest in _OWN:
            own[rest] = np.asarray(w)
        else:
            block.append(("model.layers.0." + rest, np.asarray(w)))
    missing = sorted(set(_OWN) - set(own))
    if missing:
        raise FormatError(f"The MTP layer lacks {[MTP + m for m in missing]}.")
    params = {"layer." + k[len("layers.0."):]: v for k, v in hf_to_flat(block, cfg).items()}
    for name, param in _OWN.items():
        if param:
            w = own[name]
            params[param] = w.T if param == "fuse" else w  # input_proj [D, 2D] -> fuse [2D, D]
    return params, own["final_layernorm.weight"]


# ---------------------------------------------------------------- config


def hf_config(cfg: ModelConfig, *, dtype: str, bos_token_id, eos_token_ids, record: dict) -> dict:
    """config.json of an export: a Qwen2 config that names the MiMo architecture and one MTP layer."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": list(eos_token_ids) if len(eos_token_ids) != 1 else eos_token_ids[0],
        "torch_dtype": dtype,
        "num_nextn_predict_layers": 1,
        RECORD: record,
    }


def read_config(path: str) -> dict:
    return files.read_json_object(os.path.join(path, "config.json"), "MiMo-MTP config",
                                  hint="Export the drafter again with tools/export_vllm.py.")


def is_export(path: str) -> bool:
    """Whether `path` is a directory whose config.json names the MiMo architecture or MTP layers."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        hf = read_config(path)
    except (OSError, ValueError):
        return False
    return ARCHITECTURE in (hf.get("architectures") or []) or bool(hf.get("num_nextn_predict_layers"))


# ---------------------------------------------------------------- export


def check_kind(kind: str) -> None:
    """Only a draft layer has a MiMo-MTP form."""
    if kind != "draft_layer":
        raise FormatError(
            f"These heads are of kind {kind!r} (Medusa-style residual heads on h_n): the MiMo-MTP layout "
            "carries one draft layer (a decoder block applied per draft position) and nothing like Medusa "
            "heads. Train a draft layer (HeadsConfig kind='draft_layer') to serve it with an engine.")


def check_exportable(heads, backbone_cfg: ModelConfig) -> list[str]:
    """Raises FormatError for what the format cannot carry; returns notes on what it drops."""
    cfg = heads.cfg
    check_kind(cfg.kind)
    if (cfg.hidden_size, cfg.vocab_size) != (backbone_cfg.hidden_size, backbone_cfg.vocab_size):
        raise FormatError(f"The heads were made for width {cfg.hidden_size} and vocabulary {cfg.vocab_size}; "
                          f"the backbone has {backbone_cfg.hidden_size} and {backbone_cfg.vocab_size}.")
    layer = cfg.layer_config()
    differ = [f"{f}: {getattr(layer, f)} vs {getattr(backbone_cfg, f)}" for f in _BLOCK_FIELDS
              if getattr(layer, f) != getattr(backbone_cfg, f)]
    if differ:
        raise FormatError("An engine builds the MTP block with the target's geometry, and this draft layer's "
                          f"differs ({'; '.join(differ)}).")
    if backbone_cfg.head_dim * backbone_cfg.num_heads != backbone_cfg.hidden_size:
        raise FormatError(f"head_dim {backbone_cfg.head_dim} x {backbone_cfg.num_heads} heads != hidden_size "
                          f"{backbone_cfg.hidden_size}: engines' Qwen2 derives head_dim from the width.")
    notes = []
    if cfg.k > 1:
        notes.append(f"The heads draft k={cfg.k} tokens with one shared layer; the export carries that one "
                     "layer (num_nextn_predict_layers=1) and engines reuse it for every speculative token: "
                     f"serve with num_speculative_tokens between 1 and {cfg.k}.")
    if cfg.trunk_feature != "pre_norm":
        notes.append("The draft layer reads the trunk's final-normed state; engines hand the MTP layer the state "
                     "before the final norm, so their first drafts differ slightly from clp_jax's (measured on the "
                     "demo: first-draft agreement 0.218 vs 0.239). Drafters trained with heads.trunk_feature = "
                     "\"pre_norm\" export exactly.")
    if heads.draft_vocab is not None:
        notes.append(f"The heads were trained on a {heads.draft_vocab.shape[0]}-token draft vocabulary; the "
                     "export drafts over the full vocabulary through the target's LM head.")
    if getattr(heads, "gate", None) is not None:
        notes.append("The gate baseline (gate heads and MLP) is not exported.")
    return notes


def export(out_dir: str, backbone, heads, *, dtype: str | None = None,
           source: str | None = None) -> list[str]:
    """Writes backbone (a `loading.Backbone`) + draft-layer heads as a MiMo-MTP Hugging Face directory.

    Args:
      dtype: the stored dtype ('float32' or 'bfloat16'; default: the backbone's parameter dtype).
      source: where the heads came from (recorded in config.json).
    Returns:
      notes on what the export dropped or how to serve it (also for the CLI to print).
    """
    cfg = backbone.cfg
    dtype = dtype or cfg.param_dtype
    if dtype not in ("float32", "bfloat16"):
        raise FormatError(f"dtype {dtype!r}: use float32 or bfloat16.")
    notes = check_exportable(heads, cfg)
    model = backbone.model
    tensors = hf_tensors(model)
    tensors.update(draft_layer_tensors(heads.drafter, cfg, model.final_norm.scale[...]))
    os.makedirs(out_dir, exist_ok=True)
    jdtype = jnp.dtype(dtype)
    save_file({k: jnp.asarray(v, jdtype) for k, v in tensors.items()}, os.path.join(out_dir, WEIGHTS),
              metadata={"format": "pt"})
    np.savez(os.path.join(out_dir, EXTRAS), **{
        "clp.linear.kernel": np.asarray(heads.clp.linear.kernel[...], np.float32),
        "clp.linear.bias": np.asarray(heads.clp.linear.bias[...], np.float32)})
    tok = backbone.tokenizer
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    eos = tuple(int(i) for i in backbone.eos_token_ids)
    calibration = heads.calibration_list() if hasattr(heads, "calibration_list") else None
    record = {"k": heads.cfg.k, "kind": "draft_layer", "param_dtype": dtype, "calibration": calibration,
              "trunk_feature": heads.cfg.trunk_feature,
              "source": source, "backbone_source": backbone.source, "notes": notes}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        hf = hf_config(cfg, dtype=dtype, bos_token_id=bos, eos_token_ids=eos, record=record)
        json.dump(hf, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:  # no sampling defaults: greedy
        json.dump({"bos_token_id": bos, "eos_token_id": list(eos), "pad_token_id": eos[0]}, f, indent=2)
    if tok is not None:
        tok.save_pretrained(out_dir)
    else:
        notes.append("The backbone has no tokenizer: the export holds none (serve it with token-id prompts).")
    return notes


# ---------------------------------------------------------------- import


def read_draft_layer(path: str, cfg: ModelConfig) -> tuple[dict, dict | None, dict]:
    """Reads an export's draft layer: (DraftLayer parameters by flat path, CLP parameters or None, clp_jax
    record from config.json). Refuses an MTP layer whose final_layernorm is not the target's final norm
    (clp_jax's draft layer borrows the backbone's)."""
    hf = read_config(path)
    if (hf.get("num_nextn_predict_layers") or 0) < 1:
        raise FormatError(f"{path} declares no MTP layer (num_nextn_predict_layers).")
    mtp, norm = {}, None
    for file in _weight_files(path):
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                if name.startswith(MTP):
                    mtp[name] = f.get_tensor(name)
                elif name == "model.norm.weight":
                    norm = f.get_tensor(name)
                elif name.startswith(MTP_PREFIX):
                    raise FormatError(f"{path} holds more than one MTP layer ({name}); clp_jax reads one.")
    if not mtp:
        raise FormatError(f"{path} holds no {MTP}* tensors: it carries no draft layer.")
    params, final = draft_layer_params(mtp, cfg)
    if norm is None or not np.array_equal(np.asarray(final, np.float32), np.asarray(norm, np.float32)):
        raise FormatError(f"{path}: the MTP layer's final_layernorm differs from the target's model.norm; "
                          "clp_jax's draft layer applies the backbone's own final norm, so it cannot read "
                          "it.")
    clp = None
    extras = os.path.join(path, EXTRAS)
    if os.path.exists(extras):
        with np.load(extras) as z:
            clp = {k: z[k] for k in z.files}
    return params, clp, hf.get(RECORD) or {}


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        return [os.path.join(path, n) for n in convert.index_files(index)]
    return sorted(os.path.join(path, n) for n in os.listdir(path) if re.fullmatch(r".*\.safetensors", n))
