"""The one training loop: batches as a function of the step, exact resume from Orbax checkpoints, metrics
(jsonl + TensorBoard), a time budget, and held-out evaluation over whole records.

The batch of step s is `WindowSampler(s)`: records drawn without replacement per epoch from a seeded
permutation, each cut to a window; so a run resumed at step s reads exactly what an uninterrupted run
would have (nothing lost or repeated) on any number of processes (each loads the rows it holds).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from clp_jax.drafting.checkpoint import CheckpointError
from clp_jax.model import files
from clp_jax.train import multihost
from clp_jax.train.checkpoints import TrainCheckpoints
from clp_jax.train.feature_store import FeatureStore
from clp_jax.train.objectives import CLP_MARGINS
from clp_jax.train.step import Trainer

log = logging.getLogger(__name__)

# What a resumed phase must share with its checkpoint; run.steps may grow, so it is not compared.
RESUME_KEYS = ("heads_config", "backbone", "data", "train")
EVAL_ONLY = ("confusion", "margin_heads", "margin_wrong")  # CLP sums that evaluate() reports, not per-step metrics


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
        if key in EVAL_ONLY:
            continue
        out[key] = value.tolist() if value.ndim else float(value)
    if "hits" in metrics:
        out["agreement"] = (np.asarray(metrics["hits"]) / np.maximum(np.asarray(metrics["count"]), 1)).round(4).tolist()
        del out["hits"], out["count"]
    return out


class EarlyStopping:
    """Scores the trainer on held-out records every `every` steps (higher is better), keeps the parameters of
    the best score in an Orbax checkpoint of their own, and ends the phase after `patience` scores in a row
    that did not beat it (0: never early). Scores are appended to `scores_path` (jsonl), so a resumed run
    continues the same count; `restore_best` puts the best parameters back into the trainer."""

    def __init__(self, score: Callable[[Trainer], dict], every: int, patience: int, scores_path: str, best_dir: str):
        if every < 1 or patience < 0:
            raise ValueError(f"EarlyStopping needs every >= 1 and patience >= 0, got {every}, {patience}.")
        self.score, self.every, self.patience, self.path = score, every, patience, scores_path
        self.best = TrainCheckpoints(best_dir, every=1, keep=1)
        self._recorded: dict[int, float] = {}  # read once here, then kept in step with the file
        if os.path.exists(self.path):
            fix = ("It is this run's record of held-out scores: delete the bad line (or the file, to count "
                   "patience afresh) and run again.")
            for n, row in files.json_lines(self.path, "Scores file", hint=fix):
                if not isinstance(row, dict) or not isinstance(row.get("step"), int) \
                        or not isinstance(row.get("score"), (int, float)):
                    raise files.FileFormatError(f"Scores file {self.path!r}, line {n}: needs an integer 'step' "
                                                f"and a number 'score', got {row!r:.80}. {fix}")
                self._recorded[row["step"]] = row["score"]

    def scores(self, upto: int) -> dict[int, float]:
        """{step: score} recorded up to step `upto` (a step scored twice keeps its last score)."""
        return {step: score for step, score in self._recorded.items() if step <= upto}

    def stopped(self, upto: int) -> bool:
        """Whether `patience` scores up to step `upto` came after the best one."""
        scores = self.scores(upto)
        best = self.best_of(scores)
        return bool(self.patience) and best is not None and sum(s > best for s in scores) >= self.patience

    @staticmethod
    def best_of(scores: dict[int, float]) -> int | None:
        return max(scores, key=lambda s: (scores[s], -s)) if scores else None  # the earliest of equal scores

    def due(self, step: int, last: int | None = None) -> bool:
        """Every `every` steps and the phase's `last` step (whose parameters would otherwise never compete);
        step 0 is scored too: a warm-started phase that never beats its start keeps its start."""
        return (step % self.every == 0 or step == last) and step not in self.scores(step)

    def __call__(self, trainer: Trainer, meta: dict) -> bool:
        """Scores the current step; True when the phase should end."""
        step = trainer.step_count
        row = self.score(trainer)
        scores = self.scores(step) | {step: row["score"]}
        best = self.best_of(scores)
        if best == step:  # written before the score, so a recorded best always has its parameters
            self.best.save(step, trainer.params, trainer.opt_state, meta | {"score": row["score"]}, force=True)
        if multihost.is_writer():
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **row}) + "\n")
        self._recorded[step] = row["score"]
        stale = sum(s > best for s in scores)
        log.info("step %d: held-out score %.4f (best %.4f at step %d%s)", step, row["score"], scores[best], best,
                 f", {stale} without a better one" if stale else "")
        return self.stopped(step)

    def restore_best(self, trainer: Trainer) -> int:
        """Loads the best-scored parameters into `trainer`; returns their step (the trainer's own when none)."""
        step = self.best.latest_step()
        if step is None:
            return trainer.step_count
        trainer.params, _ = self.best.restore(step, trainer.params, trainer.opt_state)
        log.info("phase %s keeps the parameters of step %d (held-out score %.4f)", trainer.phase, step,
                 self.scores(step)[step])
        return step

    def close(self):
        self.best.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fit(trainer: Trainer, batches: Callable[[int, slice], dict], *, steps: int, batch_size: int,
        ckpts: TrainCheckpoints | None = None, meta: dict | None = None, log_path: str | None = None,
        tensorboard_dir: str | None = None, budget_seconds: float = 0.0, progress: bool = True,
        early: EarlyStopping | None = None) -> list[dict]:
    """Trains up to global step `steps` (resuming from `ckpts`); stops early, with a checkpoint, when
    `budget_seconds` (> 0) have passed (scoring the step it stops at), on Ctrl-C, or when `early` says held-out
    scores stopped improving.
    `batches(step, rows)` is this process's part of the global batch of `step`."""
    meta = meta or {}
    if ckpts is not None:
        resume(trainer, ckpts, meta)
    if early is not None and early.stopped(trainer.step_count):
        log.info("phase %s had already stopped early at step %d.", trainer.phase, trainer.step_count)
        return []
    if early is not None and early.due(trainer.step_count) and early(trainer, meta):  # the start, or killed
        return []  # before scoring
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
                if early is not None and early.due(trainer.step_count, trainer.step_count):
                    if ckpts is not None:  # saved before it is scored, as every scored step is
                        ckpts.save(trainer.step_count, trainer.params, trainer.opt_state, meta, force=True)
                    early(trainer, meta)  # the steps since the last score compete too
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
            scored = early is not None and early.due(trainer.step_count, steps)
            if ckpts is not None:  # a scored step is always saved: a resumed run never scores it again
                ckpts.save(trainer.step_count, trainer.params, trainer.opt_state, meta, force=scored)
            if scored and early(trainer, meta):
                log.info("phase %s: %d held-out scores in a row without a better one; stopping at step %d.",
                         trainer.phase, early.patience, trainer.step_count)
                break
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
        for key in EVAL_ONLY:
            if key in m:
                extra[key] = extra.get(key, 0) + np.asarray(m[key])
    out = {"agreement": (np.asarray(hits) / np.maximum(count, 1)).round(4).tolist(),
           "positions": int(np.max(count)) if np.size(count) else 0, "records": int(len(records))}
    if "confusion" in extra:
        c = extra["confusion"]
        out["clp_accuracy"] = round(float(np.trace(c) / max(c.sum(), 1)), 4)
        out["clp_confusion"] = c.tolist()  # rows: true L*, columns: predicted L
        steps = max(int(c.sum()), 1)
        out["clp_margins"] = {  # what `clp` commits per step at each margin, and the share of those heads wrong
            "argmax" if margin is None else f"{margin:g}": {"heads_per_step": round(float(h) / steps, 4),
                                                   "wrong_share": round(float(w) / max(float(h), 1), 4)}
            for margin, h, w in zip(CLP_MARGINS, extra["margin_heads"], extra["margin_wrong"])}
    return out
