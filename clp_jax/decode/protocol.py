"""Room: the mode protocol (Step, Ctx, Commit, Next, Mode); a leaf that imports only state.py and model/.

The words every mode and the shared tail (decode/after_pass.py) speak; modes.py and verify.py both build on
it, and it imports neither, so the registry in modes.py imports verify.py at its top without a circle.

`Step` is one fed chunk after a backbone pass; a mode reads a `Ctx` and answers `(Commit, Next, mode_state)`:
what to commit now and what to draft for the next pass. `take_rows`, `nothing` and `anchor_logits` are the
small helpers more than one mode uses.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from clp_jax.decode.state import DecodeConfig, DecodeState
from clp_jax.model.qwen2 import Qwen2


def take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, W, ...] gathered at idx [B, J] along axis 1 -> [B, J, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


class Step(NamedTuple):
    """One fed chunk: the trunk's states of it and where each row's last committed token sits."""

    hidden: jax.Array  # [B, W, D]
    chunk: jax.Array  # [B, W] the tokens fed
    positions: jax.Array  # [B, W]
    last: jax.Array  # [B] slot of the last committed token (its state is h_n)
    draft_kernel: jax.Array | None = None  # heads.draft_kernel(model), computed once per program
    prefill: bool = False  # the prompt's pass (not counted in the loop's pass statistics)

    def next_tokens(self, anchor: jax.Array, t1: jax.Array) -> jax.Array:
        """[B, W] the committed token after each slot: the chunk shifted by one, t1 after the anchor (slots
        past the anchor are never read)."""
        W = self.chunk.shape[1]
        shifted = jnp.concatenate([self.chunk[:, 1:], self.chunk[:, -1:]], axis=1)
        return jnp.where(jnp.arange(W)[None, :] == anchor[:, None], t1[:, None], shifted)


class Ctx(NamedTuple):
    """What a mode's step reads."""

    model: Qwen2
    heads: Any  # drafting.heads.Heads (or a test double), None for ar
    st: DecodeState
    step: Step
    key: jax.Array  # this step's randomness (the mode splits it as it needs)


class Commit(NamedTuple):
    """What one mode decides after a backbone pass, before EOS, budget and capacity cut it."""

    tokens: jax.Array  # [B, k+1] tokens to commit after the row's length
    count: jax.Array  # [B] how many of them (1 .. k+1)
    head_ok: jax.Array  # [B, k] head tokens accepted into `tokens`
    offered: jax.Array  # [B, k] head tokens that were on offer
    head_start: int = 1  # index in `tokens` of head token 0 (1 after t1; 0 for gate and verify)
    cached: jax.Array | int = 0  # [B] leading committed tokens this pass already fed (their KV is cached)
    t1_logits: jax.Array | None = None  # [B, V] the backbone's next-token logits (ar: soft labels)
    tree_ok: jax.Array | int = 0  # [B] a sibling was accepted (verify's draft tree)


class Next(NamedTuple):
    """What a step drafted: drafts to feed with the next chunk (verify; written after the commit), and the
    drafting it ran (for the pass statistics)."""

    tokens: jax.Array  # [B, k]
    count: jax.Array  # [B] 0..k drafts to feed
    steps: jax.Array | int = 0  # [B] draft steps run
    cost: jax.Array | float = 0.0  # [B] their cost in one-slot passes (decode/pass_costs.py)
    source: jax.Array | int = 0  # [B] where the fed drafts come from: 0 the heads, 1 the context (lookup)
    tree_tokens: jax.Array | None = None  # [B, tree] siblings to feed after the drafts (depths 1..)
    tree_count: jax.Array | int = 0  # [B] how many of them


def nothing(B: int, k: int, steps=0, cost=0.0) -> Next:
    return Next(jnp.zeros((B, k), jnp.int32), jnp.zeros((B,), jnp.int32), steps, cost)


def anchor_logits(ctx: Ctx) -> tuple[jax.Array, jax.Array]:
    """h_n [B, D] at each row's last committed slot and the backbone's next-token logits [B, V]."""
    h = take_rows(ctx.step.hidden, ctx.step.last[:, None])[:, 0]
    return h, ctx.model.logits(h)


class Mode:
    """A decoding mode. Subclasses set `name`, `drafts` and implement `step`."""

    name: ClassVar[str]
    drafts: ClassVar[bool] = True  # the heads draft after each pass (needs heads; gathers their kernel)

    def __init__(self, dc: DecodeConfig, costs=None):
        self.dc = dc
        self.k = dc.k
        self.costs = costs

    @property
    def width(self) -> int:
        """Slots fed per step (the widest chunk)."""
        return self.k + 1

    def init_state(self, B: int, S: int, model: Qwen2, heads) -> Any:
        """The mode's own state (a pytree with leading axis B), carried in DecodeState.mode_state."""
        return ()

    def step(self, ctx: Ctx) -> tuple[Commit, Next, Any]:
        raise NotImplementedError

    def record(self, st: DecodeState, step: Step, c: Commit) -> dict:
        """DecodeState fields this mode records after a pass (only ar records anything)."""
        return {}
