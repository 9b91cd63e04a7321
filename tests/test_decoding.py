"""The while_loop decoder on tiny models: every mode against `ar`, batches, stopping, compiles, errors."""

import numpy as np
import pytest

import jax.numpy as jnp

from clp_jax.decode.decoder import Decoder, DecodeConfig
from clp_jax.model.kv_cache import init_cache
from clp_jax.decode.sampling import SamplingConfig

from helpers import (CPU_COSTS, OracleHeads, forced_length_heads, random_heads, reference_table, tiny_config, zero_heads)

NEW = 24


@pytest.fixture(scope="module")
def ar_tokens(model, prompts):
    return Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=NEW)).generate(prompts).tokens


def test_ar_matches_transformers_generate(tiny_hf):
    torch = pytest.importorskip("torch")
    from clp_jax.weights.convert import convert_hf_dir

    hf_model, path = tiny_hf
    model = convert_hf_dir(path)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 128, n).tolist() for n in (4, 13)]
    out = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=16)).generate(prompts)
    for p, toks in zip(prompts, out.tokens):
        ref = hf_model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert toks == ref


def test_ar_is_one_token_per_pass(model, prompts, ar_tokens):
    out = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=NEW)).generate(prompts)
    assert out.tokens == ar_tokens and out.tokens_per_pass == 1.0
    assert all(len(t) == NEW for t in out.tokens)


def test_ar_records_hidden_states_and_soft_labels(model, prompts, ar_tokens):
    """Self-distillation records: each position's trunk state equals a teacher-forced pass over the same
    tokens (bf16 rounding), and the soft labels' top-1 at every generated anchor is the generated token."""
    dc = DecodeConfig(mode="ar", max_new_tokens=NEW, record_hidden=True, record_topk=4)
    out = Decoder(model, None, dc).generate(prompts)
    assert out.tokens == ar_tokens
    for p, toks, hidden, ids, probs in zip(prompts, out.tokens, out.hidden, out.topk_ids, out.topk_probs):
        seq = p + toks
        L = len(seq)
        assert hidden.shape == (L, model.cfg.hidden_size) and ids.shape == probs.shape == (L, 4)
        full, _ = model(jnp.asarray([seq]), jnp.arange(L)[None])
        # the last token was never fed (nothing followed it): L-1 states
        np.testing.assert_allclose(np.asarray(hidden[:L - 1], np.float32), np.asarray(full[0, :L - 1]),
                                   rtol=1e-2, atol=1e-2)
        anchors = np.arange(len(p) - 1, L - 1)
        assert ids[anchors, 0].tolist() == [seq[a + 1] for a in anchors]
        assert np.all(np.diff(probs[anchors], axis=1) <= 0) and np.all(probs[anchors].sum(1) <= 1 + 1e-5)
    with pytest.raises(ValueError, match="for 'ar'"):
        DecodeConfig(mode="verify", record_hidden=True)


def _oracle(model, prompts, ar_tokens, k, length=None):
    rows = 1 << (len(prompts) - 1).bit_length()  # the decoder's batch bucket
    table = reference_table(prompts, ar_tokens, rows=rows, width=64 + NEW)
    return OracleHeads(model.cfg, k, table, length)


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["zero", "random", "oracle"])
def test_verify_equals_ar(model, prompts, ar_tokens, kind, batch, adaptive):
    k = 3
    heads = {"zero": lambda: zero_heads(model.cfg, k), "random": lambda: random_heads(model.cfg, k),
             "oracle": lambda: _oracle(model, prompts, ar_tokens, k)}[kind]()
    if kind == "oracle" and batch == 1:  # the table's row 0 must be the decoded prompt
        heads = _oracle(model, prompts[1:2], ar_tokens[1:2], k)
    rows = prompts if batch == 3 else prompts[1:2]
    want = ar_tokens if batch == 3 else ar_tokens[1:2]
    dc = DecodeConfig(mode="verify", k=k, max_new_tokens=NEW, adaptive_width=adaptive,
                      draft_source="heads" if kind == "oracle" else "both")
    out = Decoder(model, heads, dc, costs=CPU_COSTS if kind == "oracle" else None).generate(rows)
    assert out.tokens == want
    if kind == "oracle":
        assert out.tokens_per_pass > 3.0  # k+1 = 4 per pass but for the prefill and the budget's tail
        # every draft is right; only the budget can cut the last step short (once per row)
        assert np.all(out.offered.sum(0) - out.accepted.sum(0) <= len(rows))


@pytest.mark.parametrize("source", ["lookup", "both"])
def test_verify_with_drafts_from_the_context_equals_ar(model, source):
    """Prompt lookup: the continuation of the latest earlier n-gram, verified like the drafter's (here on
    repetitive prompts, so it finds matches)."""
    rng = np.random.RandomState(3)
    rows = [(rng.randint(0, 128, n).tolist() * 3) for n in (4, 7, 5)]
    want = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=NEW)).generate(rows).tokens
    dc = DecodeConfig(mode="verify", k=3, max_new_tokens=NEW, draft_source=source)
    out = Decoder(model, random_heads(model.cfg, 3), dc).generate(rows)
    assert out.tokens == want
    assert out.source[:, 1].sum() > 0 and out.accepted.sum() > 0
    if source == "lookup":
        assert out.source[:, 0].sum() == 0 and out.draft_steps.sum() == 0  # the drafter never runs


def test_lookup_proposes_the_latest_continuation():
    from clp_jax.decode.lookup import propose

    buf = jnp.asarray([[1, 2, 3, 9, 8, 1, 2, 3, 0, 0], [5, 6, 7, 5, 6, 0, 0, 0, 0, 0], [1, 2, 3, 4, 0, 0, 0, 0, 0, 0],
                       [4, 4, 4, 4, 0, 0, 0, 0, 0, 0]])
    lk = propose(buf, jnp.asarray([8, 5, 4, 4]), 3)
    assert lk.tokens.tolist() == [[9, 8, 1], [7, 5, 6], [0, 0, 0], [4, 0, 0]]
    assert lk.count.tolist() == [3, 3, 0, 1] and lk.ngram.tolist() == [3, 2, 0, 3]


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_clp_with_length_zero_equals_ar(model, prompts, ar_tokens, adaptive):
    heads = forced_length_heads(model.cfg, 3, length=0)
    dc = DecodeConfig(mode="clp", k=3, max_new_tokens=NEW, adaptive_width=adaptive)
    out = Decoder(model, heads, dc).generate(prompts)
    assert out.tokens == ar_tokens and out.tokens_per_pass == 1.0


def test_adaptive_verify_with_clp_chosen_drafts(model, prompts, ar_tokens):
    """verify feeding only the CLP's number of drafts (here 1) through a narrower chunk stays lossless."""
    heads = forced_length_heads(model.cfg, 3, length=1)
    dc = DecodeConfig(mode="verify", k=3, max_new_tokens=NEW, draft_budget="clp", draft_source="heads",
                      adaptive_width=True)
    out = Decoder(model, heads, dc).generate(prompts)
    assert out.tokens == ar_tokens and out.offered[:, 1:].sum() == 0


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_clp_with_oracle_equals_ar_in_fewer_passes(model, prompts, ar_tokens, adaptive):
    heads = _oracle(model, prompts, ar_tokens, 3)
    dc = DecodeConfig(mode="clp", k=3, max_new_tokens=NEW, adaptive_width=adaptive)
    out = Decoder(model, heads, dc).generate(prompts)
    assert out.tokens == ar_tokens
    assert out.passes.max() <= -(-NEW // 4) and out.tokens_per_pass > 3.5


def test_clp_confidence_margin(model, prompts, ar_tokens):
    """With a margin, clp accepts l heads only while P(L* >= l) >= p: a sure CLP still accepts all, a
    CLP torn between lengths accepts the prefix most of its mass supports, p=1 accepts nothing."""
    sure = forced_length_heads(model.cfg, 3, 3)  # P(L*=3) ~ 1
    out = Decoder(model, sure, DecodeConfig(mode="clp", k=3, max_new_tokens=NEW, clp_confidence=0.9)).generate(prompts)
    assert out.tokens_per_pass > 3.5
    torn = forced_length_heads(model.cfg, 3, 3)
    torn.clp.linear.bias[...] = jnp.log(jnp.asarray([0.3, 0.1, 0.25, 0.35]))  # argmax 3; P(L*>=2) = 0.6
    for p, expected in ((0.5, 2), (0.65, 1), (1.0, 0)):
        dc = DecodeConfig(mode="clp", k=3, max_new_tokens=NEW, clp_confidence=p)
        res = Decoder(model, torn, dc).generate(prompts)
        assert res.accepted[:, expected:].sum() == 0 and (expected == 0 or res.accepted[:, expected - 1].sum() > 0)
        if expected == 0:
            assert res.tokens == ar_tokens
    with pytest.raises(ValueError, match="clp_confidence"):
        DecodeConfig(mode="clp", clp_confidence=0.0)


def test_clp_with_wrong_drafts_differs_from_ar(model, prompts, ar_tokens):
    """Unverified acceptance is not lossless: random heads accepted blindly change the text."""
    heads = random_heads(model.cfg, 3)
    heads.clp.linear.bias[...] = jnp.zeros((4,)).at[3].set(100.0)
    out = Decoder(model, heads, DecodeConfig(mode="clp", k=3, max_new_tokens=NEW)).generate(prompts)
    assert out.tokens != ar_tokens and out.tokens_per_pass > 3.0


@pytest.mark.parametrize("mode", ["clp", "gate", "verify"])
def test_drafts_come_from_the_draft_vocabulary(model, prompts, ar_tokens, mode):
    """Heads with a draft vocabulary only ever propose its ids, verify stays exact, and a vocabulary
    of every id drafts exactly like none."""
    heads = random_heads(model.cfg, 3)
    heads.clp.linear.bias[...] = jnp.zeros((4,)).at[3].set(100.0)  # clp: accept every draft
    heads.gate.fc2.bias[...] = jnp.full((3,), 100.0)  # gate: every token comes from a gate head
    vocab = np.arange(0, 128, 3)  # every third id
    dc = DecodeConfig(mode=mode, k=3, max_new_tokens=NEW)
    out = Decoder(model, heads.with_draft_vocab(vocab), dc).generate(prompts)
    for row in out.tokens:
        drafts = {"clp": [t for i, t in enumerate(row) if i % 4], "gate": row, "verify": []}[mode]
        assert set(drafts) <= set(vocab.tolist())
    if mode == "verify":
        assert out.tokens == ar_tokens
        sampled = DecodeConfig(mode=mode, k=3, max_new_tokens=NEW, sampling=SamplingConfig(temperature=1.0))
        st = Decoder(model, heads.with_draft_vocab(vocab), sampled).start(prompts)
        length, buf = np.asarray(st.length), np.asarray(st.buf)
        pending = [buf[b, length[b]:length[b] + 3] for b in range(len(prompts))]
        assert set(np.concatenate(pending).tolist()) <= set(vocab.tolist())
    every = Decoder(model, heads.with_draft_vocab(np.arange(128)), dc).generate(prompts).tokens
    assert every == Decoder(model, heads, dc).generate(prompts).tokens


def test_confadapt_threshold(model, prompts, ar_tokens):
    oracle = _oracle(model, prompts, ar_tokens, 3)  # one-hot drafts: confidence 1.0
    out = Decoder(model, oracle, DecodeConfig(mode="confadapt", k=3, tau=0.9, max_new_tokens=NEW)).generate(prompts)
    assert out.tokens == ar_tokens and out.tokens_per_pass > 3.5
    zero = zero_heads(model.cfg, 3)  # spread-out drafts never reach tau=1
    out = Decoder(model, zero, DecodeConfig(mode="confadapt", k=3, tau=1.0, max_new_tokens=NEW)).generate(prompts)
    assert out.tokens == ar_tokens and out.tokens_per_pass == 1.0


def test_gate_rejecting_everything_equals_ar(model, prompts, ar_tokens):
    heads = random_heads(model.cfg, 3)
    heads.gate.fc2.bias[...] = jnp.full((3,), -100.0)
    out = Decoder(model, heads, DecodeConfig(mode="gate", k=3, max_new_tokens=NEW)).generate(prompts)
    assert out.tokens == ar_tokens
    heads.gate.fc2.bias[...] = jnp.full((3,), 100.0)  # accept all: head 1 replaces the backbone
    out = Decoder(model, heads, DecodeConfig(mode="gate", k=3, max_new_tokens=NEW)).generate(prompts)
    assert out.tokens != ar_tokens and out.tokens_per_pass > 2.5


def test_cached_decoding_equals_full_forward(model):
    """Prefill then ragged chunks through the cache give the logits of one cache-free pass."""
    rng = np.random.RandomState(1)
    tokens = jnp.asarray(rng.randint(0, 128, (2, 20)))
    full_hidden, _ = model(tokens, jnp.broadcast_to(jnp.arange(20), (2, 20)))
    cache = init_cache(model.cfg, 2, 32)
    got = []
    for start, stop in [(0, 7), (7, 8), (8, 13), (13, 20)]:
        pos = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
        h, cache = model(tokens[:, start:stop], pos, cache)
        got.append(h)
    np.testing.assert_allclose(np.asarray(model.logits(jnp.concatenate(got, 1))),
                               np.asarray(model.logits(full_hidden)), atol=1e-4)


def test_chunk_past_the_cache_end_is_dropped(model):
    """Writes beyond the cache are dropped, never clamped onto the last slots."""
    cache = init_cache(model.cfg, 1, 8)
    tokens = jnp.asarray([[1, 2, 3, 4]])
    _, cache = model(tokens, jnp.asarray([[0, 1, 2, 3]]), cache)
    before = np.asarray(cache[0].k)
    _, cache = model(tokens, jnp.asarray([[8, 9, 10, 11]]), cache)  # entirely out of range
    np.testing.assert_array_equal(np.asarray(cache[0].k), before)
    _, cache = model(tokens[:, :1], jnp.asarray([[8]]), cache)  # one entry (written as two), out of range
    np.testing.assert_array_equal(np.asarray(cache[0].k), before)
    _, cache = model(tokens[:, :1], jnp.asarray([[5]]), cache)  # one entry in range: only its slot changes
    after = np.asarray(cache[0].k)
    np.testing.assert_array_equal(np.delete(after, 5, axis=-1), np.delete(before, 5, axis=-1))
    assert not np.array_equal(after[..., 5], before[..., 5])


def test_the_ar_loop_copies_no_cache_at_batch_one(model):
    """A one-entry cache write stays a scatter: as a dynamic-update-slice, XLA:CPU copied every layer's cache
    in every pass of the batch-1 `ar` loop (7 of 75 ms on the demo backbone)."""
    import re

    dec = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=4))
    dec.generate([[1, 2, 3]])
    (program,) = dec.programs("run")
    K, H, S = model.cfg.num_kv_heads, model.cfg.head_dim, dec.capacity_for([[1, 2, 3]])
    cache_shapes = {f"f32[1,{K},{H},{S}]", f"f32[1,{K},{S},{H}]"}  # keys [B, K, H, S], values [B, K, S, H]
    copied = [m[1] for m in re.finditer(r"= (\S+?)\{[^}]*\} copy\(", program.as_text())]
    assert copied and not cache_shapes & set(copied), sorted(set(copied))


def test_eos_stops_each_row(model, prompts, ar_tokens):
    eos = ar_tokens[0][4]
    for mode, heads in [("ar", None), ("verify", _oracle(model, prompts, ar_tokens, 3)),
                        ("clp", _oracle(model, prompts, ar_tokens, 3))]:
        out = Decoder(model, heads, DecodeConfig(mode=mode, k=3, max_new_tokens=NEW),
                      eos_ids=[eos]).generate(prompts)
        for toks, ref in zip(out.tokens, ar_tokens):
            want = ref[:ref.index(eos) + 1] if eos in ref else ref
            assert toks == want, mode


def test_budget_is_exact(model, prompts, ar_tokens):
    heads = _oracle(model, prompts, ar_tokens, 3)
    for n in (1, 2, 5, 7):
        out = Decoder(model, heads, DecodeConfig(mode="verify", k=3, max_new_tokens=n)).generate(prompts)
        assert out.tokens == [t[:n] for t in ar_tokens]


def test_no_recompilation_within_a_bucket(model):
    dec = Decoder(model, zero_heads(model.cfg, 2), DecodeConfig(mode="verify", k=2, max_new_tokens=6))
    dec.generate([[1, 2, 3, 4, 5]])
    assert dec.num_compiles == 2  # prefill + loop
    dec.generate([[9, 8, 7, 6, 5, 4, 3, 2, 1]], seed=4)  # same prompt bucket (16), same batch bucket
    assert dec.num_compiles == 2
    dec.generate([[1, 2], [3, 4, 5]])  # batch bucket 2
    dec.generate([[1, 2], [3, 4, 5], [6]])  # batch bucket 4
    dec.generate([[1, 2], [3, 4, 5], [6], [7]])  # still bucket 4
    assert dec.num_compiles == 6
    dec.generate([list(range(20))])  # prompt bucket 32: a new prefill; the cache size rounds to
    assert dec.num_compiles == 7  # the same multiple of 64, so the loop program is reused


def test_streaming_yields_growing_prefixes(model, prompts, ar_tokens):
    dec = Decoder(model, _oracle(model, prompts, ar_tokens, 3), DecodeConfig(mode="verify", k=3, max_new_tokens=NEW))
    seen = [toks for toks, _ in dec.stream(prompts, steps_per_call=2)]
    assert seen[-1] == ar_tokens and len(seen) > 2
    for a, b in zip(seen, seen[1:]):
        assert all(y[:len(x)] == x for x, y in zip(a, b))


def test_sampling_is_deterministic_per_seed(model, prompts):
    dc = DecodeConfig(mode="ar", max_new_tokens=12, sampling=SamplingConfig(temperature=1.0, top_p=0.9))
    dec = Decoder(model, None, dc)
    a, b, c = (dec.generate(prompts, seed=s).tokens for s in (0, 0, 1))
    assert a == b and a != c


def test_errors_before_compilation(model):
    heads = zero_heads(model.cfg, 2)
    with pytest.raises(ValueError, match="Unknown mode"):
        DecodeConfig(mode="fast")
    with pytest.raises(ValueError, match="larger than the 2 heads"):
        Decoder(model, heads, DecodeConfig(mode="verify", k=3))
    with pytest.raises(ValueError, match="needs MTP heads"):
        Decoder(model, None, DecodeConfig(mode="clp"))
    other = zero_heads(tiny_config(hidden_size=32, head_dim=8), 2)
    with pytest.raises(ValueError, match="another backbone"):
        Decoder(model, other, DecodeConfig(mode="verify", k=2))
    dec = Decoder(model, heads, DecodeConfig(mode="verify", k=2, max_new_tokens=8, max_cache_len=64))
    with pytest.raises(ValueError, match="more than the cache holds"):
        dec.start([list(range(60))])
    with pytest.raises(ValueError, match="exceeds the cache"):
        dec.start([list(range(55))])
    assert dec.num_compiles == 0


def test_compare_prints_the_median_of_interleaved_runs_and_says_why_when_slower(model, prompts):
    """decode.py --compare: every run's output is checked against ar, the speedup is the median of the
    interleaved runs with its spread, and a mode slower than ar gets a one-line reason."""
    import io

    from clp_jax.cli import report

    class Tok:
        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    dc = DecodeConfig(mode="verify", k=2, max_new_tokens=8, draft_budget="fixed")
    dec = Decoder(model, zero_heads(model.cfg, 2), dc, costs=CPU_COSTS)
    ar = Decoder(model, None, dc.replace(mode="ar"))
    out = io.StringIO()
    assert report.compare(dec, ar, [prompts[:2]], Tok(), repeats=3, out=out) == 0
    text = out.getvalue()
    assert "median of 3 interleaved runs" in text and "spread" in text
    assert "exact match 1.00 (2/2 prompts identical to ar in every run)" in text
    res = [dec.generate(prompts[:2])]
    line = report.why_slower("verify", res, CPU_COSTS)
    assert line.startswith("why slower: verify committed") and "first draft right 0.00" in line
    assert "one-slot passes per token" in line
