"""The drafter scored at every position of a decoded text (clp_jax/bench/drafts.py)."""

import numpy as np
import pytest
from helpers import zero_heads

from clp_jax.bench import drafts
from clp_jax.decode.decoder import DecodeConfig, Decoder


def test_agreement_counts_every_position_and_walks_the_chain_anchors():
    """Hand-made outcomes of one 6-token text at k=2: draft 2 counts only where draft 1 was right, and the
    chain anchors step over what a pass accepts (anchor 0 accepts 2, anchor 3 accepts 0, anchor 4 accepts 1)."""
    ok = np.array([[1, 1], [0, 1], [1, 0], [0, 0], [1, 0], [1, 0]], bool)
    scored = np.array([[1, 1], [1, 1], [1, 1], [1, 1], [1, 1], [1, 0]], bool)
    out = drafts.agreement([(ok & scored, scored)], 2)
    assert out["every_position"] == pytest.approx([4 / 6, 1 / 3], abs=1e-4)  # draft 2 at anchors 0, 2, 4
    assert out["positions"] == 6
    assert out["chain_anchors"] == 3  # passes anchored at 0, 3, 4; the next (6) is past the text
    assert out["chain_accepted"] == pytest.approx([2 / 3, 1 / 3], abs=1e-4)


def test_the_chain_anchors_reproduce_the_decoders_acceptance(model, prompts):
    """A plain k-chain `verify` (every pass feeds k drafts, no siblings) accepts exactly what the teacher-forced
    walk over `ar`'s output says, pass for pass: the decoder drafts what the training-time unroll drafts.
    Zero heads draft the next token again, which is right inside the tiny model's repeats."""
    k, n = 3, 40
    heads = zero_heads(model.cfg, k, gate=False)
    ar = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=n), ()).generate(prompts)
    ver = Decoder(model, heads, DecodeConfig(mode="verify", k=k, max_new_tokens=n, draft_budget="fixed",
                                             draft_source="heads"), ()).generate(prompts)
    assert ver.tokens == ar.tokens
    out = drafts.agreement([drafts.chain_outcomes(model, heads, p, t, k) for p, t in zip(prompts, ar.tokens)], k)
    assert out["positions"] == sum(len(t) - 1 for t in ar.tokens)
    assert out["chain_anchors"] == ver.offered[:, 0].sum()
    accepted = np.round(np.asarray(out["chain_accepted"]) * out["chain_anchors"]).astype(int)
    assert accepted.tolist() == ver.accepted.sum(0).tolist()
    assert accepted[0] >= 5  # the test sees drafts accepted, not only misses
    assert out["every_position"][0] > out["chain_accepted"][0]  # a miss anchors the next pass at a hard spot
