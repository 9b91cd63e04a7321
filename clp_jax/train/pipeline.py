"""The end-to-end training run: backbone, dataset, two training phases, evaluation, saved heads.

Phase 1 ('joint') trains the heads, the CLP and the gate on most records; phase 2 ('clp', when
run.clp_steps > 0) trains only the CLP and the gate MLP on records the heads never saw, with labels
scored over the full vocabulary. Each phase checkpoints into its own directory, so a run killed at
any moment resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
from flax import nnx

from clp_jax.decode.loop import DecodeConfig, Decoder
from clp_jax.drafting import checkpoint
from clp_jax.drafting.heads import Heads, HeadsConfig, param_summary
from clp_jax.model.config import ModelConfig
from clp_jax.train import data as data_lib
from clp_jax.train.checkpoints import TrainCheckpoints
from clp_jax.train import multihost
from clp_jax.train.features import corpus_vocabulary
from clp_jax.train.loop import evaluate, fit
from clp_jax.train.plots import plot_curves
from clp_jax.train.run_config import Config, check_batch_sizes
from clp_jax.train.step import TrainConfig, Trainer
from clp_jax.weights.assets import cache_dir
from clp_jax.weights.loading import load_backbone

log = logging.getLogger(__name__)


def run_meta(heads_cfg: HeadsConfig, backbone_cfg: ModelConfig, data: dict | None = None,
             train: TrainConfig | None = None) -> dict:
    """What a resumed run must share with its checkpoint: heads, backbone, data order and optimisation."""
    meta = {"heads_config": json.loads(heads_cfg.to_json()), "backbone": checkpoint.backbone_fingerprint(backbone_cfg)}
    if data is not None:
        meta["data"] = data
    if train is not None:
        meta["train"] = dataclasses.asdict(train)
    return meta


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training phase: its optimisation, its records and where it keeps checkpoints and metrics."""

    name: str  # "joint" or "clp"
    train: TrainConfig
    source: object  # a data source (data.Subset of the training split)
    steps: int
    positions_per_row: int
    vocab: object  # scored ids, or None for the full vocabulary
    meta: dict


def train_phase(backbone, heads: Heads, phase: Phase, cfg: Config, mesh, hidden_fn, out_dir: str,
                progress: bool) -> tuple[Trainer, list[dict]]:
    """Trains `heads` through one phase, resuming from (and saving to) the phase's checkpoints."""
    rc = cfg.run
    suffix = "" if phase.name == "joint" else f"_{phase.name}"
    trainer = Trainer(backbone.model, heads, phase.train, mesh, vocab=phase.vocab)
    offset = getattr(phase.source, "offset", 0)
    with TrainCheckpoints(os.path.join(rc.checkpoint_dir or out_dir, f"checkpoints{suffix}"), rc.save_every,
                          rc.keep) as ckpts:
        writer = multihost.is_writer()  # the one process that writes metrics
        history = fit(trainer, phase.source, steps=phase.steps, batch_size=rc.batch_size,  # global batch
                      seed=rc.seed, hidden_fn=lambda idx, b: hidden_fn(idx + offset, b), ckpts=ckpts,
                      meta=phase.meta, progress=progress,
                      log_path=os.path.join(out_dir, f"metrics{suffix}.jsonl") if writer else None,
                      positions_per_row=phase.positions_per_row,
                      tensorboard_dir=os.path.join(out_dir, f"tensorboard{suffix}") if writer else None)
    return trainer, history


def run(cfg: Config, progress: bool = True) -> dict:
    """Loads the backbone, builds the data, trains, evaluates and saves heads; returns the evaluation."""
    rc, dc = cfg.run, cfg.data
    mesh = cfg.mesh.make() if cfg.mesh is not None else None
    check_batch_sizes(rc, mesh)
    # caches (converted weights, dataset, hidden states) built by process 0 alone on a shared disk
    shared = multihost.shared_directory(cache_dir())
    backbone = multihost.once("backbone", lambda: load_backbone(cfg.model.name, dtype=cfg.model.dtype,
                                                                progress=progress), shared)
    hc = cfg.heads_config(backbone.cfg.hidden_size, backbone.cfg.vocab_size)
    heads = Heads(hc, rngs=nnx.Rngs(rc.seed))
    log.info("parameters: %s", param_summary(heads))
    out_dir = rc.out_dir
    os.makedirs(out_dir, exist_ok=True)

    generate = None
    if dc.mode == "self_distill":  # the backbone's own greedy continuations are the targets
        generator = Decoder(backbone.model, None, DecodeConfig(mode="ar", max_new_tokens=dc.seq_len - dc.prompt_len),
                            backbone.eos_token_ids)
        generate = lambda prompts: generator.generate(prompts).tokens  # noqa: E731
    pad = backbone.tokenizer.pad_token_id or 0
    name = data_lib.dataset_name(dc, backbone.source)
    def rows():  # process 0 alone calls it when the cache directory is shared
        log.info("process %d: self-distilling dataset %s", jax.process_index(), name)
        return data_lib.records(dc, backbone.tokenizer, generate, pad, batch=rc.gen_batch_size, progress=progress)

    ds = multihost.once("dataset", lambda: data_lib.build_dataset(dc, name, rows, cache_dir("datasets")), shared)
    train_src, val_src = ds["train"], ds["validation"]
    vocab = None
    if rc.vocab == "corpus":
        vocab = corpus_vocabulary(dc, backbone.tokenizer, backbone.eos_token_ids, train_src, rc.vocab_size)
        log.info("scoring %d of %d tokens during training", vocab.size, backbone.cfg.vocab_size)
    hidden_dir = os.path.join(cache_dir("datasets"), name, "hidden")
    os.makedirs(hidden_dir, exist_ok=True)
    hidden_train, hidden_val = (
        multihost.cached_hidden_fn(backbone.model, src, progress=progress, shared=shared,
                                   path=os.path.join(hidden_dir, f"{split}-{backbone.cfg.dtype}.npy"))
        for split, src in (("train", train_src), ("validation", val_src)))
    data_meta = {"dataset": name, "batch_size": rc.batch_size, "seed": rc.seed, "vocab": rc.vocab,
                 "vocab_size": rc.vocab_size, "positions_per_row": rc.positions_per_row,
                 "clp_fraction": rc.clp_fraction if rc.clp_steps else 0}
    # Phase 2 (clp_steps > 0) trains the CLP on records the heads never saw, with full-vocabulary labels
    n_clp = int(len(train_src) * rc.clp_fraction) if rc.clp_steps else 0
    tc_clp = dataclasses.replace(cfg.train, phase="clp", learning_rate=rc.clp_learning_rate)
    phases = [Phase("joint", cfg.train, data_lib.Subset(train_src, 0, len(train_src) - n_clp), rc.steps,
                    rc.positions_per_row, vocab, run_meta(hc, backbone.cfg, data_meta, cfg.train))]
    if n_clp:
        phases.append(Phase("clp", tc_clp, data_lib.Subset(train_src, len(train_src) - n_clp, len(train_src)),
                            rc.clp_steps, rc.clp_positions_per_row, None,  # full vocabulary: honest L*
                            run_meta(hc, backbone.cfg, {**data_meta, "positions_per_row": rc.clp_positions_per_row},
                                     tc_clp)))
    t0 = time.perf_counter()
    history = []
    for phase in phases:
        trainer, done = train_phase(backbone, heads, phase, cfg, mesh, hidden_train, out_dir, progress)
        heads = trainer.heads()
        history += done
    seconds = time.perf_counter() - t0
    result = evaluate(trainer, val_src, batch_size=rc.eval_batch_size, hidden_fn=hidden_val,
                      progress=progress)
    result.update(train_seconds=seconds, steps_run=len(history),
                  train_tokens_per_second=sum(h["tokens"] for h in history) / max(seconds, 1e-9),
                  records_train=len(train_src), records_validation=len(val_src))
    final = trainer.heads()
    if vocab is not None:  # the heads learnt to score these ids only: decoding drafts from them
        final = final.with_draft_vocab(vocab)
    checkpoint.save_heads(os.path.join(out_dir, "heads"), final, backbone.cfg, {"eval": result})  # collective
    if multihost.is_writer():
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot_curves(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "curves.png"))
    return result
