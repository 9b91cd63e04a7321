"""Teacher-forced feature caches: labels are the backbone's own greedy choices, sharded caches read as
one cache and resume at the first missing shard, and held-out counting skips self-distilled prompts."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from clp_jax.train import draft_fit, teacher_forced
from tests.test_draft_layer import draft_heads

T = 12


@pytest.fixture(scope="module")
def records(model):
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, model.cfg.vocab_size, size=(7, T)).astype(np.int32)
    lengths = np.array([T, T, 9, T, 5, T, 11], np.int32)
    return tokens, lengths


@pytest.fixture(scope="module")
def single(model, records, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tf") / "single")
    teacher_forced.build_cache(model, *records, out, batch_size=3, progress=False)
    return teacher_forced.load_cache(out)


def test_cache_holds_the_backbones_greedy_predictions(model, records, single):
    tokens, lengths = records
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)
    valid = pos < lengths[:, None]
    h, _ = model(jnp.asarray(tokens), pos, None, kv_valid=valid)
    y = np.asarray(jnp.argmax(model.logits(h), -1))
    valid = np.asarray(valid)
    np.testing.assert_array_equal(single["labels"][valid], y[valid])
    assert (single["labels"][~valid] == -1).all()  # padding is never a target
    np.testing.assert_allclose(np.asarray(single["hidden"], np.float32)[valid], np.asarray(h)[valid],
                               rtol=2e-2, atol=2e-2)  # stored in bf16
    np.testing.assert_array_equal(single["lengths"], lengths)


def test_sharded_cache_reads_as_one_and_resumes(model, records, single, tmp_path, monkeypatch):
    tokens, lengths = records
    out = str(tmp_path / "sharded")
    teacher_forced.build_sharded(model, tokens, lengths, out, shard_records=3, batch_size=2, progress=False)
    assert sorted(d for d in os.listdir(out) if d.startswith("records_")) == [
        "records_000000_000003", "records_000003_000006", "records_000006_000007"]
    sharded = teacher_forced.load_cache(out)
    for name in ("labels", "tokens", "lengths"):
        np.testing.assert_array_equal(sharded[name], single[name])
    assert sharded["hidden"].shape == single["hidden"].shape
    rows, starts = np.array([0, 4, 6, 3]), np.array([0, 2, 1, 5])
    a, b = (draft_fit.window_batch(c, rows, starts, 6) for c in (single, sharded))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(IndexError):
        sharded["hidden"][7, 0:2]

    # a killed job: the middle shard lost, a half-written one left behind; only the lost shard is rebuilt
    import shutil

    shutil.rmtree(os.path.join(out, "records_000003_000006"))
    os.makedirs(os.path.join(out, "records_000003_000006.partial"))
    built = []
    real = teacher_forced.build_cache
    monkeypatch.setattr(teacher_forced, "build_cache",
                        lambda m, t, ln, d, **kw: built.append(os.path.basename(d)) or real(m, t, ln, d, **kw))
    teacher_forced.build_sharded(model, tokens, lengths, out, shard_records=3, batch_size=2, progress=False)
    assert built == ["records_000003_000006"]
    np.testing.assert_array_equal(teacher_forced.load_cache(out)["labels"], single["labels"])


def test_held_out_counts_skip_prompts(model, records, single):
    tokens, lengths = records
    plens = np.array([4, 6, 3, 2, 1, 8, 5])
    masked = draft_fit.mask_prompts(single, plens)
    pos = np.arange(T)[None, :]
    assert (masked["labels"][pos < plens[:, None]] == -1).all()
    keep = pos >= plens[:, None]
    np.testing.assert_array_equal(masked["labels"][keep], np.asarray(single["labels"])[keep])

    heads = draft_heads(model, k=2)
    recs = np.arange(len(tokens))
    h_all, ok_all = draft_fit.chain_correct(heads, model, single, recs, batch_size=3)
    h_gen, ok_gen = draft_fit.chain_correct(heads, model, single, recs, batch_size=3, first_anchor=plens - 1)
    assert len(h_all) == int((lengths - 1).sum())  # anchors p with p+1 < length
    assert len(h_gen) == int(np.maximum(lengths - 1 - (plens - 1), 0).sum())
    # the counted anchors are the tail of each record's anchors, unchanged
    tails = []
    start = 0
    for L, P in zip(lengths, plens):
        tails.append(ok_all[start + P - 1:start + L - 1])
        start += L - 1
    np.testing.assert_array_equal(ok_gen, np.concatenate(tails))
