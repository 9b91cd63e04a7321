"""Heads checkpoints: the small trained add-ons, stored with Orbax apart from the backbone.

A heads checkpoint is a directory holding `heads.json` (the HeadsConfig and a fingerprint of the
backbone it was trained for), `params/` (an Orbax PyTree checkpoint of the heads' parameters) and,
for heads trained on a sub-vocabulary, `draft_vocab.npy` (the token ids their drafts come from).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from clp_jax.model import files
from clp_jax.model.config import ModelConfig
from clp_jax.drafting.heads import Heads, HeadsConfig
from clp_jax.weights import mimo

_META = "heads.json"
_PARAMS = "params"
_VOCAB = "draft_vocab.npy"  # optional: the token ids the heads draft from


class CheckpointError(ValueError):
    """A heads checkpoint is missing, unreadable or made for another backbone."""


def backbone_fingerprint(cfg: ModelConfig) -> dict:
    return {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads}


def save_heads(path: str, heads: Heads, backbone_cfg: ModelConfig | dict, extra: dict | None = None) -> None:
    """Writes heads.json and params/; `backbone_cfg` is the backbone's config or its fingerprint.

    On several processes every one calls it: the parameters (sharded over the processes' devices) are
    gathered, and process 0 alone writes the whole checkpoint on its disk; the others wait for it.
    """
    path = os.path.abspath(path)
    state = nnx.to_pure_dict(nnx.state(heads, nnx.Param))
    options = {}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        state = multihost_utils.process_allgather(state, tiled=True)  # numpy arrays, whole, on every process
        options = dict(multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0,
                                                                                  active_processes={0}))
        if jax.process_index() != 0:
            multihost_utils.sync_global_devices(f"clp_jax heads saved {path}")
            return
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer(**options) as ckpt:
        ckpt.save(os.path.join(path, _PARAMS), state, force=True)
    vocab_path = os.path.join(path, _VOCAB)
    if heads.draft_vocab is not None:
        np.save(vocab_path, np.asarray(heads.draft_vocab[...], np.int32))
    elif os.path.exists(vocab_path):
        os.remove(vocab_path)
    with open(os.path.join(path, _META), "w") as f:
        json.dump({"heads_config": json.loads(heads.cfg.to_json()), "calibration": heads.calibration_list(),
                   "backbone": backbone_cfg if isinstance(backbone_cfg, dict) else backbone_fingerprint(backbone_cfg),
                   **(extra or {})}, f, indent=1)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"clp_jax heads saved {path}")


def read_heads_config(path: str) -> HeadsConfig:
    """The HeadsConfig of a checkpoint from its small heads.json alone (cheap: nothing restored); of a
    MiMo-MTP export (weights/mimo.py) from its config.json."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(os.path.join(path, _META)) and mimo.is_export(path):
        return _mimo_heads_config(path)
    return _heads_config(read_meta(path), os.path.join(path, _META))


_FIX = ("Give a heads checkpoint written by train.py (a run's heads/ directory), or --heads zero for "
        "untrained heads.")


def read_meta(path: str) -> dict:
    """A checkpoint's heads.json: a JSON object with a 'heads_config' field, or a CheckpointError naming
    the file and what is wrong with it (missing, not UTF-8, empty, invalid JSON, a missing field)."""
    meta_path = os.path.join(path, _META)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"Heads checkpoint {path!r} has no {_META}. {_FIX}")
    try:
        return files.read_json_object(meta_path, "Heads metadata", required=("heads_config",), hint=_FIX)
    except (files.FileFormatError, OSError) as e:
        raise CheckpointError(str(e)) from e


def _heads_config(meta: dict, meta_path: str) -> HeadsConfig:
    fields = meta["heads_config"]
    if not isinstance(fields, dict):
        raise CheckpointError(f"Heads metadata {meta_path!r}: 'heads_config' must be an object, got "
                              f"{fields!r:.60}. {_FIX}")
    try:
        return HeadsConfig(**fields)
    except (TypeError, ValueError) as e:  # unknown or missing fields, out-of-range values
        raise CheckpointError(f"Heads metadata {meta_path!r}: 'heads_config' is not a valid heads config ({e}). "
                              f"{_FIX}") from e


def load_heads(path: str, backbone_cfg: ModelConfig | None = None) -> Heads:
    """Restores heads; with backbone_cfg, checks they were trained for that backbone."""
    path = os.path.abspath(os.path.expanduser(path))
    meta_path = os.path.join(path, _META)
    if not os.path.isdir(path):
        raise CheckpointError(f"Heads checkpoint {path!r} does not exist. Train heads with train.py, "
                              "or pass --heads zero for untrained heads.")
    if not os.path.exists(meta_path) and mimo.is_export(path):
        return _load_mimo_heads(path, backbone_cfg)
    if not os.path.exists(meta_path) or not os.path.isdir(os.path.join(path, _PARAMS)):
        raise CheckpointError(f"{path!r} is not a heads checkpoint (expected {_META} and {_PARAMS}/).")
    meta = read_meta(path)
    cfg = _heads_config(meta, meta_path)
    if backbone_cfg is not None and meta.get("backbone") != backbone_fingerprint(backbone_cfg):
        raise CheckpointError(
            f"Heads in {path!r} were trained for another backbone ({meta.get('backbone')}); this backbone "
            f"is {backbone_fingerprint(backbone_cfg)}.")
    draft_vocab = None
    if os.path.exists(os.path.join(path, _VOCAB)):
        try:
            draft_vocab = np.load(os.path.join(path, _VOCAB))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{os.path.join(path, _VOCAB)} is corrupt ({e}).") from e
        if (draft_vocab.ndim != 1 or not np.issubdtype(draft_vocab.dtype, np.integer) or draft_vocab.size == 0
                or draft_vocab.min() < 0 or draft_vocab.max() >= cfg.vocab_size):
            raise CheckpointError(f"{os.path.join(path, _VOCAB)} is not a list of token ids below "
                                  f"{cfg.vocab_size}.")
    calibration = meta.get("calibration")
    if calibration is not None and (not isinstance(calibration, list) or len(calibration) != cfg.k
                                    or not all(isinstance(t, (int, float)) and t > 0 for t in calibration)):
        raise CheckpointError(f"{meta_path}: 'calibration' must be {cfg.k} positive temperatures, got {calibration!r}.")
    heads = Heads(cfg, rngs=nnx.Rngs(0), draft_vocab=draft_vocab, calibration=calibration)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            nnx.to_pure_dict(nnx.state(heads, nnx.Param)))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(os.path.join(path, _PARAMS), abstract)
    except Exception as e:
        raise CheckpointError(f"Could not restore heads parameters from {path!r}: {e}") from e
    state = nnx.state(heads, nnx.Param)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(heads, state)
    return heads


def _mimo_heads_config(path: str) -> HeadsConfig:
    """The draft layer of a MiMo-MTP export as HeadsConfig: its k from clp_jax's record (1 without one),
    the block geometry from the target's config, no gate baseline."""
    try:
        hf = mimo.read_config(path)
        backbone = ModelConfig.from_hf_config(hf)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json is not a Qwen2 MiMo-MTP config ({e}).") from e
    record = hf.get(mimo.RECORD) or {}
    # an export without clp_jax's record (a foreign MiMo-MTP model) reads the pre-norm state, as engines feed it
    trunk = record.get("trunk_feature", "final_norm" if record else "pre_norm")
    return HeadsConfig.for_backbone(backbone, k=int(record.get("k", 1)), kind="draft_layer", gate=False,
                                    param_dtype=record.get("param_dtype", "float32"), trunk_feature=trunk)


def _load_mimo_heads(path: str, backbone_cfg: ModelConfig | None) -> Heads:
    """Heads holding the draft layer (and the CLP, where exported) of a MiMo-MTP export."""
    cfg = _mimo_heads_config(path)
    exported = ModelConfig.from_hf_config(mimo.read_config(path))
    if backbone_cfg is not None and backbone_fingerprint(exported) != backbone_fingerprint(backbone_cfg):
        raise CheckpointError(f"The draft layer in {path!r} was exported for another backbone "
                              f"({backbone_fingerprint(exported)}); this backbone is "
                              f"{backbone_fingerprint(backbone_cfg)}.")
    try:
        params, clp, record = mimo.read_draft_layer(path, exported)
    except (mimo.FormatError, OSError, ValueError) as e:
        raise CheckpointError(f"Could not read the draft layer of {path!r}: {e}") from e
    heads = Heads(cfg, rngs=nnx.Rngs(0), calibration=record.get("calibration"))
    values = {f"drafter.{k}": v for k, v in params.items()}
    values.update(clp or {})  # {'clp.linear.kernel': ..., 'clp.linear.bias': ...}
    _set_params(heads, values, path, optional=() if clp else ("clp.",))
    return heads


def _set_params(module, values: dict, path: str, optional: tuple = ()) -> None:
    """Sets a module's parameters from flat `{'drafter.fuse': array}` values, checking names and shapes;
    parameters under an `optional` prefix keep their initial values when absent."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    keys = {".".join(map(str, p)) for p, _ in flat}
    missing = sorted(k for k in keys - set(values) if not k.startswith(optional))
    unexpected = sorted(set(values) - keys)
    if missing or unexpected:
        raise CheckpointError(f"{path!r} does not fit these heads: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}.")
    leaves = []
    for p, var in flat:
        key = ".".join(map(str, p))
        if key not in values:
            leaves.append((p, var))
            continue
        w = values[key]
        if tuple(w.shape) != tuple(var.shape):
            raise CheckpointError(f"{path!r}: {key} has shape {tuple(w.shape)}, the heads need "
                                  f"{tuple(var.shape)}.")
        leaves.append((p, var.replace(jnp.asarray(w, var.dtype))))
    nnx.update(module, nnx.from_flat_state(leaves))


def export_heads(src: str, dst: str, dtype: str = "bfloat16") -> Heads:
    """Copies a heads checkpoint with its parameters cast to `dtype` (e.g. bf16 to ship them at half
    the size); heads.json keeps the backbone fingerprint and every extra field (evaluation, ...)."""
    heads = load_heads(src)
    meta = read_meta(os.path.abspath(os.path.expanduser(src)))
    out = Heads(dataclasses.replace(heads.cfg, param_dtype=dtype), rngs=nnx.Rngs(0),
                draft_vocab=None if heads.draft_vocab is None else heads.draft_vocab[...],
                calibration=heads.calibration_list())
    nnx.update(out, jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), nnx.state(heads, nnx.Param)))
    extra = {k: v for k, v in meta.items() if k not in ("heads_config", "backbone", "calibration")}
    save_heads(dst, out, meta["backbone"], {**extra, "exported_from": src})
    return out


SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shipped")  # clp_jax/shipped


def shipped_heads_path(model_name: str) -> str | None:
    """The heads shipped in the package for a built-in backbone, if any."""
    path = os.path.join(SHIPPED_DIR, f"{model_name}_heads")
    return path if os.path.exists(os.path.join(path, _META)) else None
