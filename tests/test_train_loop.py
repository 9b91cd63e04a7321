"""The one training loop on the draft-layer objective: interrupted and resumed runs equal an uninterrupted
one, a time budget stops with a checkpoint, resumes refuse another run's checkpoints, configs parse."""

import dataclasses
import os
import types

import jax
import numpy as np
import pytest
from flax import nnx

from clp_jax.decode import batching
from clp_jax.decode.decoder import DecodeConfig, Decoder
from clp_jax.drafting.checkpoint import CheckpointError, load_heads, save_heads
from clp_jax.drafting.heads import Heads, HeadsConfig
from clp_jax.train import data, feature_store as fs
from clp_jax.train.checkpoints import TrainCheckpoints
from clp_jax.train.loop import EarlyStopping, WindowSampler, evaluate, fit
from clp_jax.train.objectives import TrainConfig
from clp_jax.train.pipeline import run_meta
from clp_jax.train.run_config import ConfigError, load_config
from clp_jax.train.step import Trainer


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    """A small feature store: teacher-forced records and recorded self-distilled ones, soft labels."""
    rng = np.random.RandomState(0)
    inputs = {"corpus": [rng.randint(0, 128, 32).tolist() for _ in range(6)],
              "chat": [rng.randint(0, 128, n).tolist() for n in (3, 9, 5, 12, 7, 4)]}
    dc = data.DataConfig(seq_len=32, corpus_records=6, chat_prompts=6, code_prompts=0, chat_code_prompts=0,
                         max_prompt_len=12, new_tokens=12, soft_topk=3, shard_records=4)
    dec = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=12, record_hidden=True, record_topk=3))
    path = str(tmp_path_factory.mktemp("store"))
    plan = data.build_store(dc, inputs, path, backbone=model, make_generator=lambda: stream_of(dec, 4),
                            feature_batch_size=3, progress=False)
    return fs.FeatureStore(path, plan)


def stream_of(dec, batch_size):
    return lambda prompts: batching.stream(dec, prompts, batch_size)


def _trainer(model, k=2, steps=8, tc=None):
    heads = Heads(HeadsConfig.for_backbone(model.cfg, k=k, kind="draft_layer", gate=False), rngs=nnx.Rngs(0))
    heads.drafter.init_from_backbone(model)
    tc = tc or TrainConfig(learning_rate=3e-3, warmup_steps=2, soft_weight=0.5)
    return Trainer(model, heads, "drafter", tc, np.arange(128), steps), heads


def _sampler(store, trainer):
    return WindowSampler(store, np.arange(len(store)), 4, 16, seed=1, soft=trainer.needs_soft)


def test_resume_equals_uninterrupted(model, store, tmp_path):
    full, heads = _trainer(model)
    meta = run_meta(heads.cfg, model.cfg, {"store": "s"}, full.tc)
    ref = fit(full, _sampler(store, full), steps=8, batch_size=4, progress=False)
    first, _ = _trainer(model)
    with TrainCheckpoints(str(tmp_path), every=3, keep=2) as ckpts:
        fit(first, _sampler(store, first), steps=5, batch_size=4, ckpts=ckpts, meta=meta, progress=False)
    resumed, _ = _trainer(model)  # a fresh process would start here
    with TrainCheckpoints(str(tmp_path), every=3, keep=2) as ckpts:
        rest = fit(resumed, _sampler(store, resumed), steps=8, batch_size=4, ckpts=ckpts, meta=meta, progress=False)
    assert [m["step"] for m in rest] == [6, 7, 8]
    assert [m["loss"] for m in rest] == [m["loss"] for m in ref[5:]]  # the same computation, bit for bit
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    records = np.arange(len(store))
    held = evaluate(resumed, store, records, batch_size=4)
    assert held == evaluate(full, store, records, batch_size=4)
    # every anchor of every record, once: all but each record's last (its draft would lie past the record)
    assert held["positions"] == store.positions() - len(store)


def test_time_budget_stops_with_a_checkpoint_and_a_rerun_continues(model, store, tmp_path):
    trainer, heads = _trainer(model)
    meta = run_meta(heads.cfg, model.cfg, {"store": "s"}, trainer.tc)
    with TrainCheckpoints(str(tmp_path), every=100, keep=1) as ckpts:
        done = fit(trainer, _sampler(store, trainer), steps=8, batch_size=4, ckpts=ckpts, meta=meta,
                   budget_seconds=1e-9, progress=False)
        assert done == [] and ckpts.latest_step() == 0
        fit(trainer, _sampler(store, trainer), steps=2, batch_size=4, ckpts=ckpts, meta=meta, budget_seconds=1e-9,
            progress=False)
    again, _ = _trainer(model)
    with TrainCheckpoints(str(tmp_path), every=100, keep=1) as ckpts:
        fit(again, _sampler(store, again), steps=3, batch_size=4, ckpts=ckpts, meta=meta, progress=False)
    assert again.step_count == 3


def test_early_stopping_keeps_the_best_and_a_resumed_run_keeps_counting(model, store, tmp_path):
    # held-out scores the steps would get (7: the last step of the first run, scored as every phase's last is)
    scripted = {0: 0.1, 2: 0.3, 4: 0.5, 6: 0.4, 7: 0.35, 8: 0.45, 10: 0.2, 12: 0.9}
    params_at = {}

    def score(trainer):
        params_at[trainer.step_count] = [np.asarray(x) for x in jax.tree.leaves(trainer.params)]
        return {"score": scripted[trainer.step_count]}

    def early():
        return EarlyStopping(score, every=2, patience=3, scores_path=str(tmp_path / "scores.jsonl"),
                             best_dir=str(tmp_path / "best"))

    first, heads = _trainer(model, steps=12)
    meta = run_meta(heads.cfg, model.cfg, {"store": "s"}, first.tc)
    with TrainCheckpoints(str(tmp_path / "ckpt"), every=5, keep=1) as ckpts, early() as stop:
        fit(first, _sampler(store, first), steps=7, batch_size=4, ckpts=ckpts, meta=meta, early=stop,
            progress=False)  # ended after step 7: steps 0, 2, 4, 6 and 7 scored
    resumed, _ = _trainer(model, steps=12)
    with TrainCheckpoints(str(tmp_path / "ckpt"), every=5, keep=1) as ckpts, early() as stop:
        fit(resumed, _sampler(store, resumed), steps=12, batch_size=4, ckpts=ckpts, meta=meta, early=stop,
            progress=False)
        assert resumed.step_count == 8  # 6, 7 and 8 did not beat step 4: step 12 (0.9) is never reached
        assert stop.restore_best(resumed) == 4
    for a, b in zip(jax.tree.leaves(resumed.params), params_at[4]):
        np.testing.assert_array_equal(np.asarray(a), b)
    again, _ = _trainer(model, steps=12)  # a rerun of a stopped phase trains nothing
    with TrainCheckpoints(str(tmp_path / "ckpt"), every=5, keep=1) as ckpts, early() as stop:
        assert fit(again, _sampler(store, again), steps=12, batch_size=4, ckpts=ckpts, meta=meta, early=stop,
                   progress=False) == []
    assert sorted(params_at) == [0, 2, 4, 6, 7, 8]  # each step scored once across the interruption


def test_the_last_step_is_scored_when_it_is_off_the_scoring_grid(model, store, tmp_path):
    """A phase of 5 steps scored every 2: step 5 competes too (else its training would be thrown away)."""
    trainer, heads = _trainer(model, steps=5)
    meta = run_meta(heads.cfg, model.cfg, {"store": "s"}, trainer.tc)
    scores = {0: 0.1, 2: 0.2, 4: 0.3, 5: 0.9}
    with TrainCheckpoints(str(tmp_path / "ckpt"), every=5, keep=1) as ckpts, \
            EarlyStopping(lambda t: {"score": scores[t.step_count]}, every=2, patience=0,
                          scores_path=str(tmp_path / "scores.jsonl"), best_dir=str(tmp_path / "best")) as stop:
        fit(trainer, _sampler(store, trainer), steps=5, batch_size=4, ckpts=ckpts, meta=meta, early=stop,
            progress=False)
        assert sorted(stop.scores(5)) == [0, 2, 4, 5] and stop.restore_best(trainer) == 5


def test_the_step_a_time_budget_stops_at_is_scored(model, store, tmp_path, monkeypatch):
    """A budget that ends the phase between scores scores the step it stops at, so the training since the last
    score competes; a rerun continues from there without scoring it again."""
    from clp_jax.train import loop

    clock = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    sampler = None

    def batches(step, rows):  # each step takes one second of the fake clock
        clock[0] += 1.0
        return sampler(step, rows)

    trainer, heads = _trainer(model, steps=8)
    sampler = _sampler(store, trainer)
    meta = run_meta(heads.cfg, model.cfg, {"store": "s"}, trainer.tc)
    scores = {0: 0.1, 3: 0.5, 4: 0.2, 8: 0.3}
    with TrainCheckpoints(str(tmp_path / "ckpt"), every=100, keep=1) as ckpts, \
            EarlyStopping(lambda t: {"score": scores[t.step_count]}, every=4, patience=0,
                          scores_path=str(tmp_path / "scores.jsonl"), best_dir=str(tmp_path / "best")) as stop:
        fit(trainer, batches, steps=8, batch_size=4, ckpts=ckpts, meta=meta, early=stop, budget_seconds=2.5,
            progress=False)
        assert trainer.step_count == 3 and sorted(stop.scores(8)) == [0, 3] and ckpts.latest_step() == 3
        fit(trainer, batches, steps=8, batch_size=4, ckpts=ckpts, meta=meta, early=stop, progress=False)
        assert sorted(stop.scores(8)) == [0, 3, 4, 8] and stop.restore_best(trainer) == 3


def test_a_warm_start_that_training_never_beats_is_kept(model, store, tmp_path):
    trainer, heads = _trainer(model, steps=4)
    start = [np.asarray(x) for x in jax.tree.leaves(trainer.params)]
    meta = run_meta(heads.cfg, model.cfg, {"store": "s"}, trainer.tc)
    scores = iter([0.9, 0.5, 0.4])  # steps 0, 2, 4
    with TrainCheckpoints(str(tmp_path / "ckpt"), every=5, keep=1) as ckpts, \
            EarlyStopping(lambda t: {"score": next(scores)}, every=2, patience=0,
                          scores_path=str(tmp_path / "scores.jsonl"), best_dir=str(tmp_path / "best")) as stop:
        fit(trainer, _sampler(store, trainer), steps=4, batch_size=4, ckpts=ckpts, meta=meta, early=stop,
            progress=False)
        assert trainer.step_count == 4 and stop.restore_best(trainer) == 0
    for a, b in zip(jax.tree.leaves(trainer.params), start):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_resume_refuses_other_heads_data_or_optimisation(model, store, tmp_path):
    trainer, heads = _trainer(model)
    data_meta = {"store": "s1", "batch_size": 4}
    with TrainCheckpoints(str(tmp_path), every=1, keep=1) as ckpts:
        fit(trainer, _sampler(store, trainer), steps=2, batch_size=4, ckpts=ckpts,
            meta=run_meta(heads.cfg, model.cfg, data_meta, trainer.tc), progress=False)
    other_k, other_heads = _trainer(model, k=3)
    for meta in (run_meta(other_heads.cfg, model.cfg, data_meta, trainer.tc),
                 run_meta(heads.cfg, model.cfg, {**data_meta, "store": "s2"}, trainer.tc),
                 run_meta(heads.cfg, model.cfg, data_meta, dataclasses.replace(trainer.tc, learning_rate=0.5))):
        again = other_k if meta["heads_config"]["k"] == 3 else _trainer(model)[0]
        with TrainCheckpoints(str(tmp_path), every=1, keep=1) as ckpts, \
                pytest.raises(CheckpointError, match="made with another .*Use a new run.out_dir"):
            fit(again, _sampler(store, again), steps=4, batch_size=4, ckpts=ckpts, meta=meta, progress=False)


def test_windows_of_self_distilled_records_cover_the_generation(store):
    sampler = WindowSampler(store, np.flatnonzero(store.prompt_lengths > 0), 6, 16, seed=0)
    for step in range(5):
        rows, starts = sampler.rows(step)
        assert np.all(starts <= np.maximum(store.prompt_lengths[rows] - 1, 0) + 16)
        b = sampler(step)
        assert np.mean(b["labels"] >= 0) > 0.4  # mostly targets, not prompt


def test_trained_heads_keep_their_draft_vocabulary_and_calibration(model, store, tmp_path):
    vocab = np.arange(0, 128, 2)
    heads = Heads(HeadsConfig.for_backbone(model.cfg, k=2, kind="draft_layer", gate=False), rngs=nnx.Rngs(0),
                  draft_vocab=vocab)
    trainer = Trainer(model, heads, "drafter", TrainConfig(learning_rate=1e-2, warmup_steps=2), vocab, steps=2)
    fit(trainer, WindowSampler(store, np.arange(len(store)), 4, 16, seed=1), steps=2, batch_size=4, progress=False)
    save_heads(str(tmp_path / "heads"), trainer.heads().with_calibration([1.5, 2.0]), model.cfg)
    restored = load_heads(str(tmp_path / "heads"), model.cfg)
    np.testing.assert_array_equal(restored.draft_vocab[...], vocab)
    assert restored.calibration_list() == [1.5, 2.0]
    for a, b in zip(jax.tree.leaves(nnx.state(trainer.heads(), nnx.Param)), jax.tree.leaves(nnx.state(restored, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_warm_start_keeps_the_vocabulary_its_heads_draft_from(model, store, tmp_path):
    from clp_jax.train.pipeline import draft_vocabulary, inherited_vocabulary
    vocab = np.arange(1, 129, 2, dtype=np.int32)
    heads = Heads(HeadsConfig.for_backbone(model.cfg, k=2, kind="draft_layer", gate=False), rngs=nnx.Rngs(0),
                  draft_vocab=vocab)
    save_heads(str(tmp_path / "heads"), heads, model.cfg)
    inherited = inherited_vocabulary(str(tmp_path / "heads"), model.cfg)
    np.testing.assert_array_equal(inherited, vocab)
    assert inherited_vocabulary("", model.cfg) is None
    save_heads(str(tmp_path / "everything"), Heads(heads.cfg, rngs=nnx.Rngs(0)), model.cfg)  # no sub-vocabulary
    np.testing.assert_array_equal(inherited_vocabulary(str(tmp_path / "everything"), model.cfg),
                                  np.arange(model.cfg.vocab_size))
    records, eos = np.arange(len(store)), [model.cfg.vocab_size - 1]
    kept = draft_vocabulary(store, records, 16, model.cfg.vocab_size, eos, str(tmp_path / "a.npy"), inherited)
    np.testing.assert_array_equal(kept, vocab)  # not the 16 most frequent labels of this store
    fresh = draft_vocabulary(store, records, 16, model.cfg.vocab_size, eos, str(tmp_path / "b.npy"))
    np.testing.assert_array_equal(fresh, fs.label_vocabulary(store.labels[records], 16, always=eos))
    np.testing.assert_array_equal(np.load(str(tmp_path / "a.npy")), vocab)  # fixed for the run's resumes


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlearning_rate = 1e-3\n[run]\nsteps = 5\n')
    cfg = load_config(str(path), ["train.learning_rate=3e-4", "run.out_dir=runs/x", "heads.k=2"])
    assert cfg.train.learning_rate == 3e-4 and cfg.run.out_dir == "runs/x" and cfg.heads == {"k": 2}
    assert cfg.run.steps == 5 and cfg.run.batch_size == 8  # the file, then the defaults
    assert cfg.run.store_dir == os.path.join("runs/x", "features")
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_config(str(path), ["nope=1"])
    with pytest.raises(ConfigError, match=r"train.learning_rate = 'abc': expected a number"):
        load_config(str(path), ["train.learning_rate=abc"])
    for bad, message in (("heads.k=99", "heads.k must be in 1..16"), ('heads.kind="eagle"', "heads.kind"),
                         ("run.window=4096", r"run.window \(4096\) must be <= data.seq_len"),
                         ("train.soft_weight=0.5", "needs soft labels"),
                         ("data.chat_prompts=-1", "data.chat_prompts must be in"),
                         ('run.stop_after="eval"', "run.stop_after"), ('run.init_from="/no/such"', "init_from"),
                         ('run.missing_shards="wait"', "run.missing_shards must be 'build', 'skip' or 'teacher-forced'")):
        extra = ["data.soft_topk=0"] if "soft_weight" in bad else []
        with pytest.raises(ConfigError, match=message):
            load_config(str(path), [bad] + extra)
    path.write_text('[run]\nstepz = 5\n')
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['stepz'\] in \[run\]"):
        load_config(str(path))
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "missing.toml"))


@pytest.mark.parametrize("name", ["draft_layer_demo", "draft_layer_finetune", "draft_layer_epochs", "draft_layer_store",
                                  "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])
def test_shipped_configs_parse(name):
    import tomllib

    cfg = load_config(f"configs/{name}.toml")
    with open(f"configs/{name}.toml", "rb") as f:
        tables = tomllib.load(f)
    for section, table in tables.items():  # every value of the file arrived, typed
        for key, value in table.items():
            got = getattr(cfg, section)[key] if section == "heads" else getattr(getattr(cfg, section), key)
            assert got == (tuple(value) if isinstance(value, list) else value), (section, key)
    assert cfg.heads["kind"] == "draft_layer"
    assert cfg.run.batch_size % (cfg.mesh.data if cfg.mesh else 1) == 0


def test_training_subsets_nest_reach_their_target_count_and_keep_their_kinds(store):
    from clp_jax.train.pipeline import training_subset
    from clp_jax.train.prompts import KINDS

    records = np.arange(len(store))
    small, big = (training_subset(store, records, n, seed=1) for n in (40, 120))
    assert set(small) <= set(big) and store.positions(small) >= 40 and store.positions(big) >= 120
    only = training_subset(store, records, 0, kinds=("corpus",))
    assert len(only) and np.all(store.kinds[only] == KINDS.index("corpus"))
    assert len(training_subset(store, records, 0)) == len(records)
