"""Continuous batching: rows refilled with new prompts decode exactly what each prompt decodes alone."""

import numpy as np
import pytest

from clp_jax.decode import batching
from clp_jax.decode.decoder import DecodeConfig, Decoder, prompt_bucket

NEW = 12


@pytest.fixture(scope="module")
def many_prompts():
    rng = np.random.RandomState(11)
    return [rng.randint(0, 128, n).tolist() for n in (5, 11, 3, 17, 8, 2, 70, 6, 9)]


@pytest.fixture(scope="module")
def alone(model, many_prompts):
    """Each prompt decoded alone (batch 1), with an EOS that ends some rows early."""
    probe = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=NEW)).generate(many_prompts[:3])
    eos = [probe.tokens[0][4], probe.tokens[1][7]]  # tokens the backbone emits mid-way
    dc = DecodeConfig(mode="ar", max_new_tokens=NEW, record_hidden=True, record_topk=3)
    dec = Decoder(model, None, dc, eos_ids=eos)
    return dec, eos, [dec.generate([p]) for p in many_prompts]


@pytest.mark.parametrize("batch_size,refill_rows", [(2, 1), (4, 2)])
def test_refilled_rows_decode_what_each_prompt_decodes_alone(model, many_prompts, alone, batch_size, refill_rows):
    dec, eos, ref = alone
    lengths = {len(r.tokens[0]) for r in ref}
    assert len(lengths) > 1, "the EOS should end rows at different steps"
    stats = batching.StreamStats()
    out = list(batching.stream(dec, many_prompts, batch_size, chunk_steps=3, refill_rows=refill_rows, stats=stats))
    assert sorted(f.index for f in out) == list(range(len(many_prompts)))
    assert stats.refills >= 2 and stats.tokens == sum(len(r.tokens[0]) for r in ref)
    assert 0 < stats.occupancy <= 1
    for f in out:
        r = ref[f.index]
        assert f.tokens == r.tokens[0]
        L = len(many_prompts[f.index]) + len(f.tokens)
        assert f.hidden.shape == (L, model.cfg.hidden_size) and f.topk_ids.shape == (L, 3)
        a, b = np.asarray(f.hidden[:L - 1], np.float32), np.asarray(r.hidden[0][:L - 1], np.float32)
        assert np.all(np.abs(a - b) <= np.abs(b) * 2.0 ** -7 + 1e-6)  # one bf16 step
        P = len(many_prompts[f.index])
        np.testing.assert_array_equal(f.topk_ids[P - 1:L - 1], r.topk_ids[0][P - 1:L - 1])
        np.testing.assert_allclose(f.topk_probs[P - 1:L - 1], r.topk_probs[0][P - 1:L - 1], atol=1e-5)


def test_a_refill_leaves_the_other_rows_alone(model, many_prompts):
    """Refilling row 0 mid-way does not change what row 1 goes on to decode, and a refill whose prompt does
    not fit the batch's cache fails before compiling."""
    dec = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=NEW))
    ref = dec.generate(many_prompts[:2]).tokens
    st = dec.start(many_prompts[:2])
    st = dec.advance(st, 4)
    st = dec.refill(st, [0], [many_prompts[2]])
    st = dec.advance(st, 1 << 20)
    assert dec.tokens_of(st, 2)[1] == ref[1]
    assert dec.tokens_of(st, 1)[0] == dec.generate([many_prompts[2]]).tokens[0]
    n = dec.num_compiles
    with pytest.raises(ValueError, match="does not fit"):
        dec.refill(dec.start(many_prompts[:2]), [0], [list(range(200))])
    assert dec.num_compiles == n


def test_prompt_buckets_round_long_prompts_to_multiples_of_64():
    assert [prompt_bucket(n) for n in (1, 16, 17, 33, 64, 65, 130, 192, 193)] == [16, 16, 32, 64, 64, 128, 192,
                                                                                   192, 256]
