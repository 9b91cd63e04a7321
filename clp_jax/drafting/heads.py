"""What is trained on top of the frozen backbone: MTP heads, the CLP, and the gate baseline.

* `MTPHeads`: k residual heads on the last hidden state h_n. Head j returns
  `h_n + SiLU(W_j h_n + b_j)` (plus `U_j Embed(t1)` in the conditioned variant); the backbone's own
  output projection turns it into logits. With `offset=1` (Backbone-as-Architect, the default) head j
  predicts the token at n+1+j; with `offset=0` (the gate baseline) head 1 predicts n+1 and so
  competes with the backbone's LM head.
* `CLP`: one `Linear(d -> k+1)`; its argmax is how many head tokens to accept after t1.
* `Gate`: the prior-work MLP gate (d -> 640 -> k, ~1M parameters at d=1536), a sigmoid per head.
"""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from clp_jax.model.layers import logical


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadsConfig:
    """Shape of the trained add-ons; stored with every heads checkpoint."""

    hidden_size: int
    vocab_size: int
    k: int = 4  # number of MTP heads (tokens n+2 .. n+k+1)
    conditioned: bool = False  # heads also read Embed(t1)
    gate: bool = True  # include the gate baseline (its own k heads, offset 0, and the MLP gate)
    gate_hidden: int = 640
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"HeadsConfig.k must be >= 1, got {self.k}.")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "HeadsConfig":
        return cls(**json.loads(s))


class MTPHeads(nnx.Module):
    """k Medusa-style residual heads, zero-initialised (each starts as 'repeat the LM head')."""

    def __init__(self, d: int, k: int, *, conditioned: bool = False, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        del rngs
        self.k = k
        self.w = nnx.Param(jnp.zeros((k, d, d), param_dtype), **logical("heads", "embed", "mlp"))  # [J, D, E]
        self.b = nnx.Param(jnp.zeros((k, d), param_dtype), **logical("heads", "mlp"))  # [J, E]
        self.u = (nnx.Param(jnp.zeros((k, d, d), param_dtype), **logical("heads", "embed", "mlp"))
                  if conditioned else None)

    def __call__(self, h: jax.Array, t1_embed: jax.Array | None = None, k: int | None = None) -> jax.Array:
        """h [..., D] -> states [..., J, D] of the first k heads (feed them to the backbone's `logits`)."""
        k = self.k if k is None else k
        pre = jnp.einsum("...D,JDE->...JE", h, self.w[...][:k].astype(h.dtype))
        pre = pre + self.b[...][:k].astype(h.dtype)
        if self.u is not None:
            if t1_embed is None:
                raise ValueError("Conditioned MTP heads need the embedding of t1.")
            pre = pre + jnp.einsum("...D,JDE->...JE", t1_embed, self.u[...][:k].astype(h.dtype))
        return h[..., None, :] + jax.nn.silu(pre)


class CLP(nnx.Module):
    """Collocation-Length Predictor: Linear(d -> k+1); parameters d*(k+1) + (k+1)."""

    def __init__(self, d: int, k: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear = nnx.Linear(d, k + 1, param_dtype=param_dtype, kernel_init=nnx.initializers.zeros,
                                 kernel_metadata=logical("embed", None), rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        """h [..., D] -> length logits [..., k+1] in fp32."""
        return self.linear(h.astype(self.linear.kernel.dtype)).astype(jnp.float32)


class Gate(nnx.Module):
    """The gate baseline: MLP d -> hidden -> k, one accept logit per head position."""

    def __init__(self, d: int, k: int, hidden: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d, hidden, param_dtype=param_dtype, kernel_metadata=logical("embed", None),
                              rngs=rngs)
        self.fc2 = nnx.Linear(hidden, k, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        """h [..., D] -> accept logits [..., k] in fp32."""
        h = h.astype(self.fc1.kernel.dtype)
        return self.fc2(jax.nn.silu(self.fc1(h))).astype(jnp.float32)


NEG_LOGIT = -1e30  # finite: softmax and sampling stay NaN-free


class Proposal(NamedTuple):
    """What a drafter offers at one position n (all computed from h_n)."""

    t1_logits: jax.Array | None  # [B, V] the backbone's own next-token logits (None if not asked for)
    draft_logits: jax.Array  # [B, k, V] logits of the tokens at n+2 .. n+k+1 (n+1 .. n+k for the gate)
    length_logits: jax.Array | None  # [B, k+1] CLP logits, or [B, k] gate accept logits



class Heads(nnx.Module):
    """Every trainable add-on of one backbone, checkpointed apart from it.

    `draft_vocab` [U] (optional, int32) restricts the heads' drafts to the token ids they were trained
    to score (the training sub-vocabulary): their output projection then reads U columns instead of
    the whole vocabulary. The backbone's own tokens (t1, verification) always use the full vocabulary.
    """

    def __init__(self, cfg: HeadsConfig, *, rngs: nnx.Rngs, draft_vocab=None):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.draft_vocab = None if draft_vocab is None else nnx.Variable(jnp.asarray(draft_vocab, jnp.int32))
        self.mtp = MTPHeads(cfg.hidden_size, cfg.k, conditioned=cfg.conditioned, param_dtype=pd, rngs=rngs)
        self.clp = CLP(cfg.hidden_size, cfg.k, param_dtype=pd, rngs=rngs)
        if cfg.gate:
            self.gate_heads = MTPHeads(cfg.hidden_size, cfg.k, param_dtype=pd, rngs=rngs)
            self.gate = Gate(cfg.hidden_size, cfg.k, cfg.gate_hidden, param_dtype=pd, rngs=rngs)
        else:
            self.gate_heads = self.gate = None

    def with_draft_vocab(self, draft_vocab) -> "Heads":
        """The same heads (parameters shared by value) drafting from `draft_vocab` [U] (None: everything)."""
        out = Heads(self.cfg, rngs=nnx.Rngs(0), draft_vocab=draft_vocab)
        nnx.update(out, nnx.state(self, nnx.Param))
        return out

    def propose(self, backbone, h: jax.Array, k: int, position: jax.Array | None = None,
                need_t1: bool = True) -> Proposal:
        """MTP drafts and CLP logits at h [B, D] (the state at `position` [B]), using the first k heads.

        Unconditioned heads share one output-projection call with t1 (the projection dominates memory
        traffic); conditioned heads read Embed(argmax t1) and need a second call. With
        need_t1=False (verify already has t1) the t1 row is left out where nothing needs it.
        """
        del position  # the heads read only h
        t1_logits = None
        if self.cfg.conditioned:
            t1_logits = backbone.logits(h)
            t1_embed = backbone.embed(jnp.argmax(t1_logits, axis=-1))
            draft_logits = self.draft_logits(backbone, self.mtp(h, t1_embed, k))
        elif need_t1 and self.draft_vocab is None:
            states = self.mtp(h, None, k)  # [B, k, D]
            logits = backbone.logits(jnp.concatenate([h[:, None, :], states], axis=1))  # [B, 1+k, V]
            t1_logits, draft_logits = logits[:, 0], logits[:, 1:]
        else:
            t1_logits = backbone.logits(h) if need_t1 else None
            draft_logits = self.draft_logits(backbone, self.mtp(h, None, k))  # [B, k, V]
        return Proposal(t1_logits, draft_logits, self.clp(h))

    def draft_logits(self, backbone, states: jax.Array) -> jax.Array:
        """Head states [B, J, D] -> logits [B, J, V]; outside `draft_vocab` a finite -1e30."""
        if self.draft_vocab is None:
            return backbone.logits(states)
        vocab = self.draft_vocab[...]
        sub = backbone.logits(states, vocab)  # [B, J, U]
        full = jnp.full(sub.shape[:-1] + (backbone.cfg.vocab_size,), NEG_LOGIT, sub.dtype)
        return full.at[..., vocab].set(sub)

    def propose_gate(self, backbone, h: jax.Array, k: int) -> Proposal:
        """Gate baseline: k heads for n+1 .. n+k (head 1 competes with the LM head) and accept logits."""
        if self.gate is None:
            raise ValueError("These heads were built without the gate baseline (HeadsConfig.gate=False).")
        states = self.gate_heads(h, None, k)
        if self.draft_vocab is None:
            logits = backbone.logits(jnp.concatenate([h[:, None, :], states], axis=1))
            return Proposal(logits[:, 0], logits[:, 1:], self.gate(h)[:, :k])
        return Proposal(backbone.logits(h), self.draft_logits(backbone, states), self.gate(h)[:, :k])


def count_params(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def param_summary(heads: Heads) -> str:
    """One line per part, e.g. for start-up logs."""
    parts = [("MTP heads", heads.mtp), ("CLP", heads.clp)]
    if heads.gate is not None:
        parts += [("gate heads", heads.gate_heads), ("gate MLP", heads.gate)]
    return ", ".join(f"{name}: {count_params(m):,}" for name, m in parts)

