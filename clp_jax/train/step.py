"""The sharded, jit-compiled training step of one phase: its trainable parameters, optimiser and objective.

Only the phase's parameters are differentiated (the drafter, plus the gate baseline, in phase 'drafter';
the CLP in phase 'clp'); the frozen backbone enters the step as a constant input (its embedding, final
norm and output projection are read, never updated). Parameters are placed by the logical-axis rules
(clp_jax/model/sharding.py) over a (`data`, `model`) mesh and the batch over `data`. The step donates
the parameters and optimiser state; a non-finite loss keeps the previous values (selected inside the
step) and raises on the host.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clp_jax.drafting.heads import Heads
from clp_jax.model import sharding
from clp_jax.train.objectives import OBJECTIVES, TrainConfig

# the parameters each phase trains (paths under Heads)
TRAINABLE = {"drafter": ("drafter", "gate_heads", "gate"), "clp": ("clp",)}


def make_optimizer(lr: float, steps: int, tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, linear warm-up and cosine decay to min_learning_rate_ratio."""
    warmup = max(min(tc.warmup_steps, steps // 2), 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * tc.min_learning_rate_ratio)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), optax.adamw(schedule, weight_decay=tc.weight_decay))


class Trainer:
    """The phase's trainable state and its compiled step and evaluation."""

    def __init__(self, backbone, heads: Heads, phase: str, tc: TrainConfig, vocab, steps: int,
                 mesh: Mesh | None = None):
        if phase not in OBJECTIVES:
            raise ValueError(f"Unknown training phase {phase!r}; expected one of {sorted(OBJECTIVES)}.")
        self.phase, self.tc, self.mesh = phase, tc, mesh
        self.objective: Callable = OBJECTIVES[phase]
        self.needs_soft = phase == "drafter" and tc.soft_weight > 0  # batches carry soft_ids / soft_probs
        self.vocab = jnp.asarray(vocab, jnp.int32)  # [U] the drafters' vocabulary
        self.optimizer = make_optimizer(tc.learning_rate if phase == "drafter" else tc.clp_learning_rate, steps, tc)
        parts = TRAINABLE[phase]
        self._bb_def, bb_state = nnx.split(backbone)
        self._heads_def, params, self._rest = nnx.split(
            heads, lambda path, x: isinstance(x, nnx.Param) and path[0] in parts, ...)
        params = jax.tree.map(jnp.array, params)  # own buffers: the step donates them
        if mesh is not None:
            sharding.check_divisible(params, mesh)
            sharding.check_divisible(bb_state, mesh)
            self._param_sh = sharding.state_shardings(params, mesh)
            params = jax.device_put(params, self._param_sh)
            bb_state = jax.device_put(bb_state, sharding.state_shardings(bb_state, mesh))
            opt_sh = sharding.like_params(jax.eval_shape(self.optimizer.init, params), params, self._param_sh)
            self.opt_state = jax.jit(self.optimizer.init, out_shardings=opt_sh)(params)
        else:
            self.opt_state = jax.jit(self.optimizer.init)(params)
        self.params, self.bb_state = params, bb_state
        self.step_count = 0
        self._step = self._compile_step()
        self._eval = jax.jit(self._metrics)

    def _loss(self, params, bb_state, batch):
        heads = nnx.merge(self._heads_def, params, self._rest)
        return self.objective(heads, nnx.merge(self._bb_def, bb_state), batch, self.tc, self.vocab)

    def _metrics(self, params, bb_state, batch):
        return self._loss(params, bb_state, batch)[1]

    def _compile_step(self):
        def step_fn(params, opt_state, bb_state, batch):
            (loss, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(params, bb_state, batch)
            updates, new_opt = self.optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            bad = ~jnp.isfinite(loss)  # keep the old state: the buffers are donated
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(bad, b, a), new, old)  # noqa: E731
            return keep(new_params, params), keep(new_opt, opt_state), {**metrics, "nonfinite": bad}

        if self.mesh is None:
            return jax.jit(step_fn, donate_argnums=(0, 1))
        shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
        replicated = NamedSharding(self.mesh, P())
        return jax.jit(step_fn, donate_argnums=(0, 1),
                       in_shardings=(self._param_sh, shardings(self.opt_state), shardings(self.bb_state), None),
                       out_shardings=(self._param_sh, shardings(self.opt_state), replicated))

    def place(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Shards a batch over `data` (on several processes: each passes the rows it holds)."""
        batch = {k: np.asarray(v) for k, v in batch.items()}
        if self.mesh is None:
            return jax.device_put(batch)
        if jax.process_count() > 1:
            return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, v.ndim), v)
                    for k, v in batch.items()}
        return {k: jax.device_put(v, sharding.batch_sharding(self.mesh, v.ndim)) for k, v in batch.items()}

    def step(self, batch: dict[str, Any]) -> dict:
        """One optimisation step; a non-finite loss raises and leaves the parameters as they were."""
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, self.bb_state,
                                                          self.place(batch))
        metrics = jax.device_get(metrics)
        if metrics.pop("nonfinite"):
            raise FloatingPointError(f"Non-finite loss at step {self.step_count} of phase {self.phase}; parameters "
                                     "left as they were. Lower the learning rate or check the data.")
        self.step_count += 1
        return metrics

    def evaluate(self, batch: dict[str, Any]) -> dict:
        """The objective's metrics on a held-out batch (no update)."""
        return jax.device_get(self._eval(self.params, self.bb_state, self.place(batch)))

    def heads(self) -> Heads:
        """The heads with the trained parameters (global arrays: on a pod, save_heads gathers them)."""
        return nnx.merge(self._heads_def, self.params, self._rest)
