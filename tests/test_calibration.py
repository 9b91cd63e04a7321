"""Choosing the drafts' temperature: on confidences whose true temperature is known, the log-loss of the
top-1 event picks it, and the reliability table's calibration error is small there and large at T = 1."""

import numpy as np

from clp_jax.train.calibration import GRID, reliability, top1_log_loss


def test_the_chosen_temperature_is_the_calibrated_one():
    rng = np.random.RandomState(0)
    n, true = 40_000, 28
    logit = rng.normal(0.0, 3.0, n)  # a two-way softmax per anchor: the top-1 choice is the same at every T

    def top1(t):
        p = 1.0 / (1.0 + np.exp(-logit / t))
        return np.maximum(p, 1.0 - p)

    conf = np.stack([top1(t) for t in GRID], axis=1)  # [N, G]
    correct = rng.random_sample(n) < top1(GRID[true])  # the top-1 draft is right as often as at T = GRID[true]
    loss = top1_log_loss(conf, correct)
    assert abs(int(np.argmin(loss)) - true) <= 1
    one = int(np.flatnonzero(GRID == 1.0)[0])
    _, ece_true = reliability(conf[:, true], correct)
    _, ece_one = reliability(conf[:, one], correct)
    assert GRID[true] > 1.5 and ece_true < 0.02 < ece_one
