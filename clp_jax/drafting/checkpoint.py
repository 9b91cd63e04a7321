"""Heads checkpoints: the small trained add-ons, stored with Orbax apart from the backbone.

A heads checkpoint is a directory holding `heads.json` (the HeadsConfig and a fingerprint of the
backbone it was trained for), `params/` (an Orbax PyTree checkpoint of the heads' parameters) and,
for heads trained on a sub-vocabulary, `draft_vocab.npy` (the token ids their drafts come from).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from clp_jax.model.config import ModelConfig
from clp_jax.drafting.heads import Heads, HeadsConfig

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
    import orbax.checkpoint as ocp

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
        json.dump({"heads_config": json.loads(heads.cfg.to_json()),
                   "backbone": backbone_cfg if isinstance(backbone_cfg, dict) else backbone_fingerprint(backbone_cfg),
                   **(extra or {})}, f, indent=1)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"clp_jax heads saved {path}")


def load_heads(path: str, backbone_cfg: ModelConfig | None = None) -> Heads:
    """Restores heads; with backbone_cfg, checks they were trained for that backbone."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.expanduser(path))
    meta_path = os.path.join(path, _META)
    if not os.path.isdir(path):
        raise CheckpointError(f"Heads checkpoint {path!r} does not exist. Train heads with train.py, "
                              "or pass --heads zero for untrained heads.")
    if not os.path.exists(meta_path) or not os.path.isdir(os.path.join(path, _PARAMS)):
        raise CheckpointError(f"{path!r} is not a heads checkpoint (expected {_META} and {_PARAMS}/).")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        cfg = HeadsConfig(**meta["heads_config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt ({e}).") from e
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
    heads = Heads(cfg, rngs=nnx.Rngs(0), draft_vocab=draft_vocab)
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


def export_heads(src: str, dst: str, dtype: str = "bfloat16") -> Heads:
    """Copies a heads checkpoint with its parameters cast to `dtype` (e.g. bf16 to ship them at half
    the size); heads.json keeps the backbone fingerprint and every extra field (evaluation, ...)."""
    import dataclasses

    import jax.numpy as jnp

    heads = load_heads(src)
    with open(os.path.join(os.path.abspath(os.path.expanduser(src)), _META)) as f:
        meta = json.load(f)
    out = Heads(dataclasses.replace(heads.cfg, param_dtype=dtype), rngs=nnx.Rngs(0),
                draft_vocab=None if heads.draft_vocab is None else heads.draft_vocab[...])
    nnx.update(out, jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), nnx.state(heads, nnx.Param)))
    extra = {k: v for k, v in meta.items() if k not in ("heads_config", "backbone")}
    save_heads(dst, out, meta["backbone"], {**extra, "exported_from": src})
    return out


SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "shipped")


def shipped_heads_path(model_name: str) -> str | None:
    """The heads shipped in the package for a built-in backbone, if any."""
    path = os.path.join(SHIPPED_DIR, f"{model_name}_heads")
    return path if os.path.exists(os.path.join(path, _META)) else None


def heads_source(heads_arg: str | None, model_name: str, mode: str) -> str | None:
    """Where heads come from: 'zero', a checkpoint path, or None (`ar` needs none).

    Cheap checks only, so that a wrong --heads fails before the backbone is loaded.
    """
    if mode == "ar" and heads_arg is None:
        return None
    if heads_arg == "zero":
        return heads_arg
    if heads_arg is None:
        heads_arg = shipped_heads_path(model_name)
        if heads_arg is None:
            raise CheckpointError(
                f"Mode {mode!r} needs MTP heads and none are shipped for --model {model_name!r}: pass "
                "--heads PATH (a checkpoint written by train.py), --heads zero (untrained), or --mode ar.")
    path = os.path.abspath(os.path.expanduser(heads_arg))
    if not os.path.exists(os.path.join(path, _META)):
        raise CheckpointError(f"Heads checkpoint {path!r} does not exist or has no {_META}. Train heads "
                              "with train.py, or pass --heads zero for untrained heads.")
    return path


def build_heads(source: str | None, backbone_cfg: ModelConfig, k: int | None = None) -> Heads | None:
    """Heads from `heads_source`'s answer, checked against the backbone."""
    import sys

    if source is None:
        return None
    if source == "zero":
        print("Using untrained zero-initialised heads: every draft repeats the next token, so expect "
              "few accepted drafts and a speedup below 1.", file=sys.stderr)
        return Heads(HeadsConfig(hidden_size=backbone_cfg.hidden_size, vocab_size=backbone_cfg.vocab_size,
                                 k=k or 4), rngs=nnx.Rngs(0))
    return load_heads(source, backbone_cfg)


class TrainCheckpoints:
    """Orbax CheckpointManager over the training state (heads parameters and optimiser state).

    Saves every `every` steps and at the end, keeps the last `keep`; `restore` returns the latest
    step and state, or None. A step is written only after it succeeded (non-finite losses raise
    before any save), so a broken state never overwrites a good checkpoint.
    """

    def __init__(self, directory: str, every: int, keep: int):
        import orbax.checkpoint as ocp

        # local paths are made absolute; URIs such as gs://bucket/run go to Orbax as they are
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                                                 create=True))

    def save(self, step: int, params, opt_state, meta: dict, force: bool = False) -> bool:
        import orbax.checkpoint as ocp

        if step in self.manager.all_steps():  # e.g. the final save right after an interval save
            return False
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)), force=force)
        self.manager.wait_until_finished()
        return saved

    def restore(self, params, opt_state):
        """(step, params, opt_state, meta) of the latest checkpoint, restored onto the given
        arrays' shardings, or None when there is none."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        if step is None:
            return None
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return step, out.state["params"], out.state["opt_state"], out.meta

    def close(self):
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
