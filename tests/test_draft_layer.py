"""The draft layer: its training-time unrolling equals its cached decoding, and every decoding mode
runs with it (verify stays exactly ar; its drafts are the ones an offline chain computes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clp_jax.decode.decoder import DecodeConfig, Decoder
from clp_jax.decode.sampling import SamplingConfig
from clp_jax.drafting.heads import Heads, HeadsConfig
from clp_jax.model.kv_cache import LayerCache


NEW = 20


def draft_heads(model, k=3, seed=5, vocab=None, scale=0.05, **kw):
    """Draft-layer heads copied from the backbone's last layer, with random perturbations."""
    heads = Heads(HeadsConfig.for_backbone(model.cfg, k=k, kind="draft_layer", **kw), rngs=nnx.Rngs(seed),
                  draft_vocab=vocab)
    heads.drafter.init_from_backbone(model)
    state = nnx.state(heads, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)]
    nnx.update(heads, jax.tree.unflatten(treedef, leaves))
    return heads


@pytest.fixture(scope="module")
def ar_tokens(model, prompts):
    return Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=NEW)).generate(prompts).tokens


def with_final_norm(model, seed=1):
    """A copy of the backbone whose final norm scale is far from ones (it matters for `trunk_feature`)."""
    model = nnx.clone(model)
    g = model.final_norm.scale[...]
    model.final_norm.scale[...] = g * jnp.exp(0.5 * jax.random.normal(jax.random.key(seed), g.shape, g.dtype))
    return model


@pytest.mark.parametrize("trunk", ["final_norm", "pre_norm"])
def test_unrolled_training_equals_cached_chain(model, trunk):
    """Step j of the training-time test at position p0+j-1 == the decoder's cached chain from p0."""
    k, T = 3, 12
    model = with_final_norm(model)
    heads = draft_heads(model, k, trunk_feature=trunk)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 128, (1, T)), jnp.int32)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    hidden, _ = model(tokens, positions)
    unrolled = heads.drafter.unrolled(model, hidden, tokens, k)  # [k, 1, T, D]
    for p0 in (0, 4, 7):
        cache = heads.init_cache(1, 32)[0]
        nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
        feats, cache = heads.drafter.step(model, hidden[:, :p0 + 1], nxt[:, :p0 + 1], positions[:, :p0 + 1], cache)
        f = feats[:, p0:p0 + 1]
        np.testing.assert_allclose(f[0, 0], unrolled[0, 0, p0], atol=2e-5)
        for j in range(1, k):  # teacher-forced tokens x_{p0+j+1}, as in training
            f, cache = heads.drafter.step(model, f, tokens[:, p0 + j + 1:p0 + j + 2], positions[:, p0 + j:p0 + j + 1],
                                          cache, from_trunk=False)
            np.testing.assert_allclose(f[0, 0], unrolled[j, 0, p0 + j], atol=2e-5)


def test_pre_norm_step_reads_what_mimo_engines_feed(model):
    """With trunk_feature "pre_norm", step 1 given the trunk's final-normed state y = FinalNorm(x) fuses exactly
    what a MiMo-MTP layer computes from the pre-norm x (RMSNorm_h(x), as vLLM feeds it); "final_norm" does not."""
    model = with_final_norm(model)
    D = model.cfg.hidden_size
    x = 3.0 * jax.random.normal(jax.random.key(2), (2, 5, D))  # the final norm's input, any scale
    y = model.final_norm(x)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 5)), jnp.int32)

    def mimo(layer):  # input_proj(cat[hidden_layernorm(x), token_layernorm(embed)])
        cat = jnp.concatenate([layer.norm_feature(x), layer.norm_token(model.embed(tokens))], -1)
        return cat @ layer.fuse[...]

    pre = draft_heads(model, trunk_feature="pre_norm").drafter
    np.testing.assert_allclose(pre._fused(model, y, tokens, from_trunk=True), mimo(pre), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pre._fused(model, y, tokens, from_trunk=False),  # its own features: as given
                               draft_heads(model).drafter._fused(model, y, tokens, from_trunk=True), atol=1e-6)
    final = draft_heads(model, trunk_feature="final_norm").drafter
    assert float(jnp.max(jnp.abs(final._fused(model, y, tokens, from_trunk=True) - mimo(final)))) > 1e-2


def test_unrolled_ignores_the_future(model):
    """Changing tokens after position p changes no step's output at or before p - 1 (no leak)."""
    k, T = 3, 10
    heads = draft_heads(model, k)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 128, (1, T)), jnp.int32)
    other = tokens.at[0, 6:].set((tokens[0, 6:] + 1) % 128)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    a = heads.drafter.unrolled(model, model(tokens, pos)[0], tokens, k)
    b = heads.drafter.unrolled(model, model(other, pos)[0], other, k)
    np.testing.assert_allclose(a[:, :, :5], b[:, :, :5], atol=1e-6)  # step j at p reads x_{p+1}: p <= 4
    assert not np.allclose(a[:, :, 5], b[:, :, 5])


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("batch", [1, 3])
def test_verify_with_draft_layer_equals_ar(model, prompts, ar_tokens, batch, adaptive):
    rows = prompts if batch == 3 else prompts[1:2]
    want = ar_tokens if batch == 3 else ar_tokens[1:2]
    dc = DecodeConfig(mode="verify", k=3, max_new_tokens=NEW, adaptive_width=adaptive)
    out = Decoder(model, draft_heads(model), dc).generate(rows)
    assert out.tokens == want


@pytest.mark.parametrize("budget", ["fixed", "auto"])
def test_verify_drafts_equal_an_offline_chain(model, prompts, ar_tokens, budget):
    """Each first draft equals argmax LM(step-1 feature) of the training-time unrolling over the final
    sequence: the decoder's draft cache holds the committed positions' real entries. Under the draft budget
    these wrong drafts stop the row drafting, so most drafts come after a catch-up over skipped positions."""
    k = 3
    vocab = np.arange(0, 128, 2)
    heads = draft_heads(model, k, vocab=vocab)
    p = prompts[1]
    dec = Decoder(model, heads, DecodeConfig(mode="verify", k=k, max_new_tokens=NEW, draft_budget=budget,
                                             draft_source="heads"))
    seen, steps = [], 0
    st = dec.start([p])
    while not bool(st.done[0]):
        vs = st.mode_state
        if bool(vs.drafted[0]):  # the chain's first draft, fed or not, anchored at length - 2
            seen.append((int(st.length[0]), int(vs.first[0])))
        st = dec.advance(st, 1)
        steps += 1
    full = jnp.asarray([p + ar_tokens[1]], jnp.int32)
    pos = jnp.arange(full.shape[1], dtype=jnp.int32)[None]
    feats = heads.drafter.unrolled(model, model(full, pos)[0], full, 1)[0, 0]  # [T, D]
    want = vocab[np.asarray(jnp.argmax(model.logits(feats, jnp.asarray(vocab)), -1))]
    assert len(seen) >= 3
    if budget == "auto":
        assert len(seen) < steps  # some steps skipped drafting (and later ones caught up)
    for length, draft in seen:
        assert draft == want[length - 2], length


@pytest.mark.parametrize("mode", ["clp", "confadapt"])
def test_heads_modes_with_draft_layer(model, prompts, ar_tokens, mode):
    heads = draft_heads(model)
    heads.clp.linear.bias[...] = jnp.zeros((4,)).at[0].set(10.0)  # CLP: accept nothing
    dc = DecodeConfig(mode=mode, k=3, max_new_tokens=NEW, tau=1.0)
    out = Decoder(model, heads, dc).generate(prompts)
    assert out.tokens == ar_tokens  # t1 alone is committed: plain ar
    heads.clp.linear.bias[...] = jnp.zeros((4,)).at[3].set(10.0)  # accept all three drafts
    out = Decoder(model, heads, DecodeConfig(mode="clp", k=3, max_new_tokens=NEW)).generate(prompts)
    assert out.tokens_per_pass > 3.0 and out.tokens != ar_tokens


def test_sampled_verify_and_batches_run(model, prompts):
    dc = DecodeConfig(mode="verify", k=2, max_new_tokens=NEW, sampling=SamplingConfig(temperature=0.8, top_p=0.9))
    a = Decoder(model, draft_heads(model), dc).generate(prompts, seed=3)
    b = Decoder(model, draft_heads(model), dc).generate(prompts, seed=3)
    assert a.tokens == b.tokens and all(len(t) == NEW for t in a.tokens)


def test_draft_cache_shape(model):
    heads = draft_heads(model)
    (cache,) = heads.init_cache(2, 48, jnp.float32)
    assert isinstance(cache, LayerCache)
    assert cache.k.shape == (2, model.cfg.num_kv_heads, model.cfg.head_dim, 48)
    assert cache.v.shape == (2, model.cfg.num_kv_heads, 48, model.cfg.head_dim)
    assert Heads(HeadsConfig.for_backbone(model.cfg, k=2), rngs=nnx.Rngs(0)).init_cache(2, 48) == ()


def test_draft_layer_checkpoint_round_trip(model, tmp_path, prompts):
    from clp_jax.drafting.checkpoint import export_heads, load_heads, save_heads

    heads = draft_heads(model, vocab=np.arange(0, 128, 3))
    save_heads(str(tmp_path / "h"), heads, model.cfg)
    back = load_heads(str(tmp_path / "h"), model.cfg)
    assert back.cfg == heads.cfg and back.cfg.kind == "draft_layer"
    dc = DecodeConfig(mode="clp", k=3, max_new_tokens=8)
    assert Decoder(model, back, dc).generate(prompts).tokens == Decoder(model, heads, dc).generate(prompts).tokens
    small = export_heads(str(tmp_path / "h"), str(tmp_path / "bf16"))
    assert small.drafter.fuse[...].dtype == jnp.bfloat16
