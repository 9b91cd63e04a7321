"""Training of the heads: sharded == unsharded, frozen backbone, learning, CLP size, NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clp_jax.drafting.heads import CLP, Heads, HeadsConfig, count_params
from clp_jax.model.sharding import MeshConfig
from clp_jax.train.step import TrainConfig, Trainer, backbone_hidden

from helpers import scaled_random_model, tiny_config


def _batch(model, rng, B=8, T=16, period=None):
    if period:  # a repetitive corpus: one fixed cycle of `period` tokens, each row at a random phase
        cycle = np.arange(period) * 7 + 3
        tokens = cycle[(np.arange(T)[None, :] + rng.randint(0, period, (B, 1))) % period]
    else:
        tokens = rng.randint(0, model.cfg.vocab_size, (B, T))
    mask = np.ones((B, T), bool)
    mask[1, 10:] = False  # a padded row
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)
    return {"hidden": backbone_hidden(model, tokens, mask), "tokens": tokens, "mask": mask}


def _heads(cfg, k=2, seed=0):
    return Heads(HeadsConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, k=k), rngs=nnx.Rngs(seed))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def model():
    return scaled_random_model(tiny_config(), seed=4, logit_scale=2.0)


def test_clp_parameter_count():
    for d, k, want in [(1536, 2, 4611), (1536, 4, 7685), (896, 4, 4485)]:
        assert count_params(CLP(d, k, rngs=nnx.Rngs(0))) == want == d * (k + 1) + (k + 1)


def test_sharded_step_equals_unsharded(model):
    assert len(jax.devices()) == 8, "conftest asks for 8 fake CPU devices"
    rng = np.random.RandomState(0)
    batches = [_batch(model, rng) for _ in range(3)]
    tc = TrainConfig(learning_rate=1e-2, warmup_steps=1)
    plain = Trainer(model, _heads(model.cfg), tc)
    sharded = Trainer(model, _heads(model.cfg), tc, mesh=MeshConfig(data=4, model=2).make())
    for b in batches:
        m1, m2 = plain.step(b), sharded.step(b)
        assert abs(m1["loss"] - m2["loss"]) < 1e-5
    w = sharded.params["mtp"]["w"]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    # Adam's moments are sharded like their parameters (the zeros would otherwise come out replicated)
    specs = {x.sharding.spec for x in jax.tree.leaves(sharded.opt_state) if x.shape == w.shape}
    assert specs == {jax.sharding.PartitionSpec(None, None, "model")}
    for a, b in zip(_leaves(plain.params), _leaves(sharded.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_backbone_is_bit_identical_after_training(model):
    before = _leaves(nnx.state(model))
    trainer = Trainer(model, _heads(model.cfg), TrainConfig())
    rng = np.random.RandomState(1)
    for _ in range(3):
        trainer.step(_batch(model, rng))
    for a, b in zip(before, _leaves(trainer.bb_state)):
        np.testing.assert_array_equal(a, b)


def _agreement(drafts, tokens, mask, shift):
    """Fraction of positions t (both ends in the mask) where head j's draft equals tokens[t + shift + j]."""
    B, T, k = drafts.shape
    hits, total = 0, 0
    for j in range(1, k + 1):
        for t in range(T - shift - j):
            ok = mask[:, t] & mask[:, t + shift + j]
            hits += int(np.sum((drafts[:, t, j - 1] == tokens[:, t + shift + j]) & ok))
            total += int(np.sum(ok))
    return hits / total


def test_heads_learn_a_repetitive_corpus(model):
    """Heads learn the cycle at exactly the right distance: head j drafts tokens[t+1+j], not a neighbour.

    On a cycle any fixed shift is as learnable as the right one, and the trainer's own accuracy is scored
    with the same alignment code it trains with; so the drafts are checked here against positions
    computed by hand, where a shift by one scores near zero (the cycle's tokens are distinct)."""
    rng = np.random.RandomState(2)
    trainer = Trainer(model, _heads(model.cfg, k=2), TrainConfig(learning_rate=1e-2, warmup_steps=5,
                                                                 deep_heads_warmup=10))
    held_out = _batch(model, np.random.RandomState(99), period=5)
    before = trainer.evaluate(held_out)
    for _ in range(30):
        trainer.step(_batch(model, rng, period=5))
    after = trainer.evaluate(held_out)
    assert before["head1_acc"] < 0.3 and after["head1_acc"] > 0.9 and after["head2_acc"] > 0.9  # chance: 1/128
    assert after["head1_loss"] < before["head1_loss"] / 10
    h = held_out["hidden"]
    B, T, D = h.shape
    heads = trainer.heads()
    drafts = jnp.argmax(heads.draft_logits(model, heads.mtp(h.reshape(B * T, D), None, 2)), -1).reshape(B, T, 2)
    tokens, mask = np.asarray(held_out["tokens"]), np.asarray(held_out["mask"])
    assert _agreement(np.asarray(drafts), tokens, mask, shift=1) > 0.9  # MTP head j: position t+1+j
    for wrong in (0, 2):
        assert _agreement(np.asarray(drafts), tokens, mask, shift=wrong) < 0.1


def test_mesh_that_does_not_divide_fails_before_compiling(model):
    bad = scaled_random_model(tiny_config(intermediate_size=100), seed=0)  # 100 % 8 != 0 on 'model'
    with pytest.raises(ValueError, match="does not divide"):
        Trainer(bad, _heads(bad.cfg), TrainConfig(), mesh=MeshConfig(data=1, model=8).make())
    with pytest.raises(ValueError, match="needs 16 devices"):
        MeshConfig(data=4, model=4).make()


def test_nan_loss_raises_and_keeps_parameters(model):
    trainer = Trainer(model, _heads(model.cfg), TrainConfig())
    batch = _batch(model, np.random.RandomState(3))
    before = _leaves(trainer.params)
    with pytest.raises(FloatingPointError, match="Non-finite"):
        trainer.step({**batch, "hidden": batch["hidden"].at[0, 0, 0].set(jnp.nan)})
    for a, b in zip(before, _leaves(trainer.params)):
        np.testing.assert_array_equal(a, b)


def test_sub_vocabulary_and_position_sampling_match_the_full_loss(model):
    """Scoring all ids through `vocab`, or all positions through `positions`, gives the full loss."""
    batch = _batch(model, np.random.RandomState(5))
    full = Trainer(model, _heads(model.cfg, seed=1), TrainConfig()).evaluate(batch)
    everything = Trainer(model, _heads(model.cfg, seed=1), TrainConfig(),
                         vocab=np.arange(model.cfg.vocab_size)).evaluate(batch)
    B, T = batch["tokens"].shape
    positions = {**batch, "positions": jnp.broadcast_to(jnp.arange(T), (B, T))}
    positioned = Trainer(model, _heads(model.cfg, seed=1), TrainConfig()).evaluate(positions)
    for key in ("loss", "head1_loss", "clp_loss"):
        assert abs(full[key] - everything[key]) < 1e-4 and abs(full[key] - positioned[key]) < 1e-4
    sub = Trainer(model, _heads(model.cfg, seed=1), TrainConfig(), vocab=np.arange(64))
    assert sub.evaluate(batch)["head1_loss"] < full["head1_loss"]  # fewer classes to spread mass over


def test_clp_phase_trains_only_the_clp_and_gate(model):
    """Phase 'clp': the heads stay bit-identical, the CLP (and gate MLP) move."""
    heads = _heads(model.cfg, seed=2)
    trainer = Trainer(model, heads, TrainConfig(phase="clp", learning_rate=1e-2, warmup_steps=1, weight_decay=0.1))
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(heads, nnx.Param))}
    rng = np.random.RandomState(4)
    for _ in range(3):
        trainer.step(_batch(model, rng))
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(trainer.heads(), nnx.Param))}
    for path, value in before.items():
        moved = not np.array_equal(value, after[path])
        assert moved == (path[0] in ("clp", "gate")), path
    with pytest.raises(ValueError, match="phase"):
        Trainer(model, heads, TrainConfig(phase="heads"))
