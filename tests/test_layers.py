"""RMSNorm and RoPE on their own, against transformers' Qwen2 implementations (torch, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clp_jax.model.layers import RMSNorm, apply_rope, rope_angles

from conftest import tiny_hf_config

torch = pytest.importorskip("torch")
qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")


def test_rmsnorm_matches_transformers(rng):
    x = rng.randn(2, 5, 64).astype(np.float32) * 3.0
    scale = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    ref = qwen2.Qwen2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(scale))
        want = ref(torch.from_numpy(x)).numpy()
    norm = RMSNorm(64, eps=1e-6, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(scale)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("theta", [10000.0, 1_000_000.0])
def test_rope_matches_transformers(rng, theta):
    B, T, N, H = 2, 7, 3, 16
    positions = np.stack([np.arange(T) + 5, rng.randint(0, 4000, T)]).astype(np.int64)  # [B, T], unsorted too
    q = rng.randn(B, T, N, H).astype(np.float32)
    cfg = tiny_hf_config(True, hidden_size=N * H, num_attention_heads=N, num_key_value_heads=N, rope_theta=theta)
    rotary = qwen2.Qwen2RotaryEmbedding(cfg)
    with torch.no_grad():
        qt = torch.from_numpy(q).transpose(1, 2)  # HF: [B, N, T, H]
        cos, sin = rotary(qt, torch.from_numpy(positions))
        want, _ = qwen2.apply_rotary_pos_emb(qt, qt, cos, sin)
    sin_j, cos_j = rope_angles(jnp.asarray(positions), H, theta)
    got = apply_rope(jnp.asarray(q), sin_j, cos_j)
    np.testing.assert_allclose(np.asarray(got), want.transpose(1, 2).numpy(), rtol=1e-4, atol=1e-4)
    # position 0 is the identity, and a rotation keeps the norm of every head vector
    sin0, cos0 = rope_angles(jnp.zeros((1, 1), jnp.int32), H, theta)
    np.testing.assert_array_equal(np.asarray(apply_rope(jnp.asarray(q[:1, :1]), sin0, cos0)), q[:1, :1])
