"""Training objectives and the step, on what ships (the draft layer) and on the Medusa heads: target
alignment, learning, sharded == unsharded, frozen backbone, NaN guard, the CLP phase, soft labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clp_jax.drafting.heads import CLP, Heads, HeadsConfig, clp_length, count_params
from clp_jax.model.sharding import MeshConfig
from clp_jax.train import objectives
from clp_jax.train.objectives import TrainConfig
from clp_jax.train.step import Trainer

from helpers import scaled_random_model, tiny_config


@pytest.fixture(scope="module")
def model():
    return scaled_random_model(tiny_config(), seed=4, logit_scale=2.0)


def _heads(model, kind="draft_layer", k=2, seed=0, gate=False):
    heads = Heads(HeadsConfig.for_backbone(model.cfg, k=k, kind=kind, gate=gate), rngs=nnx.Rngs(seed))
    if kind == "draft_layer":
        heads.drafter.init_from_backbone(model)
    return heads


def _batch(model, rng, B=8, T=16, period=None, prompt=0):
    """A teacher-forced window: the backbone's own h and greedy labels y over random (or periodic) tokens;
    the first `prompt` positions are no targets (a self-distilled record's prompt)."""
    if period:  # one fixed cycle, each row at a random phase
        cycle = np.arange(period) * 7 + 3
        tokens = cycle[(np.arange(T)[None, :] + rng.randint(0, period, (B, 1))) % period]
    else:
        tokens = rng.randint(0, model.cfg.vocab_size, (B, T))
    tokens = jnp.asarray(tokens, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    h, _ = model(tokens, pos, None)
    labels = np.array(jnp.argmax(model.logits(h), -1), np.int32)
    labels[:, T - 1] = -1  # the last position predicts a token outside the window
    labels[:, :max(prompt - 1, 0)] = -1
    return {"hidden": np.asarray(h), "tokens": np.asarray(tokens), "labels": labels,
            "lengths": np.full((B,), T, np.int32)}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_clp_parameter_count():
    for d, k, want in [(1536, 2, 4611), (1536, 4, 7685), (896, 4, 4485)]:
        assert count_params(CLP(d, k, rngs=nnx.Rngs(0))) == want == d * (k + 1) + (k + 1)


def test_draft_targets_by_hand():
    y = jnp.asarray([[5, 6, 7, -1], [-1, 2, 3, -1]])  # row 1: position 0 is a prompt position
    target, valid = objectives.draft_targets(y, 2)
    np.testing.assert_array_equal(target, [[6, 7, -1, -1], [2, 3, -1, -1]])
    # draft 1 at p: anchor p; draft 2 at p: anchor p-1 (needs y_{p-1} >= 0)
    np.testing.assert_array_equal(valid[0], [[1, 1, 0, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(valid[1], [[0, 1, 0, 0], [0, 0, 0, 0]])


class ShiftedOracle(nnx.Module):
    """A drafter whose state at p is the LM-head row of y_{p+1+shift}: right at shift 0 only."""

    def __init__(self, labels, shift):
        self.labels, self.shift = nnx.Variable(jnp.asarray(labels)), shift

    def unrolled(self, backbone, hidden, tokens, k):
        y = objectives._later(self.labels[...], 1 + self.shift, 0) if self.shift >= 0 else \
            objectives._earlier(self.labels[...], -1 - self.shift, 0)
        rows = backbone.output_kernel(jnp.arange(backbone.cfg.vocab_size))[jnp.maximum(y, 0)] * 50.0
        return jnp.broadcast_to(rows, (k,) + rows.shape)


@pytest.mark.parametrize("shift", [0, 1, -2])
def test_objective_aligns_targets_a_shift_by_one_fails(model, shift):
    batch = _batch(model, np.random.RandomState(0))
    kernel = model.output_kernel(jnp.arange(model.cfg.vocab_size))
    assert np.all(np.argmax(np.asarray(kernel @ kernel.T), -1) == np.arange(model.cfg.vocab_size))  # rows pick themselves
    heads = _heads(model)
    heads.drafter = ShiftedOracle(batch["labels"], shift)
    _, m = objectives.drafter_loss(heads, model, batch, TrainConfig(), jnp.arange(model.cfg.vocab_size))
    agreement = np.asarray(m["hits"]) / np.asarray(m["count"])
    if shift == 0:
        np.testing.assert_allclose(agreement, 1.0)
    else:
        assert np.all(agreement < 0.2), agreement


@pytest.mark.parametrize("kind", ["draft_layer", "medusa"])
def test_drafter_learns_a_repetitive_corpus(model, kind):
    rng = np.random.RandomState(1)
    tc = TrainConfig(learning_rate=3e-3 if kind == "draft_layer" else 3e-2, warmup_steps=2)
    trainer = Trainer(model, _heads(model, kind), "drafter", tc, np.arange(model.cfg.vocab_size), steps=60)
    held = _batch(model, rng, period=5)
    before = trainer.evaluate(held)
    for _ in range(60):
        trainer.step(_batch(model, rng, period=5))
    after = trainer.evaluate(held)
    acc = np.asarray(after["hits"]) / np.asarray(after["count"])
    assert np.all(acc > 0.9) and float(after["loss"]) < float(before["loss"]) / 4, (before, after)


def test_sharded_step_equals_unsharded(model):
    assert len(jax.devices()) == 8, "conftest asks for 8 fake CPU devices"
    rng = np.random.RandomState(0)
    batches = [_batch(model, rng) for _ in range(3)]
    tc = TrainConfig(learning_rate=1e-2, warmup_steps=1, soft_weight=0.0)
    vocab = np.arange(model.cfg.vocab_size)
    plain = Trainer(model, _heads(model), "drafter", tc, vocab, steps=3)
    sharded = Trainer(model, _heads(model), "drafter", tc, vocab, steps=3, mesh=MeshConfig(data=4, model=2).make())
    for b in batches:
        m1, m2 = plain.step(b), sharded.step(b)
        assert abs(float(m1["loss"]) - float(m2["loss"])) < 1e-5
    for a, b in zip(_leaves(plain.params), _leaves(sharded.params)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    up = sharded.params["drafter"]["layer"]["mlp"]["up"]["kernel"]  # [out, in]: the MLP axis on 'model'
    assert "model" in tuple(up.sharding.spec)
    specs = {x.sharding.spec for x in jax.tree.leaves(sharded.opt_state) if x.shape == up.shape}
    assert specs == {up.sharding.spec}  # Adam's moments sharded like their parameter


def test_backbone_is_bit_identical_after_training(model):
    before = _leaves(nnx.state(model))
    trainer = Trainer(model, _heads(model, gate=True), "drafter", TrainConfig(learning_rate=1e-2),
                      np.arange(model.cfg.vocab_size), steps=2)
    for _ in range(2):
        trainer.step(_batch(model, np.random.RandomState(2)))
    for a, b in zip(before, _leaves(nnx.state(model))):
        np.testing.assert_array_equal(a, b)


def test_mesh_that_does_not_divide_fails_before_compiling():
    bad = scaled_random_model(tiny_config(intermediate_size=100), seed=0)  # 100 % 8 != 0 on 'model'
    with pytest.raises(ValueError, match="does not divide"):
        Trainer(bad, _heads(bad), "drafter", TrainConfig(), np.arange(128), steps=1,
                mesh=MeshConfig(data=1, model=8).make())
    with pytest.raises(ValueError, match="needs 16 devices"):
        MeshConfig(data=4, model=4).make()


def test_nan_loss_raises_and_keeps_parameters(model):
    trainer = Trainer(model, _heads(model), "drafter", TrainConfig(), np.arange(128), steps=2)
    batch = _batch(model, np.random.RandomState(3))
    before = _leaves(trainer.params)
    bad = {**batch, "hidden": batch["hidden"].copy()}
    bad["hidden"][0, 0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="Non-finite"):
        trainer.step(bad)
    for a, b in zip(before, _leaves(trainer.params)):  # donated buffers, yet the old values are kept
        np.testing.assert_array_equal(a, b)
    trainer.step(batch)  # and training goes on


def test_clp_phase_trains_only_the_clp(model):
    heads = _heads(model, seed=2, gate=True)
    trainer = Trainer(model, heads, "clp", TrainConfig(clp_learning_rate=1e-2, warmup_steps=1), np.arange(128),
                      steps=3)
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(heads, nnx.Param))}
    rng = np.random.RandomState(4)
    for _ in range(3):
        m = trainer.step(_batch(model, rng, prompt=4))
    assert np.asarray(m["confusion"]).sum() == 8 * (16 - 1 - 3)  # one L* per anchor (positions 3 .. 14)
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(trainer.heads(), nnx.Param))}
    for path, value in before.items():
        assert (not np.array_equal(value, after[path])) == (path[0] == "clp"), path
    with pytest.raises(ValueError, match="phase"):
        Trainer(model, heads, "heads", TrainConfig(), np.arange(128), steps=1)


def test_clp_labels_are_the_chains_accepted_prefix(model):
    """L* at each anchor = the leading drafts of the frozen chain that equal y (checked by hand)."""
    batch = _batch(model, np.random.RandomState(5))
    heads = _heads(model, k=3)
    vocab = jnp.arange(model.cfg.vocab_size)
    ok, anchors = objectives.chain_correct(heads, model, batch, vocab)
    states = heads.drafter.unrolled(model, batch["hidden"], batch["tokens"], 3)
    pred = np.argmax(np.asarray(objectives.draft_logits(model, states, vocab)), -1)  # [k, B, T]
    y = batch["labels"]
    B, T = y.shape
    for b in range(B):
        for n in range(T):
            for j in range(3):
                want = n + j + 1 < T and pred[j, b, n + j] == y[b, n + j + 1]
                assert bool(ok[b, n, j]) == bool(want)
    assert np.array_equal(np.asarray(anchors), y >= 0)


def test_clp_length_at_a_margin_by_hand():
    """`clp` commits the argmax (at most k), or the most heads l with P(L* >= l) >= p; one rule for decoding
    and for the evaluation's per-margin figures."""
    probs = jnp.asarray([[0.1, 0.2, 0.3, 0.4], [0.6, 0.1, 0.1, 0.2]])  # [2, K+1 = 4]: P(L*>=1) 0.9 / 0.4
    logits = jnp.log(probs)
    assert clp_length(logits, 3).tolist() == [3, 0]
    assert clp_length(logits, 2).tolist() == [2, 0]  # argmax capped at k
    assert clp_length(logits, 3, 0.7).tolist() == [2, 0]  # P(L*>=2) = 0.7, P(L*>=3) = 0.4
    assert clp_length(logits, 3, 0.35).tolist() == [3, 1]  # row 2: P(L*>=1) = 0.4, P(L*>=2) = 0.3
    assert clp_length(logits, 1, 0.3).tolist() == [1, 1]  # mass beyond k counts for l <= k


def test_clp_evaluation_counts_wrong_commits_per_margin(model):
    """Per margin: heads `clp` would commit and those past the chain's first miss, over every anchor; the
    argmax's figures follow from the confusion matrix, and a higher margin never commits more."""
    heads = _heads(model, k=3, seed=3)
    heads.clp.linear.kernel[...] = jax.random.normal(jax.random.key(0), heads.clp.linear.kernel.shape) * 0.3
    batch = _batch(model, np.random.RandomState(6), prompt=4)
    _, m = objectives.clp_loss(heads, model, batch, TrainConfig(), jnp.arange(model.cfg.vocab_size))
    c = np.asarray(m["confusion"])  # rows: true L*, columns: the argmax
    true_l, pred_l = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    committed, wrong = np.asarray(m["margin_heads"]), np.asarray(m["margin_wrong"])
    assert objectives.CLP_MARGINS[0] is None and len(committed) == len(objectives.CLP_MARGINS)
    assert committed[0] == (c * pred_l).sum() and wrong[0] == (c * np.maximum(pred_l - true_l, 0)).sum()
    assert committed[0] > 0 and np.all(np.diff(committed[1:]) <= 0) and np.all(wrong <= committed)


def test_soft_label_loss_by_hand():
    logp = jax.nn.log_softmax(jnp.asarray([[0.5, 1.0, -1.0, 2.0]]))  # [1, U=4]
    index = jnp.asarray([-1, 0, 1, 2, 3, -1])  # token ids 1..4 are columns 0..3; 0 and 5 lie outside U
    ids = jnp.asarray([[4, 5, 1]])  # the backbone's top-3: ids 4 (in U), 5 (outside), 1 (in U)
    probs = jnp.asarray([[0.5, 0.3, 0.2]])
    got = float(objectives._soft_ce(logp, ids, probs, index)[0])
    lp = np.asarray(logp[0])
    want = -(0.5 * lp[3] + 0.2 * lp[0]) / 0.7  # renormalised over the ids inside U
    assert abs(got - want) < 1e-6


def test_soft_labels_enter_the_loss(model):
    batch = _batch(model, np.random.RandomState(6))
    B, T = batch["labels"].shape
    batch["soft_ids"] = np.stack([batch["labels"].clip(0), (batch["labels"].clip(0) + 1) % 128], -1)
    batch["soft_probs"] = np.tile(np.asarray([0.6, 0.4], np.float32), (B, T, 1))
    heads, vocab = _heads(model), jnp.arange(128)
    hard, _ = objectives.drafter_loss(heads, model, batch, TrainConfig(soft_weight=0.0), vocab)
    soft, _ = objectives.drafter_loss(heads, model, batch, TrainConfig(soft_weight=1.0), vocab)
    mixed, _ = objectives.drafter_loss(heads, model, batch, TrainConfig(soft_weight=0.5), vocab)
    assert abs(float(mixed) - 0.5 * (float(hard) + float(soft))) < 1e-5 and abs(float(soft) - float(hard)) > 1e-3
