"""Sampling: filters, and `verify`'s speculative sampling reproducing `ar`'s distribution."""

import itertools

import numpy as np
import pytest

import jax.numpy as jnp

from clp_jax.decode import decoder
from clp_jax.decode.decoder import Decoder, DecodeConfig
from clp_jax.decode.modes import make_mode
from clp_jax.decode.pass_costs import PassCosts
from clp_jax.decode.sampling import SamplingConfig, probs
from clp_jax.decode.verify import Verify

from helpers import random_heads, scaled_random_model, tiny_config

V = 8  # tiny vocabulary: exact joint distributions are cheap to enumerate
N = 4096  # samples (rows of one batch)


def test_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    np.testing.assert_allclose(probs(logits, SamplingConfig(temperature=1.0, top_k=2)), [[0.625, 0.375, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(probs(logits, SamplingConfig(temperature=1.0, top_p=0.7)), [[0.625, 0.375, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(probs(logits, SamplingConfig(temperature=1.0, top_p=0.5)), [[1, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(probs(logits, SamplingConfig(temperature=1.0)), np.exp(logits), atol=1e-6)
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


def _exact_distribution(model, prompt, sc, n_tokens):
    """P(t1..tn | prompt) for every sequence, from cache-free forward passes."""
    table = {}
    for seq in itertools.product(range(V), repeat=n_tokens - 1):
        toks = jnp.asarray([list(prompt) + list(seq)])
        hidden, _ = model(toks, jnp.arange(toks.shape[1])[None])
        table[seq] = np.asarray(probs(model.logits(hidden)[0], sc))  # [T, V]
    dist = {}
    for seq in itertools.product(range(V), repeat=n_tokens):
        p = 1.0
        for i, t in enumerate(seq):
            p *= table[seq[:n_tokens - 1]][len(prompt) - 1 + i, t]
        dist[seq] = p
    return dist


def _tv(samples, dist):
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    return 0.5 * sum(abs(counts.get(s, 0) / len(samples) - p) for s, p in dist.items())


@pytest.fixture(scope="module")
def setting():
    cfg = tiny_config(vocab_size=V)
    model = scaled_random_model(cfg, seed=5, logit_scale=2.0)
    heads = random_heads(cfg, 2, seed=2, scale=0.1)
    sc = SamplingConfig(temperature=1.0)
    prompt = [1, 5, 2, 7]
    return model, heads, sc, prompt, _exact_distribution(model, prompt, sc, 3)


# a budget that often feeds one draft of two, and sometimes none (wider passes cost more, drafting is cheap)
COSTS = PassCosts(width=(1.0, 1.3, 1.35), draft_first=(0.05,), draft_step=0.05)


def _samples(model, heads, mode, sc, prompt, seed=0, adaptive=None, budget="fixed", source="heads"):
    dc = DecodeConfig(mode=mode, k=2, max_new_tokens=3, sampling=sc, adaptive_width=adaptive, draft_budget=budget,
                      draft_source=source)
    out = Decoder(model, heads, dc, costs=COSTS).generate([prompt] * N, seed=seed)
    return [tuple(t) for t in out.tokens], out


def test_top_p_reads_the_nucleus_from_the_top_candidates_or_falls_back_to_a_full_sort():
    """The same threshold as a full sort of the vocabulary: peaked rows (the nucleus among the top
    NUCLEUS_CANDIDATES + 1), flat ones (the batch goes to the full sort), uniform rows of zero logits beside
    peaked ones (unused rows of `verify`), and top_p at the mass of exactly the top candidates."""
    import jax
    from clp_jax.decode.sampling import NUCLEUS_CANDIDATES, nucleus_cutoff

    def reference(p, top_p):  # the filter as it was: a full sort
        desc = -jnp.sort(-p, axis=-1)
        keep = (jnp.cumsum(desc, axis=-1) - desc) < top_p
        return jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)

    V = 4 * NUCLEUS_CANDIDATES
    peaked = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (3, 2, V)) * 6.0, -1)
    flat = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (3, 2, V)) * 0.1, -1)
    uniform = jnp.full((1, 2, V), 1.0 / V)
    for top_p in (0.5, 0.9, 0.95):
        assert bool(jnp.all(jax.lax.top_k(peaked, NUCLEUS_CANDIDATES)[0].sum(-1) >= top_p))  # the fast path
        assert bool(jnp.any(jax.lax.top_k(flat, NUCLEUS_CANDIDATES)[0].sum(-1) < top_p))  # the full sort
        for p in (peaked, flat, jnp.concatenate([peaked, flat[:1]]), jnp.concatenate([peaked, uniform])):
            np.testing.assert_array_equal(nucleus_cutoff(p, top_p), reference(p, top_p))
    desc = -jnp.sort(-flat[0, 0])
    for m in (NUCLEUS_CANDIDATES - 1, NUCLEUS_CANDIDATES, NUCLEUS_CANDIDATES + 1):  # the cut at the edge
        top_p = float(jnp.cumsum(desc)[m - 1])
        np.testing.assert_array_equal(nucleus_cutoff(flat, top_p), reference(flat, top_p))


def test_top_k_filter_compiles_without_a_sort_of_the_vocabulary():
    """XLA:CPU lowers top_k to a partial sort, but to a full sort of the row once its output is sliced
    (112 ms against 1 ms a step at [4, 151936]): the filter must not slice it."""
    import jax
    if jax.default_backend() != "cpu":
        pytest.skip("a fact of XLA:CPU's lowering")
    logits = jnp.zeros((4, 4096), jnp.float32)
    text = jax.jit(lambda x: probs(x, SamplingConfig(temperature=1.0, top_k=50))).lower(logits).compile().as_text()
    assert " sort(" not in text


def test_verify_sampling_matches_ar_distribution(setting):
    """Tokens 2 and 3 come from one verified step; a wrong acceptance rule shifts their law."""
    model, heads, sc, prompt, exact = setting
    ar, _ = _samples(model, None, "ar", sc, prompt)
    verify, out = _samples(model, heads, "verify", sc, prompt)
    narrow, _ = _samples(model, heads, "verify", sc, prompt, budget="auto")  # per-row drafts fed, narrow passes
    assert 0.1 < out.head_acceptance[0] < 0.9  # both accept and reject paths are exercised
    tv_ar, tv_verify = _tv(ar, exact), _tv(verify, exact)
    # An exact sampler's TV to the truth is sampling noise alone: ar measures it.
    assert tv_ar < 0.1
    assert tv_verify < 1.5 * tv_ar
    assert _tv(narrow, exact) < 1.5 * tv_ar
    # the control: the same drafts accepted without verification have another distribution
    blind = random_heads(model.cfg, 2, seed=2, scale=0.1)
    blind.clp.linear.bias[...] = jnp.zeros((3,)).at[2].set(100.0)
    unverified, _ = _samples(model, blind, "clp", SamplingConfig(temperature=1.0), prompt)
    tv_blind = _tv(unverified, exact)
    print(f"TV to the exact law: ar {tv_ar:.3f}, verify {tv_verify:.3f}, unverified {tv_blind:.3f}")
    assert tv_blind > 3 * tv_ar


class _PeekingVerify(Verify):
    """A wrong budget: feeds a draft only when the token drawn is its distribution's most likely one (the
    choice depends on the token itself, so speculative sampling's acceptance test no longer holds)."""

    def _how_many(self, ch, stats, active, *lookup):
        top = ch.tokens == jnp.argmax(ch.logits, -1)  # [B, k]
        return jnp.sum(jnp.cumprod(top & (jnp.arange(self.k)[None] < ch.steps[:, None]), 1), 1).astype(jnp.int32)


def test_verify_sampling_with_the_draft_layer_and_the_budget(setting, monkeypatch):
    """The draft layer's sampled drafts, fed as the budget chooses (per row, per pass), keep ar's law; two
    controls move it: the same drafts accepted unverified, and a budget that peeks at the drawn token."""
    from test_draft_layer import draft_heads

    model, _, sc, prompt, exact = setting
    heads = draft_heads(model, k=2, scale=0.3)
    ar, _ = _samples(model, None, "ar", sc, prompt)
    tv_ar = _tv(ar, exact)
    verify, out = _samples(model, heads, "verify", sc, prompt, budget="auto")
    fed = out.fed.sum(0)
    assert fed[1] > 0.05 * fed.sum() and fed[2] > 0.05 * fed.sum()  # rows stopped their chains at either draft
    assert 0.1 < out.head_acceptance[0] < 0.9
    tv_verify = _tv(verify, exact)
    blind = draft_heads(model, k=2, scale=0.3)
    blind.clp.linear.bias[...] = jnp.zeros((3,)).at[2].set(100.0)
    tv_blind = _tv(_samples(model, blind, "clp", sc, prompt)[0], exact)
    # drafts from the context are point masses (q = 1 at the retrieved token): on a prompt that repeats itself
    rep = [3, 1, 5, 3, 1, 5, 3, 1]
    exact_rep = _exact_distribution(model, rep, sc, 3)
    tv_ar_rep = _tv(_samples(model, None, "ar", sc, rep)[0], exact_rep)
    looked, out_lk = _samples(model, heads, "verify", sc, rep, budget="auto", source="lookup")
    assert out_lk.source[:, 1].sum() > N // 4 and 0.1 < out_lk.head_acceptance[0] < 0.9
    tv_both = _tv(looked, exact_rep)
    monkeypatch.setattr(decoder, "make_mode", lambda dc, costs=None: (
        _PeekingVerify(dc, costs) if dc.mode == "verify" else make_mode(dc, costs)))
    tv_peek = _tv(_samples(model, heads, "verify", sc, prompt, budget="auto")[0], exact)
    print(f"TV to the exact law: ar {tv_ar:.3f}, verify (draft layer, budget) {tv_verify:.3f}, with context "
          f"drafts {tv_both:.3f} (ar {tv_ar_rep:.3f} on that prompt), unverified {tv_blind:.3f}, peeking budget {tv_peek:.3f}; drafts fed per pass "
          f"{fed.tolist()}")
    assert tv_verify < 1.5 * tv_ar and tv_both < 1.5 * tv_ar_rep
    assert tv_blind > 3 * tv_ar
    assert tv_peek > 2 * tv_ar
