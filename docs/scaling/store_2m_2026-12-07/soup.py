"""Averages two heads checkpoints of the same shape (WiSE-FT): out = (1 - a) * A + a * B, in float32."""
import sys
import jax, jax.numpy as jnp
from flax import nnx
from clp_jax.drafting import checkpoint
a_path, b_path, alpha, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
A, B = checkpoint.load_heads(a_path), checkpoint.load_heads(b_path)
sa, sb = nnx.state(A, nnx.Param), nnx.state(B, nnx.Param)
mixed = jax.tree.map(lambda x, y: ((1 - alpha) * x.astype(jnp.float32) + alpha * y.astype(jnp.float32)).astype(y.dtype), sa, sb)
nnx.update(B, mixed)
meta = checkpoint.read_meta(b_path)
extra = {k: v for k, v in meta.items() if k not in ("heads_config", "backbone", "calibration")}
checkpoint.save_heads(out, B, meta["backbone"], {**extra, "soup": {"a": a_path, "b": b_path, "alpha": alpha}})
print("wrote", out)
