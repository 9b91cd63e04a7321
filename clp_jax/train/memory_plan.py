"""Memory per device of a training config on its mesh, computed from shapes alone (nothing allocated).

  python -m clp_jax.train.memory_plan --config configs/qwen2.5-7b.toml --devices 8
  python -m clp_jax.train.memory_plan --config configs/qwen2.5-7b.toml --devices 4 --set mesh.data=1 --set mesh.model=4

The frozen backbone and the heads are built with `nnx.eval_shape`, sharded by the same rules table
as training, the optimizer state comes from `jax.eval_shape` of the real optimizer's `init`, placed as the
Trainer places it, and each
leaf is counted by its shard shape on the mesh. The activation figure is an estimate of the largest
term, the logits over the drafters' vocabulary of every draft position (kept for the backward pass).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
from flax import nnx

from clp_jax.drafting.heads import Heads
from clp_jax.model import sharding
from clp_jax.model.config import known_geometry
from clp_jax.model.qwen2 import abstract_model
from clp_jax.train.run_config import Config, TrainMeshConfig, check_batch_sizes, load_config
from clp_jax.train.step import make_optimizer

GIB = 1 << 30


def _bytes_per_device(tree, shardings) -> int:
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def plan(cfg: Config, devices=None) -> dict:
    """Per-device bytes of backbone weights, heads, optimizer state and the logits estimate."""
    dtype = cfg.model.dtype
    mcfg = known_geometry(cfg.model.name, dtype=dtype, param_dtype=dtype)
    rc = cfg.run
    mesh = (cfg.mesh or TrainMeshConfig()).make(devices)

    backbone = nnx.state(abstract_model(mcfg), nnx.Param)
    hc = cfg.heads_config(mcfg)
    heads = nnx.state(nnx.eval_shape(lambda: Heads(hc, rngs=nnx.Rngs(0))), nnx.Param)
    sharding.check_divisible(backbone, mesh)
    sharding.check_divisible(heads, mesh)
    check_batch_sizes(rc, mesh)
    heads_sh = sharding.state_shardings(heads, mesh)
    opt = jax.eval_shape(make_optimizer(cfg.train.learning_rate, rc.steps, cfg.train).init, heads)
    opt_sh = sharding.like_params(opt, heads, heads_sh)  # as the Trainer places Adam's moments

    scored = hc.k * (2 if hc.gate else 1)  # draft positions (+ gate heads), one [B, W, U] logits each
    positions = min(rc.window, cfg.data.seq_len)
    vocab = rc.vocab_size or mcfg.vocab_size
    vocab_local = vocab // mesh.shape["model"] if sharding.RULES["vocab"] == "model" else vocab
    logits = (rc.batch_size // mesh.shape["data"]) * positions * vocab_local * 4 * scored * 2  # fwd + bwd
    out = {"mesh": dict(mesh.shape), "backbone": _bytes_per_device(backbone, sharding.state_shardings(backbone, mesh)),
           "heads": _bytes_per_device(heads, heads_sh), "optimizer": _bytes_per_device(opt, opt_sh),
           "logits_estimate": logits}
    out["total"] = out["backbone"] + out["heads"] + out["optimizer"] + out["logits_estimate"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices to plan for (the TPU's device count)")
    p.add_argument("--hbm-gib", type=float, default=16.0, help="memory per device, e.g. 16 (v5e), 32 (v4)")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    # XLA_FLAGS is read when JAX first initialises its backend (the jax.devices() below), not on import
    try:
        result = plan(load_config(args.config, args.set), jax.devices()[:args.devices])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"mesh {result['mesh']} on {args.devices} devices, per device:")
    for key in ("backbone", "heads", "optimizer", "logits_estimate", "total"):
        print(f"  {key:16s} {result[key] / GIB:7.2f} GiB")
    fits = result["total"] <= args.hbm_gib * GIB
    print(f"{'fits' if fits else 'does NOT fit'} {args.hbm_gib:g} GiB per device")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
