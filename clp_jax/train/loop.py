"""The one training loop: batches as a function of the step, exact resume from Orbax checkpoints, metrics
(jsonl + TensorBoard), a time budget, and held-out evaluation over whole records.

The batch of step s is `WindowSampler(s)`: records drawn without replacement per epoch from a seeded
permutation, each cut to a window; so a run resumed at step s reads exactly what an uninterrupted run
would have (nothing lost or repeated) on any number of processes (each loads the rows it holds).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from clp_jax.drafting.checkpoint import CheckpointError
from clp_jax.train import multihost
from clp_jax.train.checkpoints import TrainCheckpoints
from clp_jax.train.feature_store import FeatureStore
from clp_jax.train.step import Trainer

log = logging.getLogger(__name__)

# What a resumed phase must share with its checkpoint; run.steps may grow, so it is not compared.
RESUME_KEYS = ("heads_config", "backbone", "data", "train")


class WindowSampler:
    """Global batch of step s: `batch_size` records of `records` (epochs of seeded permutations laid end to
    end) and a window start per record (seeded by the step). Windows of self-distilled records start
    before their first generated token, so most of a window is targets."""

    def __init__(self, store: FeatureStore, records: np.ndarray, batch_size: int, window: int, seed: int,
                 soft: bool = False):
        if len(records) == 0:
            raise ValueError("No training records: grow the feature store (data.*_records / data.*_prompts) "
                             "or lower data.heldout_fraction / data.clp_fraction.")
        self.store, self.records, self.batch_size, self.seed, self.soft = store, np.asarray(records), batch_size, seed, soft
        self.window = min(window, store.seq_len)

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        n, start = len(self.records), step * self.batch_size
        idx = []
        while len(idx) < self.batch_size:
            epoch, offset = divmod(start + len(idx), n)
            perm = np.random.RandomState([self.seed, epoch]).permutation(n)
            idx.extend(perm[offset:offset + self.batch_size - len(idx)].tolist())
        rows = self.records[np.asarray(idx)]
        T, W = self.store.seq_len, self.window
        rng = np.random.RandomState([self.seed, step, 1])
        first = np.maximum(self.store.prompt_lengths[rows] - W // 4, 0)  # a little prompt context
        last = np.maximum(np.minimum(self.store.lengths[rows], T) - W // 2, first)
        starts = np.minimum(first + (rng.random_sample(len(rows)) * (last - first + 1)).astype(np.int64), T - W)
        return rows, np.maximum(starts, 0)

    def __call__(self, step: int, mine: slice = slice(None)) -> dict:
        rows, starts = self.rows(step)
        return self.store.windows(rows[mine], starts[mine], self.window, soft=self.soft)


def resume(trainer: Trainer, ckpts: TrainCheckpoints, meta: dict) -> None:
    """Loads the latest checkpoint into `trainer`, after checking its meta against this run's."""
    step = ckpts.latest_step()
    if step is None:
        return
    saved = ckpts.meta(step)
    for key in RESUME_KEYS:
        if key in meta and saved.get(key) != meta[key]:
            raise CheckpointError(f"The checkpoint in {ckpts.directory} was made with another {key} "
                                  f"({saved.get(key)}); this run has {meta[key]}. Use a new run.out_dir, or "
                                  "restore the settings of that run.")
    trainer.params, trainer.opt_state = ckpts.restore(step, trainer.params, trainer.opt_state)
    trainer.step_count = step
    log.info("phase %s resumed from step %d of %s", trainer.phase, step, ckpts.directory)


def _scalars(metrics: dict) -> dict:
    """JSON-able per-step metrics: per-draft arrays as lists, agreement from hits / count."""
    out = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if key == "confusion":
            continue
        out[key] = value.tolist() if value.ndim else float(value)
    if "hits" in metrics:
        out["agreement"] = (np.asarray(metrics["hits"]) / np.maximum(np.asarray(metrics["count"]), 1)).round(4).tolist()
        del out["hits"], out["count"]
    return out


def fit(trainer: Trainer, batches: Callable[[int, slice], dict], *, steps: int, batch_size: int,
        ckpts: TrainCheckpoints | None = None, meta: dict | None = None, log_path: str | None = None,
        tensorboard_dir: str | None = None, budget_seconds: float = 0.0, progress: bool = True) -> list[dict]:
    """Trains up to global step `steps` (resuming from `ckpts`); stops early, with a checkpoint, when
    `budget_seconds` (> 0) have passed or on Ctrl-C. `batches(step, rows)` is this process's part of the
    global batch of `step`."""
    meta = meta or {}
    if ckpts is not None:
        resume(trainer, ckpts, meta)
    history = []
    log_file = open(log_path, "a") if log_path else None
    board = None
    if tensorboard_dir:
        from tensorboardX import SummaryWriter  # optional dependency: imported only when asked for

        board = SummaryWriter(tensorboard_dir)
    bar = tqdm(total=steps, initial=trainer.step_count, desc=f"phase {trainer.phase}", unit="step",
               disable=not progress)
    t_start = time.perf_counter()
    try:
        while trainer.step_count < steps:
            if budget_seconds and time.perf_counter() - t_start > budget_seconds:
                log.warning("phase %s: time budget spent at step %d of %d; run again to continue.",
                            trainer.phase, trainer.step_count, steps)
                break
            batch = batches(trainer.step_count, multihost.process_rows(trainer.mesh, batch_size))
            t0 = time.perf_counter()
            row = {"step": trainer.step_count + 1, **_scalars(trainer.step(batch)),
                   "seconds": time.perf_counter() - t0}
            history.append(row)
            if log_file:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
            if board:
                for key, value in row.items():
                    for j, v in enumerate(value if isinstance(value, list) else [value]):
                        board.add_scalar(f"{trainer.phase}/{key}" + (f"_{j + 1}" if isinstance(value, list) else ""),
                                         v, trainer.step_count)
            bar.set_postfix(loss=f"{row['loss']:.3f}", agree=" ".join(f"{a:.2f}" for a in row.get("agreement", [])))
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


def evaluate(trainer: Trainer, store: FeatureStore, records: np.ndarray, batch_size: int,
             progress: bool = False) -> dict:
    """Per-draft agreement with y over every target of whole `records` (plus the CLP's accuracy and
    confusion in phase 'clp'): sums of the objective's hits and counts."""
    T = store.seq_len
    hits = count = 0
    extra: dict = {}
    for i in tqdm(range(0, len(records), batch_size), desc="evaluating", disable=not progress):
        rows = np.asarray(records[i:i + batch_size])
        pad = batch_size - len(rows)
        batch = store.windows(np.concatenate([rows, np.repeat(rows[-1:], pad)]), np.zeros(batch_size, np.int64), T,
                              soft=trainer.needs_soft)
        if pad:  # padding rows: no targets
            batch["labels"][len(rows):] = -1
        m = trainer.evaluate({k: v[multihost.process_rows(trainer.mesh, batch_size)] for k, v in batch.items()})
        hits, count = hits + np.asarray(m["hits"]), count + np.asarray(m["count"])
        if "confusion" in m:
            extra["confusion"] = extra.get("confusion", 0) + np.asarray(m["confusion"])
    out = {"agreement": (np.asarray(hits) / np.maximum(count, 1)).round(4).tolist(),
           "positions": int(np.max(count)) if np.size(count) else 0, "records": int(len(records))}
    if "confusion" in extra:
        c = extra["confusion"]
        out["clp_accuracy"] = round(float(np.trace(c) / max(c.sum(), 1)), 4)
        out["clp_confusion"] = c.tolist()  # rows: true L*, columns: predicted L
    return out
