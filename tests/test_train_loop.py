"""The training loop: interrupted and resumed runs equal an uninterrupted one."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from clp_jax.drafting.checkpoint import CheckpointError
from clp_jax.drafting.heads import Heads, HeadsConfig
from clp_jax.train.checkpoints import TrainCheckpoints
from clp_jax.train.features import cached_hidden_fn
from clp_jax.train.loop import evaluate, fit
from clp_jax.train.pipeline import run_meta
from clp_jax.train.run_config import ConfigError, load_config
from clp_jax.train.step import TrainConfig, Trainer

from helpers import scaled_random_model, tiny_config


@pytest.fixture(scope="module")
def setting():
    model = scaled_random_model(tiny_config(), seed=6, logit_scale=2.0)
    rng = np.random.RandomState(0)
    source = [{"tokens": rng.randint(0, 128, 16).astype(np.int32), "mask": np.ones(16, bool)} for _ in range(12)]
    return model, source, cached_hidden_fn(model, source, progress=False)


def _trainer(model, k=2):
    heads = Heads(HeadsConfig(hidden_size=64, vocab_size=128, k=k), rngs=nnx.Rngs(0))
    return Trainer(model, heads, TrainConfig(learning_rate=1e-2, warmup_steps=2)), heads


def test_resume_equals_uninterrupted(setting, tmp_path):
    model, source, hidden = setting
    kw = dict(batch_size=4, seed=1, hidden_fn=hidden, progress=False)
    full, heads = _trainer(model)
    meta = run_meta(heads.cfg, model.cfg)
    ref = fit(full, source, steps=10, **kw)
    first, _ = _trainer(model)
    with TrainCheckpoints(str(tmp_path), every=5, keep=2) as ckpts:
        fit(first, source, steps=5, ckpts=ckpts, meta=meta, **kw)
    resumed, _ = _trainer(model)  # a fresh process would start here
    with TrainCheckpoints(str(tmp_path), every=5, keep=2) as ckpts:
        rest = fit(resumed, source, steps=10, ckpts=ckpts, meta=meta, **kw)
    assert [m["step"] for m in rest] == list(range(6, 11))
    assert [m["loss"] for m in rest] == [m["loss"] for m in ref[5:]]  # the same computation, bit for bit
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    held = evaluate(resumed, source, batch_size=4, hidden_fn=hidden)
    assert held == evaluate(full, source, batch_size=4, hidden_fn=hidden)
    # every position whose k=2 targets lie inside its row lands once in the (k+1)x(k+1) confusion matrix
    confusion = np.asarray(held["clp_confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == 12 * (16 - 2)


def test_resume_refuses_other_heads(setting, tmp_path):
    model, source, hidden = setting
    kw = dict(batch_size=4, seed=1, hidden_fn=hidden, progress=False)
    trainer, heads = _trainer(model)
    with TrainCheckpoints(str(tmp_path), every=1, keep=1) as ckpts:
        fit(trainer, source, steps=2, ckpts=ckpts, meta=run_meta(heads.cfg, model.cfg), **kw)
    other, other_heads = _trainer(model, k=3)
    with TrainCheckpoints(str(tmp_path), every=1, keep=1) as ckpts, \
            pytest.raises(CheckpointError, match="made with another heads_config .*Use a new run.out_dir"):
        fit(other, source, steps=4, ckpts=ckpts, meta=run_meta(other_heads.cfg, model.cfg), **kw)


def test_resume_refuses_other_data_or_optimisation(setting, tmp_path):
    """A run resumed with another dataset, batch order or learning rate would mix two runs: refused.
    More steps are fine."""
    model, source, hidden = setting
    kw = dict(batch_size=4, seed=1, hidden_fn=hidden, progress=False)
    data = {"dataset": "v1", "batch_size": 4, "seed": 1}
    trainer, heads = _trainer(model)
    with TrainCheckpoints(str(tmp_path), every=1, keep=1) as ckpts:
        fit(trainer, source, steps=2, ckpts=ckpts, meta=run_meta(heads.cfg, model.cfg, data, trainer.tc), **kw)
    for other_data, tc in (({**data, "dataset": "v2"}, trainer.tc),
                           (data, dataclasses.replace(trainer.tc, learning_rate=0.5))):
        again, _ = _trainer(model)
        with TrainCheckpoints(str(tmp_path), every=1, keep=1) as ckpts, pytest.raises(CheckpointError, match="out_dir"):
            fit(again, source, steps=4, ckpts=ckpts, meta=run_meta(heads.cfg, model.cfg, other_data, tc), **kw)
    again, _ = _trainer(model)
    with TrainCheckpoints(str(tmp_path), every=1, keep=1) as ckpts:
        fit(again, source, steps=4, ckpts=ckpts, meta=run_meta(heads.cfg, model.cfg, data, trainer.tc), **kw)
    assert again.step_count == 4


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlearning_rate = 1e-3\n[run]\nsteps = 5\n')
    cfg = load_config(str(path), ["train.learning_rate=3e-4", "run.out_dir=runs/x", "heads.k=2"])
    assert cfg.train.learning_rate == 3e-4 and cfg.run.out_dir == "runs/x" and cfg.heads == {"k": 2}
    assert cfg.run.steps == 5 and cfg.run.batch_size == 8  # the file, then the defaults
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_config(str(path), ["nope=1"])
    with pytest.raises(ConfigError, match=r"train.learning_rate = 'abc': expected a number"):
        load_config(str(path), ["train.learning_rate=abc"])
    path.write_text('[run]\nstepz = 5\n')
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['stepz'\] in \[run\]"):
        load_config(str(path))
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "missing.toml"))


def test_batches_are_a_function_of_the_step():
    from clp_jax.train.data import batch_indices

    n, bs = 10, 4
    stream = np.concatenate([batch_indices(n, s, bs, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    np.testing.assert_array_equal(batch_indices(n, 3, bs, seed=3), stream[12:16])


@pytest.mark.parametrize("name", ["demo", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])
def test_shipped_configs_parse(name):
    import tomllib

    cfg = load_config(f"configs/{name}.toml")
    with open(f"configs/{name}.toml", "rb") as f:
        tables = tomllib.load(f)
    for section, table in tables.items():  # every value of the file arrived, typed
        for key, value in table.items():
            got = getattr(cfg, section)[key] if section == "heads" else getattr(getattr(cfg, section), key)
            assert got == (tuple(value) if isinstance(value, list) else value), (section, key)
    assert cfg.run.batch_size % (cfg.mesh.data if cfg.mesh else 1) == 0


def test_hidden_states_cached_on_disk(setting, tmp_path):
    model, source, _ = setting
    path = str(tmp_path / "train.npy")
    first = cached_hidden_fn(model, source, progress=False, path=path)
    idx = np.array([3, 0, 7])
    again = cached_hidden_fn(None, source, progress=False, path=path)  # no model needed: read from disk
    np.testing.assert_array_equal(np.asarray(first(idx, None)), np.asarray(again(idx, None)))


def test_trained_heads_keep_their_draft_vocabulary(setting, tmp_path):
    """What run() saves: the trainer's heads with the training sub-vocabulary as their draft vocabulary."""
    from clp_jax.drafting.checkpoint import load_heads, save_heads

    model, source, hidden = setting
    vocab = np.arange(0, 128, 2)
    heads = Heads(HeadsConfig(hidden_size=64, vocab_size=128, k=2), rngs=nnx.Rngs(0))
    trainer = Trainer(model, heads, TrainConfig(learning_rate=1e-2, warmup_steps=2), vocab=vocab)
    fit(trainer, source, steps=2, batch_size=4, seed=1, hidden_fn=hidden, progress=False)
    save_heads(str(tmp_path / "heads"), trainer.heads().with_draft_vocab(vocab), model.cfg)
    restored = load_heads(str(tmp_path / "heads"), model.cfg)
    np.testing.assert_array_equal(restored.draft_vocab[...], vocab)
    for a, b in zip(jax.tree.leaves(nnx.state(trainer.heads(), nnx.Param)), jax.tree.leaves(nnx.state(restored, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
