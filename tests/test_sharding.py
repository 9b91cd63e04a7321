"""sharding.spec on its own: logical axes -> PartitionSpec through a rules table."""

import pytest
from jax.sharding import PartitionSpec as P

from clp_jax.model import sharding


def test_spec_maps_logical_axes_through_the_rules():
    rules = {"batch": "data", "vocab": "model", "embed": None}
    assert sharding.spec(("batch", "embed", "vocab"), rules) == P("data", None, "model")
    assert sharding.spec((None, "vocab"), rules) == P(None, "model")
    assert sharding.spec(("embed",), rules) == P(None)
    assert sharding.spec(("unknown",), rules) == P(None)  # not in the table: replicated


def test_spec_refuses_two_axes_on_one_mesh_axis():
    with pytest.raises(ValueError, match="map twice onto one mesh axis"):
        sharding.spec(("vocab", "mlp"), {"vocab": "model", "mlp": "model"})


def test_default_rules_shard_the_heads_output_dimension():
    assert sharding.spec(("heads", "embed", "mlp")) == P(None, None, "model")
