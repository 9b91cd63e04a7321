"""The two matmul layouts (rows: X @ W^T; cols: W @ X kept transposed) read one copy of the weights and
agree; padding a fed width to a cheap bucket changes nothing the caller sees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clp_jax.model import qwen2
from clp_jax.model.kv_cache import init_cache
from helpers import tiny_config


def _views(cfg):
    base = qwen2.init_model(cfg.replace(matmul_layout="rows"))
    state = nnx.state(base)
    cols = nnx.merge(nnx.split(qwen2.abstract_model(cfg.replace(matmul_layout="cols")))[0], state)
    return base, cols


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("batch,width", [(1, 1), (1, 3), (1, 5), (2, 3)])
def test_rows_and_cols_agree_with_a_cache(tied, batch, width):
    cfg = tiny_config(tie_word_embeddings=tied)
    rows, cols = _views(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, 6 + width)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(6 + width, dtype=jnp.int32), tokens.shape)
    outs = []
    for m in (rows, cols):
        cache = init_cache(cfg, batch, 16)
        _, cache = m(tokens[:, :6], positions[:, :6], cache)  # prefill
        h, cache = m(tokens[:, 6:], positions[:, 6:], cache)  # a pass of `width` (padded under cols)
        assert h.shape == (batch, width, cfg.hidden_size)
        vocab = jnp.arange(3, 40, 2)
        sub = m.logits(h, vocab)
        np.testing.assert_array_equal(np.asarray(sub), np.asarray(m.logits(h, kernel=m.output_kernel(vocab))))
        outs.append((h, m.logits(h), sub, cache[0].k))
    for a, b in zip(*outs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def test_cols_cache_free_pass_with_padding_mask():
    cfg = tiny_config()
    rows, cols = _views(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 5)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    valid = jnp.array([[True] * 5, [False, False, True, True, True]])
    a, _ = rows(tokens, positions, None, valid)
    b, _ = cols(tokens, positions, None, valid)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def test_layout_selection(monkeypatch):
    cfg = tiny_config()
    monkeypatch.delenv(qwen2.LAYOUT_ENV, raising=False)
    assert qwen2.resolve_layout(cfg) == ("cols" if jax.default_backend() == "cpu" else "rows")
    monkeypatch.setenv(qwen2.LAYOUT_ENV, "rows")
    assert qwen2.resolve_layout(cfg) == "rows"
    assert qwen2.resolve_layout(cfg.replace(matmul_layout="cols")) == "cols"  # the config wins
    with pytest.raises(ValueError):
        tiny_config(matmul_layout="diagonal")
    if jax.default_backend() == "cpu":
        cols = cfg.replace(matmul_layout="cols")
        assert [qwen2.padded_width(cols, 1, w) for w in range(1, 10)] == [1, 2, 3, 4, 8, 8, 8, 8, 9]
        assert qwen2.padded_width(cols, 2, 3) == 4
        assert qwen2.padded_width(cfg.replace(matmul_layout="rows"), 1, 5) == 5


def test_default_k_skips_heads_that_pad_the_pass():
    """decode.py's default k: all heads, less any whose slot would pad a CPU cols pass to 8."""
    from flax import nnx

    from clp_jax.cli import options
    from clp_jax.drafting.heads import Heads, HeadsConfig

    cfg = tiny_config()
    heads = Heads(HeadsConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, k=4), rngs=nnx.Rngs(0))
    rows, cols = cfg.replace(matmul_layout="rows"), cfg.replace(matmul_layout="cols")
    assert options.default_k(None, cols) == 1
    assert options.default_k(heads, rows) == 4
    assert qwen2.unpadded_k(rows, 1, 7) == 7
    if jax.default_backend() == "cpu":
        assert options.default_k(heads, cols) == 3  # 5 slots would run at 8
        assert options.default_k(heads, cols, batch=2) == 4  # 2 x 5 = 10 columns: no padding
        assert [qwen2.unpadded_k(cols, 1, k) for k in (1, 2, 3, 4, 7, 8)] == [1, 2, 3, 3, 7, 8]
    else:
        assert options.default_k(heads, cols) == 4
