"""Loss alignment, exactly: head j at position t targets tokens[t + offset + j]."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clp_jax.train import losses


def _shifted_by_hand(tokens, mask, k, offset):
    B, T = tokens.shape
    targets = np.zeros((B, T, k), np.int64)
    valid = np.zeros((B, T, k), bool)
    for b in range(B):
        for t in range(T):
            for j in range(1, k + 1):
                s = t + offset + j
                if s < T:
                    targets[b, t, j - 1] = tokens[b, s]
                    valid[b, t, j - 1] = mask[b, t] and mask[b, s]
    return targets, valid


@pytest.mark.parametrize("offset", [0, 1])
def test_shifted_targets_exact_alignment(offset):
    T, k = 12, 3
    tokens = np.arange(100, 100 + 2 * T).reshape(2, T)  # every token names its own position
    mask = np.ones((2, T), bool)
    mask[0, :3] = False  # a prompt
    mask[1, 9:] = False  # padding
    targets, valid = losses.shifted_targets(jnp.asarray(tokens), jnp.asarray(mask), k, offset)
    targets, valid = np.asarray(targets), np.asarray(valid)
    want_t, want_v = _shifted_by_hand(tokens, mask, k, offset)
    np.testing.assert_array_equal(valid, want_v)
    np.testing.assert_array_equal(np.where(valid, targets, -1), np.where(want_v, want_t, -1))
    # stated directly: the MTP head j (offset 1) at position t targets position t+1+j
    b, t = 0, 4
    for j in range(1, k + 1):
        assert targets[b, t, j - 1] == tokens[b, t + offset + j]
    # a shift by one is caught: the hand-made targets of the neighbouring offset differ everywhere valid
    shifted_t, shifted_v = _shifted_by_hand(tokens, mask, k, offset + 1)
    both = valid & shifted_v
    assert both.any() and not np.any(targets[both] == shifted_t[both])


def test_clp_labels_count_the_leading_correct_heads():
    correct = jnp.asarray([[[True, True, False, True], [False, True, True, True], [True, True, True, True]]])
    valid = jnp.asarray([[[True, True, True, True], [True, True, True, True], [True, True, False, True]]])
    np.testing.assert_array_equal(np.asarray(losses.clp_labels(correct, valid)), [[2, 0, 2]])


def test_cross_entropy_is_optax_per_position(rng):
    logits = jnp.asarray(rng.randn(3, 5, 11).astype(np.float32))
    labels = jnp.asarray(rng.randint(0, 11, (3, 5)))
    want = -np.take_along_axis(np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True)),
                               np.asarray(labels)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(losses.cross_entropy(logits, labels)), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(losses.cross_entropy(logits, labels)),
                               np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
