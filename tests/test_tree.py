"""Draft trees in `verify`: the tree pass's masks, and tree verify == chain verify == ar (greedy), the law kept
(sampling)."""

import jax.numpy as jnp
import numpy as np
import pytest

from clp_jax.decode.decoder import Decoder, DecodeConfig
from clp_jax.decode.sampling import SamplingConfig
from clp_jax.decode.tree import tree_pass
from clp_jax.drafting.heads import Drafts
from clp_jax.model.kv_cache import KVEntries, chain, init_cache

from helpers import CPU_COSTS, OracleHeads, reference_table
from test_draft_layer import draft_heads

NEW = 24


class RunnerUpHeads(OracleHeads):
    """Drafts a wrong token first and the backbone's own token as the runner-up, at every depth."""

    def draft(self, backbone, hidden, next_tokens, positions, anchor, k, cache, pick, kernel=None):
        d = super().draft(backbone, hidden, next_tokens, positions, anchor, k, cache, pick, kernel)
        right = jnp.argmax(d.logits, -1)
        wrong = (right + 1) % self.cfg.vocab_size
        eye = jnp.eye(self.cfg.vocab_size)
        logits = 30.0 * eye[wrong] + 29.0 * eye[right]
        return Drafts(logits, jnp.stack([pick(j, logits[:, j]) for j in range(k)], 1), d.length_logits, cache)


def _pass(model, prompt, chunk, positions, tree=None):
    """Prefill `prompt`, then feed `chunk` at `positions` (with the tree's masks): hidden [T, D], cache."""
    P = len(prompt)
    cache = init_cache(model.cfg, 1, 32)
    _, cache = model(jnp.asarray([prompt]), jnp.arange(P)[None], cache)
    hidden, cache = model(jnp.asarray([chunk]), jnp.asarray(positions)[None], cache, tree=tree)
    return np.asarray(hidden[0]), cache


def test_a_pass_that_reads_the_cache_then_writes_equals_the_pass_that_writes(model):
    """The width switch's pass (decode/decoder.py): attention over the committed cache plus the chunk's own keys
    (`kv_cache.chain`), the cache only read, the returned entries written after, gives the in-place pass's hidden
    states and cache; write=False without a tree is refused."""
    prompt, chunk = [5, 9, 14, 2, 7, 30], [11, 40, 41]
    want, want_cache = _pass(model, prompt, chunk, [6, 7, 8])
    cache = init_cache(model.cfg, 1, 32)
    _, cache = model(jnp.asarray([prompt]), jnp.arange(6)[None], cache)
    positions = jnp.asarray([[6, 7, 8]])
    hidden, entries = model(jnp.asarray([chunk]), positions, cache, tree=chain(jnp.asarray([6]), 3), write=False)
    assert all(isinstance(e, KVEntries) and e.k.shape == (1, 3, model.cfg.num_kv_heads, model.cfg.head_dim)
               for e in entries)
    np.testing.assert_allclose(np.asarray(hidden[0]), want, atol=2e-5)
    for layer, e, ref in zip(cache, entries, want_cache):
        written = layer.write(positions, e.k, e.v)
        np.testing.assert_allclose(np.asarray(written.k), np.asarray(ref.k), atol=2e-5)
        np.testing.assert_allclose(np.asarray(written.v), np.asarray(ref.v), atol=2e-5)
    with pytest.raises(ValueError, match="write=False"):
        model(jnp.asarray([chunk]), positions, cache, write=False)


@pytest.mark.parametrize("siblings", [1, 2])
def test_a_sibling_sees_its_own_path_and_writes_nothing(model, siblings):
    """[bonus d1 d2 | s1 (s2)]: the chain slots come out as a chain pass gives them, each sibling as the chain
    with it in its depth's place, and the cache holds the chain's entries alone (2 siblings: 5 slots, padded)."""
    prompt, bonus, d1, d2, s1, s2 = [5, 9, 14, 2, 7, 30], 11, 40, 41, 50, 51
    chunk = [bonus, d1, d2, s1, s2][:3 + siblings]
    fed, length = jnp.asarray([6]), jnp.asarray([7])
    positions, tree = tree_pass(fed, length, jnp.asarray([2]), jnp.asarray([siblings]), len(chunk))
    assert positions[0].tolist() == [6, 7, 8, 7, 8][:3 + siblings]
    got, cache = _pass(model, prompt, chunk, positions[0], tree)
    chain, chain_cache = _pass(model, prompt, [bonus, d1, d2], [6, 7, 8])
    np.testing.assert_allclose(got[:3], chain, atol=2e-5)
    first, _ = _pass(model, prompt, [bonus, s1], [6, 7])
    np.testing.assert_allclose(got[3], first[1], atol=2e-5)
    if siblings == 2:
        second, _ = _pass(model, prompt, [bonus, d1, s2], [6, 7, 8])
        np.testing.assert_allclose(got[4], second[2], atol=2e-5)
    for layer, ref in zip(cache, chain_cache):
        np.testing.assert_allclose(np.asarray(layer.k[0, ..., :9]), np.asarray(ref.k[0, ..., :9]), atol=2e-5)
        np.testing.assert_allclose(np.asarray(layer.v[0, :, :9]), np.asarray(ref.v[0, :, :9]), atol=2e-5)


@pytest.mark.parametrize("budget", ["fixed", "auto"])
def test_tree_verify_equals_chain_verify_equals_ar(model, prompts, budget):
    ar = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=NEW)).generate(prompts)
    heads = draft_heads(model, k=3, scale=0.05)
    dc = DecodeConfig(mode="verify", k=3, max_new_tokens=NEW, draft_budget=budget, draft_source="heads")
    chain = Decoder(model, heads, dc, costs=CPU_COSTS).generate(prompts)
    tree = Decoder(model, heads, dc.replace(tree=2), costs=CPU_COSTS).generate(prompts)
    assert chain.tokens == ar.tokens and tree.tokens == ar.tokens
    if budget == "fixed":
        assert tree.tree[:, 0].sum() > 0  # siblings were fed


def test_the_runner_up_is_committed_where_the_chain_misses(model, prompts):
    """Drafts whose first choice is always wrong and whose second is right: the chain commits one token per
    pass, the tree two (the sibling and the backbone's token after it), both exactly ar's."""
    ar = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=NEW)).generate(prompts[:1])
    table = reference_table(prompts[:1], ar.tokens, rows=1, width=64 + NEW)
    heads = RunnerUpHeads(model.cfg, 3, table)
    dc = DecodeConfig(mode="verify", k=3, max_new_tokens=NEW, draft_budget="fixed", draft_source="heads")
    chain = Decoder(model, heads, dc).generate(prompts[:1])
    tree = Decoder(model, heads, dc.replace(tree=1)).generate(prompts[:1])
    assert chain.tokens == ar.tokens and tree.tokens == ar.tokens
    assert chain.accepted.sum() == 0 and chain.tokens_per_pass < 1.1
    fed, ok = tree.tree[0]
    assert ok == fed > NEW // 3  # every sibling fed was right
    assert tree.tokens_per_pass > 1.7 and tree.accepted.sum() == 0  # the chain's drafts: still never


def test_tree_verify_sampling_keeps_the_law():
    """Tokens 2-3 from one tree pass: the sibling tested against what the rejected draft leaves keeps ar's
    law (TV to the exact distribution within sampling noise)."""
    from test_sampling import N, _exact_distribution, _samples, _tv, COSTS  # noqa: F401
    from helpers import random_heads, scaled_random_model, tiny_config

    cfg = tiny_config(vocab_size=8)
    model = scaled_random_model(cfg, seed=5, logit_scale=2.0)
    heads = random_heads(cfg, 2, seed=2, scale=0.1)
    sc = SamplingConfig(temperature=1.0)
    prompt = [1, 5, 2, 7]
    exact = _exact_distribution(model, prompt, sc, 3)
    tv_ar = _tv(_samples(model, None, "ar", sc, prompt)[0], exact)
    dc = DecodeConfig(mode="verify", k=2, max_new_tokens=3, sampling=sc, draft_budget="fixed", draft_source="heads",
                      tree=2)
    out = Decoder(model, heads, dc, costs=COSTS).generate([prompt] * N)
    fed, ok = out.tree.sum(0)
    assert fed > N // 2 and 0.05 * fed < ok < 0.95 * fed  # siblings were tested and both outcomes occurred
    tv_tree = _tv([tuple(t) for t in out.tokens], exact)
    print(f"TV to the exact law: ar {tv_ar:.3f}, tree verify {tv_tree:.3f}; siblings fed {fed}, accepted {ok}")
    assert tv_tree < 1.5 * tv_ar


def test_bad_tree_settings_fail_early():
    with pytest.raises(ValueError, match="verify"):
        DecodeConfig(mode="ar", tree=1)
    with pytest.raises(ValueError, match="0..k"):
        DecodeConfig(mode="verify", k=2, tree=3)
    with pytest.raises(ValueError, match="runners-up"):
        DecodeConfig(mode="verify", k=2, tree=1, draft_source="lookup")
