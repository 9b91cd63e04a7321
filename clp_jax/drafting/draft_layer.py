"""The draft layer: one Qwen2 decoder block shared by the k draft positions, applied autoregressively.

EAGLE / DeepSeek-V3 MTP-module style. Draft step j at position p reads a feature `f` (the trunk's
final-normed hidden state h_p for j=1, then the draft layer's own output) and the embedding of the
token at p+1 (t1 for j=1, then the token it just drafted), fuses them with
`Linear(2D -> D)` over `[RMSNorm(f); RMSNorm(Embed(x))]`, runs one decoder layer (initialised from the
backbone's last layer) whose attention reads the draft layer's keys/values of earlier positions, and
returns a new feature in the trunk's output space (the backbone's final norm): `LM(feature)` scores the
token at p+2.

Where step 1 reads the trunk (`trunk_feature`): "final_norm" uses h_p as LM(h_p) reads it; "pre_norm" uses the
final norm's input direction, h_p / g_final = x_p / rms(x_p), so that RMSNorm(f) equals what a MiMo-MTP engine
computes from the pre-norm state it hands its MTP layer (vLLM does): an export then drafts exactly as here.
Both carry the same information; the choice is fixed at training time.

Two ways to run it, with the same numbers:
* decoding (`step`): a static-shape KV cache of its own. Entries at committed positions q are written
  from (h_q, x_{q+1}) of the pass that verified them; speculative entries of a chain (steps 2..k) lie
  beyond the row's committed length and are overwritten by the next pass, as in the trunk's cache.
* training (`unrolled`): EAGLE-3's training-time test. Step j at every position p of a teacher-forced
  sequence attends to the step-1 keys at positions <= p-j+1 (the real context where the chain started)
  plus the keys step i (2..j) produced at p-(j-i): exactly what the cache holds at decode time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clp_jax.model.attention import NEG_INF
from clp_jax.model.config import ModelConfig
from clp_jax.model.kv_cache import LayerCache, empty_layer_cache
from clp_jax.model.layers import RMSNorm, apply_rope, logical, rope_angles
from clp_jax.model.qwen2 import DecoderLayer


TRUNK_FEATURES = ("final_norm", "pre_norm")


class DraftLayer(nnx.Module):
    """Fuse + one Qwen2 decoder layer; the backbone's embedding, final norm and output projection are
    borrowed at call time (frozen, never stored here)."""

    def __init__(self, cfg: ModelConfig, *, trunk_feature: str = "final_norm", rngs: nnx.Rngs):
        if trunk_feature not in TRUNK_FEATURES:
            raise ValueError(f"trunk_feature must be one of {TRUNK_FEATURES}, got {trunk_feature!r}.")
        D = cfg.hidden_size
        pd = cfg.jnp_param_dtype
        self.cfg = cfg
        self.trunk_feature = trunk_feature
        self.norm_feature = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.norm_token = RMSNorm(D, eps=cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        # [2D, D]; starts as feature + token embedding (both normalised), refined by training
        eye = jnp.eye(D, dtype=pd)
        self.fuse = nnx.Param(jnp.concatenate([eye, eye], axis=0), **logical(None, "embed"))
        self.layer = DecoderLayer(cfg, rngs=rngs)

    def init_from_backbone(self, backbone) -> None:
        """Copies the backbone's last decoder layer into the draft layer's block (new buffers: training
        may donate the draft layer's parameters, never the backbone's)."""
        state = nnx.state(backbone.layers[-1], nnx.Param)
        nnx.update(self.layer, jax.tree.map(lambda x: jnp.array(x, dtype=self.cfg.jnp_param_dtype), state))

    def _fused(self, backbone, features: jax.Array, tokens: jax.Array, from_trunk: bool) -> jax.Array:
        """features [B, T, D] (the trunk's when `from_trunk`, else the draft layer's own), tokens [B, T] ->
        fused input [B, T, D]."""
        dt = features.dtype
        if from_trunk and self.trunk_feature == "pre_norm":
            g = backbone.final_norm.scale[...].astype(dt)  # [D]
            features = features / jnp.where(g == 0, 1, g)  # x / rms(x): the final norm's input direction
        e = backbone.embed(tokens).astype(dt)
        x = jnp.concatenate([self.norm_feature(features), self.norm_token(e)], axis=-1)  # [B, T, 2D]
        return jnp.einsum("BTE,ED->BTD", x, self.fuse[...].astype(dt))

    def step(self, backbone, features: jax.Array, tokens: jax.Array, positions: jax.Array,
             cache: LayerCache, from_trunk: bool = True) -> tuple[jax.Array, LayerCache]:
        """One cached pass: features [B, T, D] (trunk space: the trunk's states, or with from_trunk=False the
        draft layer's own output), tokens [B, T] (the token after each position), positions [B, T] -> (new
        features [B, T, D] in trunk space, cache with these T entries written)."""
        x = self._fused(backbone, features, tokens, from_trunk)
        out, cache = self.layer(x, positions, cache)
        return backbone.final_norm(out), cache

    # ------------------------------------------------------------------ the Drafter interface

    follows_t1 = True  # step 1 reads Embed(t1)

    def init_cache(self, batch: int, capacity: int, dtype=jnp.float32) -> tuple:
        """One layer's KV cache (`kv_cache.empty_layer_cache`: keys [B, K, H, capacity], values
        [B, K, capacity, H])."""
        return (empty_layer_cache(self.cfg, batch, capacity, dtype),)

    def draft(self, backbone, hidden, next_tokens, positions, anchor, k, cache, pick, logits_fn):
        """The chain of k drafts after the anchor slot: one pass over the fed chunk writes the committed
        positions' entries and is step 1; steps 2..k feed their own drafts.
        Returns logits [B, k, V], tokens [B, k] and the updated cache."""
        def score(j, f):
            logits = logits_fn(f)[:, 0]  # [B, V]
            return pick(j, logits), logits

        outs, cache = self.chain(backbone, hidden, next_tokens, positions, anchor, k, cache, score)
        return jnp.stack([o[1] for o in outs], 1), jnp.stack([o[0] for o in outs], 1), cache

    def chain(self, backbone, hidden, next_tokens, positions, anchor, k, cache, score, go_on=None):
        """The chain itself, with an optional stopping rule.

        score(j, f [B, 1, D]) -> (token [B], ...): draft j's token and whatever else the caller keeps.
        go_on(j, outs) -> [B] bool, called before step j+1 (j = 1..k-1) with the j outputs so far: step j+1
        runs under `lax.cond` only while some row wants it (a skipped step costs nothing on XLA:CPU; its
        outputs are zeros). Returns the k outputs of `score` and the cache."""
        rows = jnp.arange(hidden.shape[0])
        feats, layer_cache = self.step(backbone, hidden, next_tokens, positions, cache[0])
        f = feats[rows, anchor][:, None]  # [B, 1, D]
        pos = positions[rows, anchor][:, None]  # [B, 1]
        outs = [score(0, f)]
        for j in range(1, k):
            def more(op, j=j):
                f, lc = op
                f, lc = self.step(backbone, f, outs[-1][0][:, None], pos + j, lc, from_trunk=False)
                return f, lc, score(j, f)

            if go_on is None:
                f, layer_cache, out = more((f, layer_cache))
            else:
                skip = lambda op: op + (jax.tree.map(jnp.zeros_like, outs[-1]),)  # noqa: E731
                f, layer_cache, out = jax.lax.cond(jnp.any(go_on(j, outs)), more, skip, (f, layer_cache))
            outs.append(out)
        return outs, (layer_cache,)

    # ------------------------------------------------------------------ training-time test

    def unrolled(self, backbone, hidden: jax.Array, tokens: jax.Array, k: int) -> jax.Array:
        """Teacher-forced chains of k steps started at every position of a sequence.

        Args:
          hidden: [B, T, D] the trunk's final-normed hidden states h_p.
          tokens: [B, T] the sequence x; step j at position p reads x_{p+1} (the last position reads a
            repeat of x_{T-1}, masked out by the caller).
        Returns:
          features [k, B, T, D]: entry [j-1, :, p] is step j's output at position p, i.e. the feature
          whose logits score the token at p+2 for a chain started at p-j+1.
        """
        B, T, _ = hidden.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        next_tokens = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)  # [B, T] x_{p+1}
        keys, values, outs = [], [], []
        feats = hidden
        for j in range(k):
            if j > 0:  # step j+1 at p reads step j's output at p-1
                feats = jnp.concatenate([jnp.zeros_like(feats[:, :1]), outs[-1][:, :-1]], axis=1)
            x = self._fused(backbone, feats, next_tokens, from_trunk=j == 0)
            out, kv = self._train_block(x, positions, keys, values)
            keys.append(kv[0])
            values.append(kv[1])
            outs.append(backbone.final_norm(out))
        return jnp.stack(outs)

    def _train_block(self, x, positions, keys, values):
        """The decoder layer with the training-time-test attention; appends nothing itself."""
        layer, cfg = self.layer, self.cfg
        attn = layer.attn
        h_in = layer.attn_norm(x)
        sin, cos = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        q = apply_rope(attn.q.rows(h_in), sin, cos)  # [B, T, N, H]
        k_new = apply_rope(attn.k.rows(h_in), sin, cos)  # [B, T, K, H]
        v_new = attn.v.rows(h_in)
        j = len(keys)  # this is step j+1; keys holds steps 1..j
        B, T = x.shape[:2]
        Kh, G, H = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
        q = q.reshape(B, T, Kh, G, H)
        base_k = keys[0] if j else k_new
        base_v = values[0] if j else v_new
        scale = H ** -0.5
        s_main = jnp.einsum("BTKGH,BSKH->BKGTS", q, base_k.astype(q.dtype)).astype(jnp.float32) * scale
        qpos = jnp.arange(T)
        mask = jnp.arange(T)[None, :] <= (qpos[:, None] - j)  # [T, S]: the chain's real context
        s_main = jnp.where(mask, s_main, NEG_INF)
        # diagonal entries: step i (2..j+1) wrote its key at p-(j+1-i); the newest (i=j+1) is k_new at p
        diag_k = [_shift(kk, j - i) for i, kk in enumerate(keys[1:], start=1)] + ([k_new] if j else [])
        diag_v = [_shift(vv, j - i) for i, vv in enumerate(values[1:], start=1)] + ([v_new] if j else [])
        if diag_k:
            dk = jnp.stack(diag_k, axis=2)  # [B, T, I, K, H]
            s_diag = jnp.einsum("BTKGH,BTIKH->BKGTI", q, dk.astype(q.dtype)).astype(jnp.float32) * scale
            scores = jnp.concatenate([s_main, s_diag], axis=-1)
        else:
            scores = s_main
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., :T], base_v.astype(q.dtype))
        if diag_v:
            dv = jnp.stack(diag_v, axis=2)  # [B, T, I, K, H]
            out = out + jnp.einsum("BKGTI,BTIKH->BTKGH", probs[..., T:], dv.astype(q.dtype))
        out = attn.o.rows(out.reshape(B, T, cfg.num_heads, H))
        x = x + out
        x = x + layer.mlp(layer.mlp_norm(x))
        return x, (k_new, v_new)


def _shift(x: jax.Array, n: int) -> jax.Array:
    """x [B, T, ...] moved n positions later along T (zeros enter at the front)."""
    if n == 0:
        return x
    return jnp.concatenate([jnp.zeros_like(x[:, :n]), x[:, :-n]], axis=1)
