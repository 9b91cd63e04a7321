"""What is trained on top of the frozen backbone: MTP heads, the CLP, and the gate baseline.

* `MTPHeads`: k residual heads on the last hidden state h_n. Head j returns
  `h_n + SiLU(W_j h_n + b_j)` (plus `U_j Embed(t1)` in the conditioned variant); the backbone's own
  output projection turns it into logits. With `offset=1` (Backbone-as-Architect, the default) head j
  predicts the token at n+1+j; with `offset=0` (the gate baseline) head 1 predicts n+1 and so
  competes with the backbone's LM head.
* `CLP`: one `Linear(d -> k+1)`; its argmax is how many head tokens to accept after t1.
* `Gate`: the prior-work MLP gate (d -> 640 -> k, ~1M parameters at d=1536), a sigmoid per head.
* `DraftLayer` (draft_layer.py): the second kind of drafter (`HeadsConfig.kind = "draft_layer"`), one
  decoder block applied autoregressively over the k positions, with a KV cache of its own.

Every drafter answers one call, `Heads.draft` (the `Drafter` protocol): given the hidden states of the
chunk the backbone just ran, the anchor (the slot whose state is h_n) and t1, it returns k draft
tokens, their logits, the CLP's length logits and its updated cache.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from clp_jax.drafting.draft_layer import TRUNK_FEATURES, DraftLayer
from clp_jax.model.config import ModelConfig
from clp_jax.model.layers import logical
from clp_jax.model.numerics import NEG_LOGIT


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadsConfig:
    """Shape of the trained add-ons; stored with every heads checkpoint."""

    hidden_size: int
    vocab_size: int
    k: int = 4  # number of MTP heads (tokens n+2 .. n+k+1)
    kind: str = "medusa"  # "medusa" (k residual heads on h_n) or "draft_layer" (one block, applied k times)
    # draft_layer: the backbone geometry its block copies (ModelConfig fields as (name, value) pairs)
    layer: tuple = ()
    conditioned: bool = False  # heads also read Embed(t1)
    gate: bool = True  # include the gate baseline (its own k heads, offset 0, and the MLP gate)
    gate_hidden: int = 640
    param_dtype: str = "float32"
    # draft_layer: what step 1 reads of the trunk (drafting/draft_layer.py): "final_norm" (h, as the LM head
    # reads it) or "pre_norm" (the final norm's input direction, what MiMo-MTP engines such as vLLM hand their MTP
    # layer: an export then drafts exactly as here). Checkpoints without the field are "final_norm".
    trunk_feature: str = "final_norm"

    def __post_init__(self):
        if not 1 <= self.k <= MAX_K:
            raise ValueError(f"HeadsConfig.k must be in 1..{MAX_K}, got {self.k}.")
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"HeadsConfig.kind must be one of {HEAD_KINDS}, got {self.kind!r}.")
        if self.trunk_feature not in TRUNK_FEATURES:
            raise ValueError(f"HeadsConfig.trunk_feature must be one of {TRUNK_FEATURES}, got {self.trunk_feature!r}.")
        if self.kind == "draft_layer" and not self.layer:
            raise ValueError("A draft_layer HeadsConfig needs the backbone geometry: use HeadsConfig.for_backbone.")
        object.__setattr__(self, "layer", tuple((str(a), b) for a, b in self.layer))  # JSON lists -> pairs

    @classmethod
    def for_backbone(cls, cfg: ModelConfig, **kw) -> "HeadsConfig":
        """Heads for a backbone: its width and vocabulary, and (draft layer) its block geometry."""
        layer = tuple(sorted(cfg.replace(num_layers=1).to_dict().items()))
        return cls(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, layer=layer, **kw)

    def layer_config(self) -> ModelConfig:
        return ModelConfig.from_dict(dict(self.layer))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "HeadsConfig":
        return cls(**json.loads(s))


HEAD_KINDS = ("medusa", "draft_layer")
MAX_K = 16  # more draft positions than any pass would verify


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

    # ------------------------------------------------------------------ the Drafter interface

    @property
    def follows_t1(self) -> bool:
        """Whether the drafts are drawn for the t1 actually chosen (only conditioned heads read it)."""
        return self.u is not None

    def init_cache(self, batch: int, capacity: int, dtype=jnp.float32) -> tuple:
        return ()  # each head reads h_n alone

    def draft(self, backbone, hidden, next_tokens, positions, anchor, k, cache, pick, logits_fn):
        """k drafts from h_n (and Embed(t1) when conditioned): logits [B, k, V], tokens [B, k], cache."""
        rows = jnp.arange(hidden.shape[0])
        h = hidden[rows, anchor]  # [B, D]
        t1_embed = backbone.embed(next_tokens[rows, anchor]) if self.u is not None else None
        logits = logits_fn(self(h, t1_embed, k))  # [B, k, V]
        return logits, jnp.stack([pick(j, logits[:, j]) for j in range(k)], axis=1), cache

    def unrolled(self, backbone, hidden: jax.Array, tokens: jax.Array, k: int) -> jax.Array:
        """Training: states [k, B, T, D] laid out as DraftLayer.unrolled's (entry [j-1, :, p] scores the
        token at p+2 for an anchor at n = p-j+1): head j's state at n moved to p = n+j-1."""
        t1e = None
        if self.u is not None:  # x_{n+1}: the token after each anchor
            t1e = backbone.embed(jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)).astype(hidden.dtype)
        states = self(hidden, t1e, k)  # [B, T, k, D]
        out = []
        for j in range(k):
            s = states[:, :, j]
            out.append(jnp.concatenate([jnp.zeros_like(s[:, :j]), s[:, :s.shape[1] - j]], axis=1))
        return jnp.stack(out)


class CLP(nnx.Module):
    """Collocation-Length Predictor: Linear(d -> k+1); parameters d*(k+1) + (k+1)."""

    def __init__(self, d: int, k: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear = nnx.Linear(d, k + 1, param_dtype=param_dtype, kernel_init=nnx.initializers.zeros,
                                 kernel_metadata=logical("embed", None), rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        """h [..., D] -> length logits [..., k+1] in fp32."""
        return self.linear(h.astype(self.linear.kernel.dtype)).astype(jnp.float32)


def clp_length(length_logits: jax.Array, k: int, margin: float | None = None) -> jax.Array:
    """Heads the CLP commits [...] from its length logits [..., K+1] (K >= k trained lengths): the argmax (at
    most k), or with a margin p the most heads l <= k with P(L* >= l) >= p (mass beyond k counts for l <= k)."""
    if margin is None:
        return jnp.minimum(jnp.argmax(length_logits, -1), k)
    probs = jax.nn.softmax(length_logits, axis=-1)
    at_least = jnp.flip(jnp.cumsum(jnp.flip(probs, -1), -1), -1)  # [..., K+1] P(L* >= l)
    return jnp.sum(at_least[..., 1:k + 1] >= margin, axis=-1)


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


class Proposal(NamedTuple):
    """What a drafter offers at one position n (all computed from h_n)."""

    t1_logits: jax.Array | None  # [B, V] the backbone's own next-token logits (None if not asked for)
    draft_logits: jax.Array  # [B, k, V] logits of the tokens at n+2 .. n+k+1 (n+1 .. n+k for the gate)
    length_logits: jax.Array | None  # [B, k+1] CLP logits, or [B, k] gate accept logits



class Drafts(NamedTuple):
    """What a drafter offers after one backbone pass, anchored at h_n."""

    logits: jax.Array  # [B, k, V] logits of the tokens at n+2 .. n+k+1 (-1e30 outside the draft vocabulary)
    tokens: jax.Array  # [B, k] the drafted tokens (chosen by `pick` from those logits)
    length_logits: jax.Array  # [B, k+1] CLP logits at h_n
    cache: tuple  # the drafter's own KV cache (empty for Medusa heads)


# pick(j, logits [B, V]) -> tokens [B]: how the decoder turns draft j's logits into a token
Pick = Callable[[int, jax.Array], jax.Array]


class Drafter(Protocol):
    """What the decoder needs of a set of heads (`Heads`, or a test double)."""

    cfg: HeadsConfig
    gate: nnx.Module | None

    def init_cache(self, batch: int, capacity: int) -> tuple: ...

    def draft(self, backbone, hidden: jax.Array, next_tokens: jax.Array, positions: jax.Array,
              anchor: jax.Array, k: int, cache: tuple, pick: Pick, kernel: jax.Array | None = None) -> Drafts: ...

    def draft_kernel(self, backbone) -> jax.Array | None: ...

    def propose_gate(self, backbone, h: jax.Array, k: int) -> Proposal: ...


class Heads(nnx.Module):
    """Every trainable add-on of one backbone, checkpointed apart from it.

    `draft_vocab` [U] (optional, int32) restricts the heads' drafts to the token ids they were trained
    to score (the training sub-vocabulary): their output projection then reads U columns instead of
    the whole vocabulary. The backbone's own tokens (t1, verification) always use the full vocabulary.
    """

    def __init__(self, cfg: HeadsConfig, *, rngs: nnx.Rngs, draft_vocab=None, calibration=None):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.draft_vocab = None if draft_vocab is None else nnx.Variable(jnp.asarray(draft_vocab, jnp.int32))
        # per draft position j, a temperature T_j fitted on held-out records: softmax(logits_j / T_j) is a
        # calibrated confidence (None: uncalibrated heads); stored in heads.json, not a trained Param
        if calibration is not None and len(calibration) != cfg.k:
            raise ValueError(f"calibration has {len(calibration)} temperatures; these heads draft {cfg.k} positions.")
        self.calibration = None if calibration is None else nnx.Variable(jnp.asarray(calibration, jnp.float32))
        # the drafter: one of two implementations of the same interface (draft / unrolled / init_cache)
        self.drafter = DRAFTERS[cfg.kind](cfg, rngs)
        self.clp = CLP(cfg.hidden_size, cfg.k, param_dtype=pd, rngs=rngs)
        if cfg.gate:
            self.gate_heads = MTPHeads(cfg.hidden_size, cfg.k, param_dtype=pd, rngs=rngs)
            self.gate = Gate(cfg.hidden_size, cfg.k, cfg.gate_hidden, param_dtype=pd, rngs=rngs)
        else:
            self.gate_heads = self.gate = None

    def with_draft_vocab(self, draft_vocab) -> "Heads":
        """The same heads (parameters shared by value) drafting from `draft_vocab` [U] (None: everything)."""
        out = Heads(self.cfg, rngs=nnx.Rngs(0), draft_vocab=draft_vocab, calibration=self.calibration_list())
        nnx.update(out, nnx.state(self, nnx.Param))
        return out

    def calibration_list(self) -> list[float] | None:
        return None if self.calibration is None else [float(t) for t in self.calibration[...]]

    def with_calibration(self, temperatures) -> "Heads":
        """The same heads with per-position confidence temperatures [k] (None: uncalibrated)."""
        out = Heads(self.cfg, rngs=nnx.Rngs(0), calibration=temperatures,
                    draft_vocab=None if self.draft_vocab is None else self.draft_vocab[...])
        nnx.update(out, nnx.state(self, nnx.Param))
        return out

    def init_cache(self, batch: int, capacity: int, dtype=jnp.float32) -> tuple:
        """The drafter's own cache (the draft layer's KV cache; Medusa heads keep none)."""
        return self.drafter.init_cache(batch, capacity, dtype)

    def draft(self, backbone, hidden: jax.Array, next_tokens: jax.Array, positions: jax.Array,
              anchor: jax.Array, k: int, cache: tuple, pick: Pick, kernel: jax.Array | None = None) -> Drafts:
        """k drafts after the anchor slot of the chunk the backbone just ran.

        Args:
          hidden: [B, W, D] the trunk's hidden states of the fed chunk.
          next_tokens: [B, W] the committed token after each slot (t1 at the anchor; slots past the
            anchor are never read).
          positions: [B, W] the chunk's positions.
          anchor: [B] the slot whose hidden state is h_n (the last committed token with a state).
          cache: the drafter's cache (see `init_cache`).
          pick: turns draft j's logits [B, V] into tokens [B] (greedy or sampled).
          kernel: `draft_kernel(backbone)`, computed once outside the decoding loop (else per call).
        """
        h = hidden[jnp.arange(hidden.shape[0]), anchor]  # [B, D]
        logits, tokens, cache = self.drafter.draft(backbone, hidden, next_tokens, positions, anchor, k, cache, pick,
                                                   lambda states: self.draft_logits(backbone, states, kernel))
        return Drafts(logits, tokens, self.clp(h), cache)

    def draft_kernel(self, backbone) -> jax.Array | None:
        """The output projection's rows of `draft_vocab` [U, D] (None without one): a gather of U*D
        values, so the decoder computes it once per program, outside its loop."""
        return None if self.draft_vocab is None else backbone.output_kernel(self.draft_vocab[...])

    def draft_logits(self, backbone, states: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        """Head states [B, J, D] -> logits [B, J, V]; outside `draft_vocab` a finite -1e30."""
        if self.draft_vocab is None:
            return backbone.logits(states)
        vocab = self.draft_vocab[...]
        sub = backbone.logits(states, vocab, kernel=kernel)  # [B, J, U]
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


DRAFTERS = {
    "medusa": lambda cfg, rngs: MTPHeads(cfg.hidden_size, cfg.k, conditioned=cfg.conditioned,
                                         param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs),
    "draft_layer": lambda cfg, rngs: DraftLayer(cfg.layer_config().replace(param_dtype=cfg.param_dtype),
                                                trunk_feature=cfg.trunk_feature, rngs=rngs),
}


def count_params(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def param_summary(heads: Heads) -> str:
    """One line per part, e.g. for start-up logs."""
    parts = [("MTP heads" if heads.cfg.kind == "medusa" else "draft layer", heads.drafter), ("CLP", heads.clp)]
    if heads.gate is not None:
        parts += [("gate heads", heads.gate_heads), ("gate MLP", heads.gate)]
    return ", ".join(f"{name}: {count_params(m):,}" for name, m in parts)

