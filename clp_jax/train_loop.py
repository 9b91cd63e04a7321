"""The training loop: exact resume from Orbax checkpoints, logging, evaluation, and the end-to-end run."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clp_jax import data as data_lib
from clp_jax.checkpoint import CheckpointError, TrainCheckpoints, backbone_fingerprint
from clp_jax.train_lib import Trainer


def fit(trainer: Trainer, source, *, steps: int, batch_size: int, seed: int,
        hidden_fn: Callable[[np.ndarray, dict], jax.Array], ckpts: TrainCheckpoints | None = None,
        meta: dict | None = None, log_path: str | None = None, progress: bool = True) -> list[dict]:
    """Trains up to global step `steps`, resuming from the latest checkpoint in `ckpts`.

    The batch of step s is a function of s alone (data.batch_indices), so a resumed run reads exactly
    the records an uninterrupted run would. Ctrl-C saves the last finished step before exiting.
    `hidden_fn(indices, batch)` returns the backbone's hidden states of those records.
    """
    from tqdm.auto import tqdm

    meta = meta or {}
    if ckpts is not None:
        restored = ckpts.restore(trainer.params, trainer.opt_state)
        if restored is not None:
            step, params, opt_state, saved_meta = restored
            for key in ("heads_config", "backbone"):
                if key in meta and saved_meta.get(key) != meta[key]:
                    raise CheckpointError(f"The checkpoint in {ckpts.directory} was made with another "
                                          f"{key} ({saved_meta.get(key)}); this run has {meta[key]}. "
                                          "Use a new output directory.")
            trainer.params, trainer.opt_state, trainer.step_count = params, opt_state, step
    history = []
    log = open(log_path, "a") if log_path else None
    bar = tqdm(total=steps, initial=trainer.step_count, desc="training", unit="step", disable=not progress)
    try:
        while trainer.step_count < steps:
            idx = data_lib.batch_indices(len(source), trainer.step_count, batch_size, seed)
            batch = data_lib.get_batch(source, idx)
            batch["hidden"] = hidden_fn(idx, batch)
            t0 = time.perf_counter()
            metrics = trainer.step(batch)
            metrics.update(step=trainer.step_count, seconds=time.perf_counter() - t0,
                           tokens=int(batch["mask"].sum()))
            history.append(metrics)
            if log:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc1=f"{metrics['head1_acc']:.2f}")
            bar.update(1)
            if ckpts is not None:
                ckpts.save(trainer.step_count, trainer.params, trainer.opt_state, meta)
    except KeyboardInterrupt:
        if ckpts is not None:
            ckpts.save(trainer.step_count, trainer.params, trainer.opt_state, meta, force=True)
            print(f"\nInterrupted: saved step {trainer.step_count} to {ckpts.directory}.", file=sys.stderr)
        raise
    finally:
        bar.close()
        if log:
            log.close()
    if ckpts is not None:
        ckpts.save(trainer.step_count, trainer.params, trainer.opt_state, meta, force=True)
    return history


def evaluate(trainer: Trainer, source, *, batch_size: int, hidden_fn) -> dict:
    """Token-weighted held-out metrics over a whole split: per-head agreement, CLP accuracy, losses."""
    totals, weight = {}, 0
    for start in range(0, len(source), batch_size):
        idx = np.arange(start, min(start + batch_size, len(source)))
        batch = data_lib.get_batch(source, idx)
        batch["hidden"] = hidden_fn(idx, batch)
        m = trainer.evaluate(batch)
        n = int(batch["mask"].sum())
        weight += n
        for key, value in m.items():
            totals[key] = totals.get(key, 0.0) + value * n
    return {key: value / max(weight, 1) for key, value in totals.items()}


def cached_hidden_fn(model, source, batch_size: int = 8, progress: bool = True):
    """Backbone hidden states of every record, computed once (D*4 bytes per token in fp32)."""
    from tqdm.auto import tqdm

    from clp_jax.train_lib import backbone_hidden

    fn = jax.jit(backbone_hidden)
    parts = []
    for start in tqdm(range(0, len(source), batch_size), desc="backbone hidden states", disable=not progress):
        batch = data_lib.get_batch(source, np.arange(start, min(start + batch_size, len(source))))
        parts.append(np.asarray(fn(model, jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))))
    table = np.concatenate(parts)  # [N, T, D]
    return lambda idx, batch: jnp.asarray(table[idx])


def run_meta(heads_cfg, backbone_cfg) -> dict:
    return {"heads_config": json.loads(heads_cfg.to_json()), "backbone": backbone_fingerprint(backbone_cfg)}


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
