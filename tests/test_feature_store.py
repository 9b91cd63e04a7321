"""The feature store: recorded self-distillation equals a teacher-forced pass, shards resume, splits hold."""

import json
import logging
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from clp_jax.decode import batching
from clp_jax.decode.decoder import DecodeConfig, Decoder
from clp_jax.train import data, feature_store as fs


@pytest.fixture(scope="module")
def generate(model):
    dec = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=10, record_hidden=True, record_topk=4))
    return lambda prompts: batching.stream(dec, prompts, 2, refill_rows=1)


def _bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_recorded_states_equal_a_teacher_forced_pass(model, prompts, generate):
    """The hidden states the decoder records while generating are the trunk's states of the same tokens
    (up to fp32 noise, then both rounded to bf16); the labels are the generated tokens and the soft
    labels' top-1."""
    sd = fs.self_distilled(generate, prompts, 32, topk=4)
    tf = fs.teacher_forced(model, sd["tokens"], sd["lengths"], batch_size=3, topk=4)
    for i, p in enumerate(prompts):
        L, P = sd["lengths"][i], len(p)
        assert sd["prompt_lengths"][i] == P and L == P + 10
        a, b = np.asarray(sd["hidden"][i, :L - 1], np.float32), np.asarray(tf["hidden"][i, :L - 1], np.float32)
        ulp = np.abs(b) * 2.0 ** -7 + 1e-6  # one bf16 step
        assert np.all(np.abs(a - b) <= ulp), np.abs(a - b).max()
        gen = np.arange(P - 1, L - 1)  # anchors of generated tokens
        np.testing.assert_array_equal(sd["labels"][i, gen], sd["tokens"][i, gen + 1])
        np.testing.assert_array_equal(sd["labels"][i, gen], tf["labels"][i, gen])  # greedy: argmax of the pass
        assert np.all(sd["labels"][i, :P - 1] == -1) and np.all(sd["labels"][i, L - 1:] == -1)
        np.testing.assert_array_equal(sd["soft_ids"][i, gen, 0], sd["labels"][i, gen])
        np.testing.assert_allclose(sd["soft_probs"][i, gen], tf["soft_probs"][i, gen], atol=2e-3)


def test_plan_interleaves_kinds_and_reuses_complete_shards():
    plan = fs.plan_shards({"corpus": 8, "chat": 4}, 2, [])
    assert [s.name for s in plan][:3] == ["corpus_000000_000002", "chat_000000_000002", "corpus_000002_000004"]
    assert sum(s.stop - s.start for s in plan) == 12
    grown = fs.plan_shards({"corpus": 9, "chat": 4}, 4, ["corpus_000000_000002", "corpus_000002_000004"])
    assert [s.name for s in grown if s.kind == "corpus"] == ["corpus_000000_000002", "corpus_000002_000004",
                                                             "corpus_000004_000008", "corpus_000008_000009"]


def test_splits_are_fixed_by_record_id_and_growth_only_adds():
    ids = [f"chat:{i}" for i in range(4000)]
    names = [fs.split_of(r, 0.05, 0.1) for r in ids]
    share = {s: names.count(s) / len(ids) for s in ("heldout", "clp", "train")}
    assert abs(share["heldout"] - 0.05) < 0.015 and abs(share["clp"] - 0.1) < 0.02
    assert names[:1000] == [fs.split_of(r, 0.05, 0.1) for r in ids[:1000]]  # the same whatever the store size


def test_store_build_resumes_at_the_first_missing_shard(model, tmp_path):
    rng = np.random.RandomState(0)
    inputs = {"corpus": [rng.randint(0, 128, 24).tolist() for _ in range(5)],
              "chat": [rng.randint(0, 128, n).tolist() for n in (3, 6, 4, 9, 5)]}
    dc = data.DataConfig(seq_len=24, corpus_records=5, chat_prompts=5, code_prompts=0, chat_code_prompts=0,
                         max_prompt_len=12, new_tokens=6, soft_topk=2, shard_records=2)
    dec = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=6, record_hidden=True, record_topk=2))
    kw = dict(backbone=model, feature_batch_size=2, progress=False)
    stream = lambda: lambda p: batching.stream(dec, p, 2, refill_rows=1)  # noqa: E731

    def failing():  # the "machine" dies after the third finished record (shard 1 complete, shard 2 not)
        def gen(p):
            for i, row in enumerate(batching.stream(dec, p, 2, refill_rows=1)):
                if i == 3:
                    raise KeyboardInterrupt
                yield row
        return gen

    with pytest.raises(KeyboardInterrupt):
        data.build_store(dc, inputs, str(tmp_path / "a"), make_generator=failing, **kw)
    done = sorted(d for d in os.listdir(tmp_path / "a") if os.path.exists(tmp_path / "a" / d / fs.META))
    assert len(done) == 1 and done[0].startswith("chat_")  # generation runs first; a shard is whole or absent
    plan = data.build_store(dc, inputs, str(tmp_path / "a"), make_generator=stream, **kw)
    ref_plan = data.build_store(dc, inputs, str(tmp_path / "b"), make_generator=stream, **kw)
    assert plan == ref_plan and len(plan) == 6
    a, b = fs.FeatureStore(str(tmp_path / "a"), plan), fs.FeatureStore(str(tmp_path / "b"), plan)
    for name in ("tokens", "labels", "lengths", "prompt_lengths", "kinds"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for i in range(len(a)):
        np.testing.assert_array_equal(np.asarray(a.hidden[i], np.float32), np.asarray(b.hidden[i], np.float32))
    w = a.windows(np.array([0, 7]), np.array([0, 3]), 16, soft=True)
    assert w["hidden"].shape == (2, 16, model.cfg.hidden_size) and w["soft_ids"].shape == (2, 16, 2)
    changed = {**inputs, "chat": [[1, 2, 3]] + inputs["chat"][1:]}
    with pytest.raises(ValueError, match="other inputs"):
        data.build_store(dc, changed, str(tmp_path / "a"), make_generator=stream, **kw)


def test_a_lost_store_is_rebuilt_from_kept_continuations(model, tmp_path, caplog):
    """Generated shards keep their tokens in run.continuations_dir; a store lost with its machine is rebuilt from
    them by teacher forcing, never generating again, into the shards generation wrote (labels exact, hidden
    states within a bf16 step, top-K equal up to near-ties). A kept file that is corrupted, or was made by another
    backbone, is never used: it is logged and generated again."""
    rng = np.random.RandomState(1)
    inputs = {"corpus": [rng.randint(0, 128, 24).tolist() for _ in range(2)],
              "chat": [rng.randint(0, 128, n).tolist() for n in (3, 6, 4, 9, 5)]}
    dc = data.DataConfig(seq_len=24, corpus_records=2, chat_prompts=5, code_prompts=0, chat_code_prompts=0,
                         max_prompt_len=12, new_tokens=6, soft_topk=2, shard_records=2)
    dec = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=6, record_hidden=True, record_topk=2))
    kept = str(tmp_path / "kept")
    kw = dict(backbone=model, feature_batch_size=2, progress=False, continuations_dir=kept,
              backbone_id="tiny:float32")
    calls = []

    def stream():
        def gen(p):
            calls.append(len(p))
            return batching.stream(dec, p, 2, refill_rows=1)
        return gen

    plan = data.build_store(dc, inputs, str(tmp_path / "a"), make_generator=stream, **kw)
    assert sorted(os.listdir(kept)) == ["chat_000000_000002.npz", "chat_000002_000004.npz", "chat_000004_000005.npz"]

    def never():
        raise AssertionError("a kept shard was generated again")

    assert data.build_store(dc, inputs, str(tmp_path / "b"), make_generator=never, **kw) == plan
    a, b = fs.FeatureStore(str(tmp_path / "a"), plan), fs.FeatureStore(str(tmp_path / "b"), plan)
    for name in ("tokens", "labels", "lengths", "prompt_lengths", "kinds"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for i in range(len(a)):
        x, y = np.asarray(a.hidden[i], np.float32), np.asarray(b.hidden[i], np.float32)
        assert np.all(np.abs(x - y) <= np.abs(y) * 2.0 ** -7 + 1e-6), i
        target = a.labels[i] >= 0
        assert np.mean(np.asarray(a.soft_ids[i])[target] == np.asarray(b.soft_ids[i])[target]) > 0.95
        np.testing.assert_allclose(np.asarray(a.soft_probs[i], np.float32), np.asarray(b.soft_probs[i], np.float32),
                                   atol=2e-3)
    meta = json.load(open(tmp_path / "b" / "chat_000000_000002" / fs.META))
    assert meta["source"].startswith("rebuilt from") and meta["seconds"] >= 0
    summary = fs.continuations_summary(kept)
    assert summary["chat"]["files"] == 3 and summary["chat"]["generated_tokens"] == 5 * 6

    # a corrupted file (one flipped byte inside its compressed tokens) and a file of another backbone
    path = os.path.join(kept, "chat_000002_000004.npz")
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 3] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(fs.StaleContinuations):
        fs.load_continuations(path, {})
    with caplog.at_level(logging.WARNING):
        calls.clear()
        assert data.build_store(dc, inputs, str(tmp_path / "c"), make_generator=stream, **kw) == plan
    assert calls == [2] and "chat_000002_000004" in caplog.text and "generating shard" in caplog.text
    fs.load_continuations(path, {"backbone": "tiny:float32"})  # written again, whole
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        calls.clear()
        data.build_store(dc, inputs, str(tmp_path / "d"), make_generator=stream, **{**kw, "backbone_id": "other:f32"})
    assert calls == [5] and "other backbone" in caplog.text

    # missing="skip": a store with holes (a data job still filling it) trains on its complete shards, builds nothing
    shutil.rmtree(tmp_path / "a" / "chat_000002_000004")
    have = data.build_store(dc, inputs, str(tmp_path / "a"), make_generator=never, missing="skip", **kw)
    assert have == [s for s in plan if s != "chat_000002_000004"] and not (tmp_path / "a" / "chat_000002_000004").exists()
    with pytest.raises(ValueError, match="none of the plan's shards"):
        data.build_store(dc, inputs, str(tmp_path / "e"), make_generator=never, missing="skip", **kw)
    # missing="teacher-forced": kept continuations and corpus text are built, a shard that needs generating is not
    os.remove(os.path.join(kept, "chat_000002_000004.npz"))  # (the kept files are "other:f32"'s since store d)
    have = data.build_store(dc, inputs, str(tmp_path / "f"), make_generator=never, missing="teacher-forced",
                            **{**kw, "backbone_id": "other:f32"})
    assert have == [s for s in plan if s != "chat_000002_000004"] and "corpus_000000_000002" in have
    assert not (tmp_path / "f" / "chat_000002_000004").exists()
