"""The training loop: exact resume from Orbax checkpoints, metrics logging, and held-out evaluation."""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from clp_jax.drafting.checkpoint import CheckpointError
from clp_jax.train import data as data_lib
from clp_jax.train import multihost
from clp_jax.train.checkpoints import TrainCheckpoints
from clp_jax.train.step import Trainer

log = logging.getLogger(__name__)

# What a resumed run must share with its checkpoint; run.steps may grow, so it is not compared.
RESUME_KEYS = ("heads_config", "backbone", "data", "train")


def resume(trainer: Trainer, ckpts: TrainCheckpoints, meta: dict) -> None:
    """Loads the latest checkpoint into `trainer`, after checking its meta against this run's."""
    step = ckpts.latest_step()
    if step is None:
        return
    saved_meta = ckpts.meta(step)
    for key in RESUME_KEYS:
        if key in meta and saved_meta.get(key) != meta[key]:
            raise CheckpointError(f"The checkpoint in {ckpts.directory} was made with another "
                                  f"{key} ({saved_meta.get(key)}); this run has {meta[key]}. "
                                  "Use a new run.out_dir, or restore the settings of that run.")
    trainer.params, trainer.opt_state = ckpts.restore(step, trainer.params, trainer.opt_state)
    trainer.step_count = step
    log.info("resumed from step %d of %s", step, ckpts.directory)


def fit(trainer: Trainer, source, *, steps: int, batch_size: int, seed: int,
        hidden_fn: Callable[[np.ndarray, dict], jax.Array], ckpts: TrainCheckpoints | None = None,
        meta: dict | None = None, log_path: str | None = None, progress: bool = True,
        positions_per_row: int | None = None, tensorboard_dir: str | None = None) -> list[dict]:
    """Trains up to global step `steps`, resuming from the latest checkpoint in `ckpts`.

    The batch of step s is a function of s alone (data.batch_indices), so a resumed run reads exactly
    the records an uninterrupted run would. Ctrl-C saves the last finished step before exiting.
    `hidden_fn(indices, batch)` returns the backbone's hidden states of those records. `batch_size`
    is global: on several processes each loads the hidden states of its own rows (multihost.process_rows).
    """
    meta = meta or {}
    if ckpts is not None:
        resume(trainer, ckpts, meta)
    history = []
    log_file = open(log_path, "a") if log_path else None
    board = None
    if tensorboard_dir:
        from tensorboardX import SummaryWriter  # optional dependency: imported only when asked for

        board = SummaryWriter(tensorboard_dir)
    bar = tqdm(total=steps, initial=trainer.step_count, desc="training", unit="step", disable=not progress)
    try:
        while trainer.step_count < steps:
            idx = data_lib.batch_indices(len(source), trainer.step_count, batch_size, seed)
            batch = data_lib.get_batch(source, idx)  # token rows of the global batch: small
            tokens = int(batch["mask"].sum())
            if positions_per_row:
                batch["positions"] = sample_positions(batch["mask"], positions_per_row, seed, trainer.step_count)
            mine = multihost.process_rows(trainer.mesh, len(idx))
            batch = {k: v[mine] for k, v in batch.items()}
            batch["hidden"] = hidden_fn(idx[mine], batch)
            t0 = time.perf_counter()
            metrics = trainer.step(batch)
            metrics.update(step=trainer.step_count, seconds=time.perf_counter() - t0, tokens=tokens)
            history.append(metrics)
            if log_file:
                log_file.write(json.dumps(metrics) + "\n")
                log_file.flush()
            if board:
                for key, value in metrics.items():
                    board.add_scalar(f"train/{key}", value, trainer.step_count)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc1=f"{metrics['head1_acc']:.2f}")
            bar.update(1)
            if ckpts is not None:
                ckpts.save(trainer.step_count, trainer.params, trainer.opt_state, meta)
    except KeyboardInterrupt:
        if ckpts is not None:
            ckpts.save(trainer.step_count, trainer.params, trainer.opt_state, meta, force=True)
            log.warning("Interrupted: saved step %d to %s.", trainer.step_count, ckpts.directory)
        raise
    finally:
        bar.close()
        if log_file:
            log_file.close()
        if board:
            board.close()
    if ckpts is not None:
        ckpts.save(trainer.step_count, trainer.params, trainer.opt_state, meta, force=True)
    return history


def sample_positions(mask: np.ndarray, n: int, seed: int, step: int) -> np.ndarray:
    """n scored positions per row [B, n], drawn among the row's masked positions (a function of the
    step, like the batch itself)."""
    rng = np.random.RandomState([seed, step, 7])
    out = np.zeros((mask.shape[0], n), np.int32)
    for b, row in enumerate(mask):
        valid = np.flatnonzero(row)
        if valid.size:
            out[b] = rng.choice(valid, n, replace=valid.size < n)
    return out


def evaluate(trainer: Trainer, source, *, batch_size: int, hidden_fn, full_vocab: bool = True,
             progress: bool = False) -> dict:
    """Token-weighted held-out metrics over a whole split: per-head agreement, CLP accuracy, losses."""
    totals, weight, confusion = {}, 0, 0
    for start in tqdm(range(0, len(source), batch_size), desc="evaluating", disable=not progress):
        idx = np.arange(start, min(start + batch_size, len(source)))
        batch = data_lib.get_batch(source, idx)
        n = int(batch["mask"].sum())  # of the global batch
        mine = multihost.process_rows(trainer.mesh, len(idx))
        batch = {k: v[mine] for k, v in batch.items()}
        batch["hidden"] = hidden_fn(idx[mine], batch)
        m = trainer.evaluate(batch, full_vocab=full_vocab)
        confusion = confusion + np.asarray(m.pop("clp_confusion"))
        weight += n
        for key, value in m.items():
            totals[key] = totals.get(key, 0.0) + value * n
    out = {key: value / max(weight, 1) for key, value in totals.items()}
    out["clp_confusion"] = np.asarray(confusion).tolist()  # rows: true L*, columns: predicted L
    return out
