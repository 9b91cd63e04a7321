"""The training loop: exact resume from Orbax checkpoints, logging, evaluation, and the end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clp_jax.train import data as data_lib
from clp_jax.train import multihost
from clp_jax.drafting.checkpoint import CheckpointError, TrainCheckpoints, backbone_fingerprint
from clp_jax.train.step import Trainer


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
    from tqdm.auto import tqdm

    meta = meta or {}
    if ckpts is not None:
        restored = ckpts.restore(trainer.params, trainer.opt_state)
        if restored is not None:
            step, params, opt_state, saved_meta = restored
            for key in ("heads_config", "backbone", "data", "train"):  # run.steps may grow: not compared
                if key in meta and saved_meta.get(key) != meta[key]:
                    raise CheckpointError(f"The checkpoint in {ckpts.directory} was made with another "
                                          f"{key} ({saved_meta.get(key)}); this run has {meta[key]}. "
                                          "Use a new run.out_dir, or restore the settings of that run.")
            trainer.params, trainer.opt_state, trainer.step_count = params, opt_state, step
    history = []
    log = open(log_path, "a") if log_path else None
    board = None
    if tensorboard_dir:
        from tensorboardX import SummaryWriter

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
            if log:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
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
            print(f"\nInterrupted: saved step {trainer.step_count} to {ckpts.directory}.", file=sys.stderr)
        raise
    finally:
        bar.close()
        if log:
            log.close()
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
    from tqdm.auto import tqdm

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


def cached_hidden_fn(model, source, batch_size: int = 8, progress: bool = True, path: str | None = None):
    """Backbone hidden states of every record, computed once: D*4 bytes per token in fp32 (3.5 KB for
    the 0.5B backbone). With `path`, they are stored there as .npy and memory-mapped by later runs."""
    from tqdm.auto import tqdm

    from clp_jax.train.step import backbone_hidden

    if path is not None and os.path.exists(path):
        table = np.load(path, mmap_mode="r")
        if table.shape[0] == len(source):
            return lambda idx, batch: jnp.asarray(table[idx])
    fn = jax.jit(backbone_hidden)
    parts = []
    for start in tqdm(range(0, len(source), batch_size), desc="backbone hidden states", disable=not progress):
        batch = data_lib.get_batch(source, np.arange(start, min(start + batch_size, len(source))))
        parts.append(np.asarray(fn(model, jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))))
    table = np.concatenate(parts)  # [N, T, D]
    if path is not None:
        tmp = path + ".partial.npy"
        np.save(tmp, table)
        os.replace(tmp, path)  # whole or absent
    return lambda idx, batch: jnp.asarray(table[idx])


def run_meta(heads_cfg, backbone_cfg, data: dict | None = None, train=None) -> dict:
    """What a resumed run must share with its checkpoint: heads, backbone, data order and optimisation."""
    meta = {"heads_config": json.loads(heads_cfg.to_json()), "backbone": backbone_fingerprint(backbone_cfg)}
    if data is not None:
        meta["data"] = data
    if train is not None:
        meta["train"] = dataclasses.asdict(train)
    return meta


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


# ---------------------------------------------------------------------------- end-to-end run

SECTIONS = ("model", "heads", "data", "train", "mesh", "run")
RUN_DEFAULTS = dict(out_dir="runs/demo", steps=200, batch_size=8, positions_per_row=16, vocab="corpus",
                    vocab_size=16384, seed=0, save_every=50, keep=3, gen_batch_size=8, eval_batch_size=8,
                    clp_fraction=0.25, clp_steps=0, clp_positions_per_row=4, clp_learning_rate=3e-3,
                    checkpoint_dir="")  # checkpoint_dir: Orbax training checkpoints, e.g. gs://bucket/run (default out_dir)


def load_config(path: str, overrides: list[str] = ()) -> dict:
    """A TOML run config plus `section.key=value` overrides (values parsed as TOML, else strings)."""
    import tomllib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config {path!r} does not exist.")
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not name or section not in SECTIONS:
            raise ValueError(f"Override {item!r} must look like section.key=value with section in {SECTIONS}.")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        cfg.setdefault(section, {})[name] = parsed
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ValueError(f"Unknown config sections {sorted(unknown)}; expected {SECTIONS}.")
    bad = set(cfg.get("run", {})) - set(RUN_DEFAULTS)
    if bad:
        raise ValueError(f"Unknown [run] keys {sorted(bad)}; expected {sorted(RUN_DEFAULTS)}.")
    return cfg


def check_batch_sizes(rc: dict, mesh) -> None:
    """Global batch sizes must divide the mesh's data axis and the processes, before anything is built."""
    for key in ("batch_size", "eval_batch_size"):
        if mesh is not None and rc[key] % mesh.shape["data"]:
            raise ValueError(f"run.{key}={rc[key]} does not divide the mesh's data axis ({mesh.shape['data']}).")
        if rc[key] % jax.process_count():
            raise ValueError(f"run.{key}={rc[key]} does not divide the {jax.process_count()} processes.")


def run(cfg: dict, progress: bool = True) -> dict:
    """Loads the backbone, builds the data, trains, evaluates and saves heads; returns the evaluation."""
    from flax import nnx

    from clp_jax.drafting import checkpoint
    from clp_jax.weights.assets import cache_dir
    from clp_jax.decode.loop import DecodeConfig, Decoder
    from clp_jax.drafting.heads import Heads, HeadsConfig, param_summary
    from clp_jax.weights.loading import load_backbone
    from clp_jax.model.sharding import MeshConfig
    from clp_jax.train.step import TrainConfig

    rc = {**RUN_DEFAULTS, **cfg.get("run", {})}
    tc = TrainConfig(**cfg.get("train", {}))
    dc = data_lib.DataConfig(**{k: tuple(v) if k == "sources" else v for k, v in cfg.get("data", {}).items()})
    mesh = MeshConfig(**cfg.get("mesh", {})).make() if cfg.get("mesh") else None
    check_batch_sizes(rc, mesh)
    # batch sizes are global: on several processes each loads the rows its devices hold (multihost.py)
    shared = multihost.shared_directory(cache_dir())  # caches built by process 0 alone, or by every host
    model_cfg = cfg.get("model", {})
    backbone = multihost.once("backbone", lambda: load_backbone(
        model_cfg.get("name", "demo"), dtype=model_cfg.get("dtype", "float32"), progress=progress), shared)
    hc = HeadsConfig(hidden_size=backbone.cfg.hidden_size, vocab_size=backbone.cfg.vocab_size,
                     **cfg.get("heads", {}))
    heads = Heads(hc, rngs=nnx.Rngs(rc["seed"]))
    print(f"parameters: {param_summary(heads)}", file=sys.stderr)
    out_dir = ensure_dir(rc["out_dir"])

    def generate(prompts):
        return generator.generate(prompts).tokens

    generator = Decoder(backbone.model, None, DecodeConfig(mode="ar", max_new_tokens=dc.seq_len - dc.prompt_len),
                        backbone.eos_token_ids)
    pad = backbone.tokenizer.pad_token_id or 0
    name = data_lib.dataset_name(dc, backbone.source)

    def rows():  # process 0 alone calls it when the cache directory is shared
        print(f"process {jax.process_index()}: self-distilling dataset {name}", file=sys.stderr)
        return data_lib.records(dc, backbone.tokenizer, generate, pad, batch=rc["gen_batch_size"], progress=progress)

    ds = multihost.once("dataset", lambda: data_lib.build_dataset(dc, name, rows, cache_dir("datasets")), shared)
    train_src, val_src = ds["train"], ds["validation"]
    vocab = None
    if rc["vocab"] == "corpus":
        vocab = corpus_vocabulary(dc, backbone, train_src, rc["vocab_size"])
        print(f"scoring {vocab.size} of {backbone.cfg.vocab_size} tokens during training", file=sys.stderr)
    elif rc["vocab"] != "full":
        raise ValueError(f"run.vocab must be 'corpus' or 'full', got {rc['vocab']!r}.")
    hidden_dir = ensure_dir(os.path.join(cache_dir("datasets"), name, "hidden"))
    hidden_train = multihost.cached_hidden_fn(backbone.model, train_src, progress=progress, shared=shared,
                                              path=os.path.join(hidden_dir, f"train-{backbone.cfg.dtype}.npy"))
    hidden_val = multihost.cached_hidden_fn(backbone.model, val_src, progress=progress, shared=shared,
                                            path=os.path.join(hidden_dir, f"validation-{backbone.cfg.dtype}.npy"))
    writer = multihost.is_writer()  # the one process that writes metrics, eval.json and plots
    data_meta = {"dataset": name, "batch_size": rc["batch_size"], "seed": rc["seed"], "vocab": rc["vocab"],
                 "vocab_size": rc["vocab_size"], "positions_per_row": rc["positions_per_row"],
                 "clp_fraction": rc["clp_fraction"] if rc["clp_steps"] else 0}
    meta = run_meta(hc, backbone.cfg, data_meta, tc)
    # Phase 2 (clp_steps > 0) trains the CLP on records the heads never saw, with full-vocabulary labels
    n_clp = int(len(train_src) * rc["clp_fraction"]) if rc["clp_steps"] else 0
    heads_src = data_lib.Subset(train_src, 0, len(train_src) - n_clp)
    t0 = time.perf_counter()
    trainer = Trainer(backbone.model, heads, tc, mesh, vocab=vocab)
    ckpt_root = rc["checkpoint_dir"] or out_dir
    with TrainCheckpoints(os.path.join(ckpt_root, "checkpoints"), rc["save_every"], rc["keep"]) as ckpts:
        history = fit(trainer, heads_src, steps=rc["steps"], batch_size=rc["batch_size"], seed=rc["seed"],
                      hidden_fn=hidden_train, ckpts=ckpts, meta=meta, progress=progress,
                      log_path=os.path.join(out_dir, "metrics.jsonl") if writer else None,
                      positions_per_row=rc["positions_per_row"],
                      tensorboard_dir=os.path.join(out_dir, "tensorboard") if writer else None)
    if n_clp:
        clp_src = data_lib.Subset(train_src, len(train_src) - n_clp, len(train_src))
        tc_clp = dataclasses.replace(tc, phase="clp", learning_rate=rc["clp_learning_rate"])
        trainer = Trainer(backbone.model, trainer.heads(), tc_clp, mesh)  # full vocabulary: honest L*
        with TrainCheckpoints(os.path.join(ckpt_root, "checkpoints_clp"), rc["save_every"], rc["keep"]) as ckpts:
            history += fit(trainer, clp_src, steps=rc["clp_steps"], batch_size=rc["batch_size"], seed=rc["seed"],
                           hidden_fn=lambda idx, b: hidden_train(idx + clp_src.offset, b), ckpts=ckpts,
                           meta=run_meta(hc, backbone.cfg, {**data_meta, "positions_per_row": rc["clp_positions_per_row"]},
                                         tc_clp), progress=progress,
                           log_path=os.path.join(out_dir, "metrics_clp.jsonl") if writer else None,
                           positions_per_row=rc["clp_positions_per_row"])
    seconds = time.perf_counter() - t0
    result = evaluate(trainer, val_src, batch_size=rc["eval_batch_size"], hidden_fn=hidden_val, progress=progress)
    result.update(train_seconds=seconds, steps_run=len(history),
                  train_tokens_per_second=sum(h["tokens"] for h in history) / max(seconds, 1e-9),
                  records_train=len(train_src), records_validation=len(val_src))
    final = trainer.heads()
    if vocab is not None:  # the heads learnt to score these ids only: decoding drafts from them
        final = final.with_draft_vocab(vocab)
    checkpoint.save_heads(os.path.join(out_dir, "heads"), final, backbone.cfg, {"eval": result})  # collective
    if writer:
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot_curves(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "curves.png"))
    return result


def corpus_vocabulary(dc, backbone, train_src, size: int) -> np.ndarray:
    """Token ids scored in training: the `size` most frequent in the corpus files, every token of the
    training rows, and the end-of-turn tokens (FastMTP-style vocabulary compression)."""
    from collections import Counter

    counts = Counter(data_lib.token_stream(backbone.tokenizer, data_lib.source_files(dc.sources, dc.max_files,
                                                                                    dc.seed)))
    ids = {t for t, _ in counts.most_common(size)} | set(backbone.eos_token_ids)
    for i in range(len(train_src)):
        ids.update(np.asarray(train_src[i]["tokens"]).tolist())
    return np.asarray(sorted(ids), np.int32)


def plot_curves(metrics_path: str, png_path: str) -> None:
    """Loss and per-head agreement against the step (skipped, with a note, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no training-curve plot.", file=sys.stderr)
        return
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(steps, [r["loss"] for r in rows])
    a.set(xlabel="step", ylabel="loss", title="training loss")
    for key in sorted(k for k in rows[0] if k.endswith("_acc")):
        b.plot(steps, [r[key] for r in rows], label=key)
    b.set(xlabel="step", ylabel="agreement", title="per-head agreement (train batches)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
