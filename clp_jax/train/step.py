"""Sharded, jit-compiled training of the heads, the CLP and the gate on a frozen backbone.

A batch holds the frozen backbone's final hidden states (computed on the fly or cached), the token
sequence they came from and a loss mask:  hidden [B, T, D], tokens [B, T], mask [B, T].
Only the heads' parameters are differentiated and optimised; the backbone enters the step as a
constant input (its output projection scores the heads), so it never receives gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clp_jax.train import losses
from clp_jax.model import sharding
from clp_jax.drafting.heads import Heads
from clp_jax.model.qwen2 import Qwen2


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 20  # learning-rate warm-up
    head_decay: float = 0.8  # weight of head j relative to head 1: decay**(j-1)
    deep_heads_warmup: int = 100  # linear warm-up of heads 2..k's weight
    clp_weight: float = 1.0
    # "joint": heads, CLP and gate together; "clp": only the CLP (and gate MLP) learn, on labels of the
    # frozen, trained heads -- run on records the heads never saw, so L* has the distribution of deployment
    phase: str = "joint"
    gate_weight: float = 1.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.phase not in ("joint", "clp"):
            raise ValueError(f"train.phase must be 'joint' or 'clp', got {self.phase!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 < self.head_decay <= 1:
            raise ValueError(f"train.head_decay must be in (0, 1], got {self.head_decay}.")
        if not self.grad_clip > 0:
            raise ValueError(f"train.grad_clip must be > 0, got {self.grad_clip}.")
        for name in ("warmup_steps", "deep_heads_warmup", "clp_weight", "gate_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}.")


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.linear_schedule(0.0, tc.learning_rate, max(tc.warmup_steps, 1))
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                       optax.adamw(schedule, weight_decay=tc.weight_decay))


def backbone_hidden(model: Qwen2, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Final hidden states [B, T, D] of the frozen backbone (cache-free causal pass)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = model(tokens, positions, kv_valid=mask)
    return jax.lax.stop_gradient(hidden)


def loss_and_metrics(heads: Heads, backbone: Qwen2, batch: dict, step: jax.Array, tc: TrainConfig,
                     vocab: jax.Array | None = None):
    """Total loss and metrics of one batch (see clp_jax.train.losses for the alignment).

    Optional batch["positions"] [B, P] selects the positions scored (the output projection over the
    vocabulary dominates the cost); optional `vocab` [U] restricts scoring to those token ids
    (vocabulary compression as in FastMTP; targets outside it are not scored).
    """
    h, tokens, mask = batch["hidden"], batch["tokens"], batch["mask"].astype(bool)
    k = heads.cfg.k
    metrics = {}

    def select(targets, valid):
        if vocab is not None:  # map token ids to columns of the sub-vocabulary (-1: absent)
            column = jnp.full((backbone.cfg.vocab_size,), -1, jnp.int32).at[vocab].set(jnp.arange(vocab.size))
            targets = column[targets]
            valid = valid & (targets >= 0)
            targets = jnp.maximum(targets, 0)
        if "positions" in batch:
            pos = batch["positions"]
            targets = jnp.take_along_axis(targets, pos[..., None], 1)
            valid = jnp.take_along_axis(valid, pos[..., None], 1)
        return targets, valid

    targets, valid = select(*losses.shifted_targets(tokens, mask, k, offset=1))
    next_tokens = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)  # the backbone's s[t+1]
    source_ok = mask
    if "positions" in batch:
        pos = batch["positions"]
        h = jnp.take_along_axis(h, pos[..., None], 1)
        next_tokens = jnp.take_along_axis(next_tokens, pos, 1)
        source_ok = jnp.take_along_axis(mask, pos, 1)
    t1_embed = backbone.embed(next_tokens) if heads.cfg.conditioned else None
    heads_learn = tc.phase == "joint"
    states = heads.mtp(h, t1_embed)  # [B, P, k, D]
    if not heads_learn:
        states = jax.lax.stop_gradient(states)
    weights = losses.head_weights(k, tc.head_decay, tc.deep_heads_warmup, step)
    total, correct = 0.0, []
    for j in range(k):  # one head at a time: [B, P, V] logits, not [B, P, k, V]
        logits = backbone.logits(states[:, :, j], vocab)
        ce = losses.masked_mean(losses.cross_entropy(logits, targets[..., j]), valid[..., j])
        hit = jnp.argmax(logits, -1) == targets[..., j]
        correct.append(hit)
        total = total + (weights[j] * ce if heads_learn else 0.0)
        metrics[f"head{j + 1}_loss"] = ce
        metrics[f"head{j + 1}_acc"] = losses.masked_mean(hit.astype(jnp.float32), valid[..., j])
    correct = jax.lax.stop_gradient(jnp.stack(correct, -1))  # [B, P, k]
    labels = losses.clp_labels(correct, valid)  # L*: from the current heads
    clp_valid = source_ok & valid[..., 0]
    clp_logits = heads.clp(h)
    clp_ce = losses.masked_mean(losses.cross_entropy(clp_logits, labels), clp_valid)
    total = total + tc.clp_weight * clp_ce
    metrics["clp_loss"] = clp_ce
    clp_pred = jnp.argmax(clp_logits, -1)
    metrics["clp_acc"] = losses.masked_mean((clp_pred == labels).astype(jnp.float32), clp_valid)
    for c in range(k + 1):  # label distribution (CLP accuracy means little without it)
        metrics[f"clp_label{c}_frac"] = losses.masked_mean((labels == c).astype(jnp.float32), clp_valid)
    # confusion counts [true L*, predicted L] over scored positions
    pair = jnp.where(clp_valid, labels * (k + 1) + clp_pred, (k + 1) ** 2)
    metrics["clp_confusion"] = jnp.bincount(pair.reshape(-1), length=(k + 1) ** 2 + 1)[:-1].reshape(k + 1, k + 1)
    if heads.gate is not None:
        g_targets, g_valid = select(*losses.shifted_targets(tokens, mask, k, offset=0))
        g_states = heads.gate_heads(h)
        if not heads_learn:
            g_states = jax.lax.stop_gradient(g_states)
        gate_logits = heads.gate(h)  # [B, P, k]
        for j in range(k):
            logits = backbone.logits(g_states[:, :, j], vocab)
            ce = losses.masked_mean(losses.cross_entropy(logits, g_targets[..., j]), g_valid[..., j])
            hit = jax.lax.stop_gradient((jnp.argmax(logits, -1) == g_targets[..., j]).astype(jnp.float32))
            bce = losses.masked_mean(optax.sigmoid_binary_cross_entropy(gate_logits[..., j], hit), g_valid[..., j])
            total = total + tc.gate_weight * ((weights[j] * ce if heads_learn else 0.0) + bce)
            metrics[f"gate_head{j + 1}_acc"] = losses.masked_mean(hit, g_valid[..., j])
    metrics["loss"] = total
    return total, metrics


class Trainer:
    """Holds the optimiser state and the compiled step; shards everything over `mesh` if given."""

    def __init__(self, backbone: Qwen2, heads: Heads, tc: TrainConfig, mesh: Mesh | None = None,
                 vocab=None):
        self.tc, self.mesh = tc, mesh
        self.vocab = None if vocab is None else jnp.asarray(vocab, jnp.int32)  # scored token ids [U]
        self.optimizer = make_optimizer(tc)
        self._bb_def, bb_state = nnx.split(backbone)
        trainable = nnx.Param if tc.phase == "joint" else nnx.All(
            nnx.Param, nnx.Any(nnx.PathContains("clp"), nnx.PathContains("gate")))  # CLP and gate MLP only
        self._heads_def, params, rest = nnx.split(heads, trainable, ...)
        self._rest = rest
        if mesh is not None:
            sharding.check_divisible(params, mesh)
            sharding.check_divisible(bb_state, mesh)
            self._param_sh = sharding.state_shardings(params, mesh)
            bb_sh = sharding.state_shardings(bb_state, mesh)
            params = jax.device_put(params, self._param_sh)
            bb_state = jax.device_put(bb_state, bb_sh)
        self.params, self.bb_state = params, bb_state
        if mesh is None:
            self.opt_state = jax.jit(self.optimizer.init)(params)
        else:  # Adam's moments take their parameter's sharding (XLA would replicate the zeros)
            opt_sh = sharding.like_params(jax.eval_shape(self.optimizer.init, params), params, self._param_sh)
            self.opt_state = jax.jit(self.optimizer.init, out_shardings=opt_sh)(params)
        self.step_count = 0
        self._step = self._compile_step()
        self._eval = {}

    def _compile_step(self):
        def step_fn(params, opt_state, bb_state, batch, step):
            backbone = nnx.merge(self._bb_def, bb_state)

            def loss_fn(p):
                heads = nnx.merge(self._heads_def, p, self._rest)
                return loss_and_metrics(heads, backbone, batch, step, self.tc, self.vocab)

            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            bad = ~jnp.isfinite(metrics["loss"])
            metrics["nonfinite"] = bad
            return params, opt_state, metrics

        if self.mesh is None:
            return jax.jit(step_fn)
        shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
        replicated = NamedSharding(self.mesh, P())
        batch_sh = {name: sharding.batch_sharding(self.mesh, nd)
                    for name, nd in (("hidden", 3), ("tokens", 2), ("mask", 2), ("positions", 2))}
        return jax.jit(
            step_fn,
            in_shardings=(self._param_sh, shardings(self.opt_state), shardings(self.bb_state), batch_sh,
                          replicated),
            out_shardings=(self._param_sh, shardings(self.opt_state), replicated))

    def _place(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Adds default positions (all of them) and shards the batch over `data`."""
        if "positions" not in batch:
            B, T = batch["tokens"].shape
            batch = {**batch, "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}
        if self.mesh is not None:
            if jax.process_count() > 1:  # multi-host: each process holds its own rows of the global batch
                batch = {k: jax.make_array_from_process_local_data(
                    sharding.batch_sharding(self.mesh, np.ndim(v)), np.asarray(v)) for k, v in batch.items()}
            else:
                batch = {k: jax.device_put(v, sharding.batch_sharding(self.mesh, jnp.ndim(v)))
                         for k, v in batch.items()}
        return batch

    def step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimisation step; a non-finite loss raises and leaves the parameters untouched."""
        batch = self._place(batch)
        # not donated: the heads are small, and a rejected step must leave the old state intact
        params, opt_state, metrics = self._step(self.params, self.opt_state, self.bb_state, batch,
                                                jnp.asarray(self.step_count, jnp.int32))
        metrics = jax.device_get(metrics)
        metrics.pop("clp_confusion")  # per-step logs keep scalars; evaluation sums the confusion
        if metrics.pop("nonfinite"):
            raise FloatingPointError(f"Non-finite loss at step {self.step_count}; parameters left as they were. "
                                     "Lower the learning rate or check the data.")
        self.params, self.opt_state = params, opt_state
        self.step_count += 1
        return {k: float(v) for k, v in metrics.items()}

    def evaluate(self, batch: dict[str, Any], full_vocab: bool = False) -> dict[str, float]:
        """Metrics of the current heads on a held-out batch (no update); full_vocab scores every token
        (what decoding sees) even when training uses a sub-vocabulary."""
        vocab = None if full_vocab else self.vocab
        if full_vocab not in self._eval:
            def eval_fn(params, bb_state, batch, step):
                heads = nnx.merge(self._heads_def, params, self._rest)
                return loss_and_metrics(heads, nnx.merge(self._bb_def, bb_state), batch, step, self.tc, vocab)[1]
            self._eval[full_vocab] = jax.jit(eval_fn)
        batch = self._place(batch)
        metrics = jax.device_get(self._eval[full_vocab](self.params, self.bb_state, batch,
                                                        jnp.asarray(self.step_count, jnp.int32)))
        return {k: (v.tolist() if k == "clp_confusion" else float(v)) for k, v in metrics.items()}

    def heads(self) -> Heads:
        return nnx.merge(self._heads_def, self.params, self._rest)
