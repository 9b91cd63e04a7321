"""The one training run: backbone, inputs, feature store, drafter phase, CLP phase, evaluation, heads.

1. features: the inputs (tensorflow-datasets) become feature shards (clp_jax/train/feature_store.py);
   resumable, split across processes.
2. drafter: the drafter of `heads.kind` (and the gate baseline, if asked for) on the 'train' records,
   with its objective (clp_jax/train/objectives.py); Orbax checkpoints, exact resume.
3. clp: the CLP on the 'clp' records, which the drafter never saw, with labels from its own chain.
4. evaluation on the 'heldout' records, per kind and draft position; confidence calibration; heads/.

Splits are a fixed function of each record's id (feature_store.split_of), written to splits.json: a
grown store only adds records to each split. Each phase checkpoints into its own directory, so a run
killed at any moment, or stopped by its time budget, continues where it stopped when run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import jax
import numpy as np
from flax import nnx

from clp_jax.decode import batching
from clp_jax.decode.decoder import DecodeConfig, Decoder
from clp_jax.drafting import checkpoint
from clp_jax.drafting.heads import Heads, HeadsConfig, param_summary
from clp_jax.model.config import ModelConfig
from clp_jax.train import calibration, multihost
from clp_jax.train import data as data_lib
from clp_jax.train import feature_store as fs
from clp_jax.train.checkpoints import TrainCheckpoints
from clp_jax.train.loop import EarlyStopping, WindowSampler, evaluate, fit
from clp_jax.train.plots import plot_curves
from clp_jax.train.prompts import KINDS
from clp_jax.train.run_config import Config, check_batch_sizes
from clp_jax.train.step import Trainer
from clp_jax.weights.assets import cache_dir
from clp_jax.weights.loading import load_backbone

log = logging.getLogger(__name__)


def run_meta(heads_cfg: HeadsConfig, backbone_cfg: ModelConfig, data: dict, train) -> dict:
    """What a resumed phase must share with its checkpoint: heads, backbone, data order and optimisation."""
    return {"heads_config": json.loads(heads_cfg.to_json()), "backbone": checkpoint.backbone_fingerprint(backbone_cfg),
            "data": data, "train": dataclasses.asdict(train)}


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def split_indices(store: fs.FeatureStore, dc) -> dict[str, np.ndarray]:
    """Record indices per split ('train', 'clp', 'heldout'), a fixed function of each record's id; CLP records are
    self-distilled ones only (corpus records of that split train the drafter)."""
    names = np.array([fs.split_of(r, dc.heldout_fraction, dc.clp_fraction) for r in store.record_ids])
    corpus = store.kinds == KINDS.index("corpus")
    return {"heldout": np.flatnonzero(names == "heldout"), "clp": np.flatnonzero((names == "clp") & ~corpus),
            "train": np.flatnonzero((names == "train") | ((names == "clp") & corpus))}


def splits(store: fs.FeatureStore, cfg: Config, out_dir: str) -> dict[str, np.ndarray]:
    """`split_indices`, written to out_dir/splits.json."""
    out = split_indices(store, cfg.data)
    if multihost.is_writer():
        with open(os.path.join(out_dir, "splits.json"), "w") as f:
            json.dump({k: [store.record_ids[i] for i in v] for k, v in out.items() if k != "train"}
                      | {"counts": {k: int(len(v)) for k, v in out.items()},
                         "positions": {k: store.positions(v) for k, v in out.items()}}, f)
    return out


def training_subset(store: fs.FeatureStore, records: np.ndarray, targets: int, kinds=(), seed: int = 0
                    ) -> np.ndarray:
    """The records (sorted) of a seeded random order of `records`, restricted to `kinds`, whose running target
    count first reaches `targets` (0: all). The order does not depend on `targets`, so subsets nest."""
    if kinds:
        records = records[np.isin(store.kinds[records], [KINDS.index(k) for k in kinds])]
    if not targets:
        return records
    order = records[np.random.RandomState(seed + 7919).permutation(len(records))]
    counts = (store.labels[order] >= 0).sum(1)
    n = int(np.searchsorted(np.cumsum(counts), targets)) + 1
    return np.sort(order[:n])


def draft_vocabulary(store: fs.FeatureStore, records: np.ndarray, size: int, vocab_size: int, eos, path: str,
                     inherited=None):
    """The drafters' vocabulary, fixed at the run's first start (kept in `path`): the one a warm start's heads
    drafted from (`inherited` [U]), so new data of another mix cannot drop tokens they learned to draft, else
    the `size` most frequent labels of the training records (0: the whole vocabulary)."""
    if os.path.exists(path):
        return np.load(path)
    if inherited is not None:
        vocab = np.asarray(inherited, np.int32)
    elif not size:
        vocab = np.arange(vocab_size, dtype=np.int32)
    else:
        vocab = fs.label_vocabulary(store.labels[records], size, always=[e for e in eos if e < vocab_size])
    if multihost.is_writer():
        np.save(path, vocab)
    return vocab


def inherited_vocabulary(init_from: str, backbone_cfg) -> np.ndarray | None:
    """The draft vocabulary of the heads a run warm-starts from (the whole vocabulary for heads that drafted
    from all of it; None without a warm start)."""
    if not init_from:
        return None
    old = checkpoint.load_heads(init_from, backbone_cfg)
    vocab = (np.arange(backbone_cfg.vocab_size, dtype=np.int32) if old.draft_vocab is None
             else np.asarray(old.draft_vocab[...], np.int32))
    log.info("warm start: the drafters keep the %d-token vocabulary of %s (run.vocab_size does not apply)",
             len(vocab), init_from)
    return vocab


def init_heads(hc: HeadsConfig, backbone, vocab, init_from: str, seed: int) -> Heads:
    """Fresh heads (the draft layer copies the backbone's last block), or warm-started from a checkpoint."""
    heads = Heads(hc, rngs=nnx.Rngs(seed), draft_vocab=vocab)
    if hc.kind == "draft_layer":
        heads.drafter.init_from_backbone(backbone)
    if init_from:
        old = checkpoint.load_heads(init_from, backbone.cfg)
        if old.cfg.kind != hc.kind or old.cfg.k != hc.k:
            raise checkpoint.CheckpointError(f"run.init_from {init_from!r} holds {old.cfg.kind} heads with k="
                                             f"{old.cfg.k}; this run trains {hc.kind} with k={hc.k}.")
        for part in ("drafter", "clp"):
            state = jax.tree.map(lambda x, y: x.astype(y.dtype), nnx.state(getattr(old, part), nnx.Param),
                                 nnx.state(getattr(heads, part), nnx.Param))
            nnx.update(getattr(heads, part), state)
        log.info("warm start of the drafter and the CLP from %s", init_from)
    return heads


def validation_score(trainer: Trainer, store, held: dict[str, np.ndarray], batch_size: int) -> dict:
    """Held-out agreement per kind and draft; the score is its mean over drafts and self-distilled kinds
    (the decoding distribution; all kinds where the store has none)."""
    per_kind = {kind: evaluate(trainer, store, recs, batch_size)["agreement"] for kind, recs in held.items()}
    scored = [k for k in per_kind if k != "corpus"] or list(per_kind)
    return {"score": round(float(np.mean([np.mean(per_kind[k]) for k in scored])), 5), "agreement": per_kind}


def train_phase(name: str, backbone, heads: Heads, cfg: Config, mesh, store, records, vocab, out_dir: str,
                ckpt_dir: str, meta: dict, steps: int, batch_size: int, progress: bool, validation=None):
    """One phase through the one loop; returns the trainer (holding the trained heads, the best-scored ones
    when `validation` held-out records per kind are given and run.eval_every is set), its history and the
    step its heads come from."""
    rc = cfg.run
    trainer = Trainer(backbone.model, heads, name, cfg.train, vocab, steps, mesh)
    sampler = WindowSampler(store, records, batch_size, rc.window, rc.seed, soft=trainer.needs_soft)
    writer = multihost.is_writer()
    early = None
    if validation and rc.eval_every:
        early = EarlyStopping(lambda t: validation_score(t, store, validation, rc.eval_batch_size), rc.eval_every,
                              rc.patience, os.path.join(out_dir, f"scores_{name}.jsonl"), ckpt_dir + "_best")
    try:
        with TrainCheckpoints(ckpt_dir, rc.save_every, rc.keep) as ckpts:
            history = fit(trainer, sampler, steps=steps, batch_size=batch_size, ckpts=ckpts, meta=meta,
                          budget_seconds=rc.time_budget_minutes * 60, progress=progress, early=early,
                          log_path=os.path.join(out_dir, f"metrics_{name}.jsonl") if writer else None,
                          tensorboard_dir=os.path.join(out_dir, "tensorboard", name) if writer else None)
        kept = early.restore_best(trainer) if early is not None else trainer.step_count
    finally:
        if early is not None:
            early.close()
    return trainer, history, kept


def heldout_by_kind(store, records: np.ndarray, limit: int) -> dict[str, np.ndarray]:
    return {kind: records[store.kinds[records] == i][:limit] for i, kind in enumerate(KINDS)
            if np.any(store.kinds[records] == i)}


def run(cfg: Config, progress: bool = True) -> dict:
    """The whole run (see the module docstring); returns the evaluation written to eval.json."""
    rc, dc = cfg.run, cfg.data
    mesh = cfg.mesh.make() if cfg.mesh is not None else None
    check_batch_sizes(rc, mesh)
    shared = multihost.shared_directory(cache_dir())
    backbone = multihost.once("backbone", lambda: load_backbone(cfg.model.name, dtype=cfg.model.dtype,
                                                                progress=progress), shared)
    out_dir = rc.out_dir
    os.makedirs(out_dir, exist_ok=True)
    timings = {}

    # 1. features
    t0 = time.perf_counter()
    inputs = multihost.once("inputs", lambda: data_lib.build_inputs(dc, backbone.tokenizer, backbone.source,
                                                                    cache_dir("datasets")), shared)

    def make_generator():  # the recording ar decoder, continuously batched (decode/batching.py)
        dec = Decoder(backbone.model, None, DecodeConfig(mode="ar", max_new_tokens=dc.new_tokens, record_hidden=True,
                                                         record_topk=dc.soft_topk), backbone.eos_token_ids)
        return lambda prompts: batching.stream(dec, prompts, rc.gen_batch_size)

    plan = data_lib.build_store(dc, inputs, rc.store_dir, backbone=backbone.model, make_generator=make_generator,
                                feature_batch_size=rc.feature_batch_size,
                                progress=progress, continuations_dir=rc.continuations_dir,
                                backbone_id=f"{os.path.basename(str(backbone.source))}:{cfg.model.dtype}",
                                missing=rc.missing_shards)
    timings["features"] = time.perf_counter() - t0
    store = fs.FeatureStore(rc.store_dir, plan)
    parts = splits(store, cfg, out_dir)
    log.info("feature store: %d records, %d targets (%s)", len(store), store.positions(),
             ", ".join(f"{k} {len(v)} records / {store.positions(v)} targets" for k, v in parts.items()))
    if rc.stop_after == "features":
        return {"features": {k: store.positions(v) for k, v in parts.items()}, "seconds": timings}

    # 2. drafter
    if rc.train_targets or rc.train_kinds:
        parts["train"] = training_subset(store, parts["train"], rc.train_targets, rc.train_kinds, rc.seed)
        log.info("training subset: %d records, %d targets (run.train_targets %d, kinds %s)", len(parts["train"]),
                 store.positions(parts["train"]), rc.train_targets, list(rc.train_kinds) or "all")
    hc = cfg.heads_config(backbone.cfg)
    vocab_path = os.path.join(out_dir, "draft_vocab.npy")
    vocab = draft_vocabulary(store, parts["train"], rc.vocab_size, backbone.cfg.vocab_size, backbone.eos_token_ids,
                             vocab_path, None if os.path.exists(vocab_path) else
                             inherited_vocabulary(rc.init_from, backbone.cfg))
    heads = init_heads(hc, backbone.model, vocab, rc.init_from, rc.seed)
    log.info("parameters: %s; drafting from %d tokens", param_summary(heads), len(vocab))
    data_meta = {"store": _digest(np.asarray(plan)), "train": _digest(parts["train"]), "vocab": _digest(vocab),
                 "batch_size": rc.batch_size, "window": rc.window, "seed": rc.seed, "init_from": rc.init_from}
    ckpt_root = rc.checkpoint_dir or out_dir
    t0 = time.perf_counter()
    validation = heldout_by_kind(store, parts["heldout"], rc.validation_records)
    trainer, history, drafter_step = train_phase(
        "drafter", backbone, heads, cfg, mesh, store, parts["train"], vocab, out_dir,
        os.path.join(ckpt_root, "checkpoints"), run_meta(hc, backbone.cfg, data_meta, cfg.train), rc.steps,
        rc.batch_size, progress, validation)
    timings["drafter"] = time.perf_counter() - t0
    heads = trainer.heads()
    held = heldout_by_kind(store, parts["heldout"], rc.eval_records)
    result = {"drafter": {kind: evaluate(trainer, store, recs, rc.eval_batch_size) for kind, recs in held.items()},
              "drafter_steps": drafter_step, "drafter_steps_run": trainer.step_count,
              "positions_seen": drafter_step * rc.batch_size * min(rc.window, dc.seq_len),
              "train_positions": store.positions(parts["train"]),
              "train_positions_by_kind": {kind: store.positions(parts["train"][store.kinds[parts["train"]] == i])
                                          for i, kind in enumerate(KINDS)}}
    log.info("held-out agreement per draft position: %s",
             {k: v["agreement"] for k, v in result["drafter"].items()})

    # 3. CLP (labels from the trained drafter's chain, on records it never saw)
    if rc.stop_after != "drafter" and rc.clp_steps and len(parts["clp"]):
        t0 = time.perf_counter()
        clp_meta = run_meta(hc, backbone.cfg, {**data_meta, "drafter_step": drafter_step,
                                               "clp": _digest(parts["clp"]), "batch_size": rc.clp_batch_size}, cfg.train)
        trainer, _, _ = train_phase("clp", backbone, heads, cfg, mesh, store, parts["clp"], vocab, out_dir,
                                 os.path.join(ckpt_root, f"checkpoints_clp_after_{drafter_step}"), clp_meta,
                                 rc.clp_steps, rc.clp_batch_size, progress)
        heads = trainer.heads()
        result["clp"] = {kind: evaluate(trainer, store, recs, rc.eval_batch_size) for kind, recs in held.items()
                         if kind != "corpus"}
        timings["clp"] = time.perf_counter() - t0

    # 4. calibration of the drafts' confidences on held-out records; the heads
    distilled = parts["heldout"][store.kinds[parts["heldout"]] != KINDS.index("corpus")]
    cal = calibration.fit(heads, backbone.model, store, distilled if len(distilled) else parts["heldout"])
    heads = heads.with_calibration(cal["temperature"])
    result["calibration"] = cal
    result["seconds"] = timings
    checkpoint.save_heads(os.path.join(out_dir, "heads"), heads, backbone.cfg,  # collective
                          {"model": cfg.model.name, "eval": result})
    if multihost.is_writer():
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)
        if history or os.path.exists(os.path.join(out_dir, "metrics_drafter.jsonl")):
            plot_curves(os.path.join(out_dir, "metrics_drafter.jsonl"), os.path.join(out_dir, "curves.png"),
                        os.path.join(out_dir, "scores_drafter.jsonl"))
    return result
