"""The shipped TPU configs on 8 fake CPU devices, from shapes alone: each divides its mesh and fits a
v5e's 16 GiB per device (weights, heads, optimizer state and the estimated logits of every head)."""

import glob
import os

import pytest

from clp_jax.train import memory_plan
from clp_jax.train.run_config import load_config

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "qwen2.5-*.toml")))


def test_there_are_tpu_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_tpu_config_divides_its_mesh_and_fits_16_gib(path):
    import jax

    plan = memory_plan.plan(load_config(path), jax.devices())
    assert plan["mesh"]["data"] * plan["mesh"]["model"] == 8
    assert plan["optimizer"] == pytest.approx(2 * plan["heads"], rel=0.01)  # Adam: two moments, sharded alike
    assert plan["total"] <= 16 * memory_plan.GIB, plan


def test_sharding_really_splits_the_weights():
    """Per-device backbone bytes shrink when the model axis grows (the MLP and vocabulary are sharded)."""
    import jax

    cfg = load_config(CONFIGS[-1], ["mesh.data=8", "mesh.model=1", "run.batch_size=8",
                                               "run.eval_batch_size=8"])
    replicated = memory_plan.plan(cfg, jax.devices())["backbone"]
    cfg = load_config(CONFIGS[-1], ["mesh.data=1", "mesh.model=8"])
    assert memory_plan.plan(cfg, jax.devices())["backbone"] < 0.5 * replicated


def test_mesh_that_does_not_divide_fails_early():
    import jax

    cfg = load_config(CONFIGS[0], ["mesh.data=1", "mesh.model=3"])
    with pytest.raises(ValueError, match="does not divide"):
        memory_plan.plan(cfg, jax.devices())
    cfg = load_config(CONFIGS[0], ["mesh.data=4", "mesh.model=2", "run.batch_size=6"])
    with pytest.raises(ValueError, match="batch_size"):
        memory_plan.plan(cfg, jax.devices())


def test_memory_plan_cli(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() appends to it
    assert memory_plan.main(["--config", CONFIGS[-1]]) == 0
    assert "fits 16 GiB" in capsys.readouterr().out
