"""Heads checkpoints (Orbax) and decode.py's early, clear errors."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from clp_jax.cli.options import UsageError, heads_source
from clp_jax.drafting.checkpoint import CheckpointError, export_heads, load_heads, save_heads

from helpers import random_heads, tiny_config


def test_heads_round_trip(tmp_path):
    cfg = tiny_config()
    heads = random_heads(cfg, 3)
    save_heads(str(tmp_path / "h"), heads, cfg)
    restored = load_heads(str(tmp_path / "h"), cfg)
    assert restored.cfg == heads.cfg
    for a, b in zip(jax.tree.leaves(nnx.state(heads, nnx.Param)), jax.tree.leaves(nnx.state(restored, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_to_bf16_keeps_metadata_and_decodes_alike(tmp_path):
    """Shipping casts the parameters to bf16; the copy keeps the fingerprint and extras, and its head
    states and CLP logits stay within bf16 rounding of the fp32 heads'."""
    cfg = tiny_config()
    heads = random_heads(cfg, 2)
    save_heads(str(tmp_path / "h"), heads, cfg, {"eval": {"head1_acc": 0.5}})
    export_heads(str(tmp_path / "h"), str(tmp_path / "s"))
    shipped = load_heads(str(tmp_path / "s"), cfg)  # fingerprint still matches
    assert shipped.cfg.param_dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(nnx.state(shipped, nnx.Param)))
    meta = json.loads((tmp_path / "s" / "heads.json").read_text())
    assert meta["eval"] == {"head1_acc": 0.5}
    h = jax.random.normal(jax.random.key(0), (4, cfg.hidden_size))
    np.testing.assert_allclose(shipped.drafter(h), heads.drafter(h), rtol=0.05, atol=0.05)
    np.testing.assert_allclose(shipped.clp(h), heads.clp(h), rtol=0.05, atol=0.1)
    assert not np.allclose(shipped.drafter(h), h[:, None])  # the heads are not a no-op


def test_draft_vocabulary_round_trip_and_corruption(tmp_path):
    from clp_jax.drafting.heads import Heads

    cfg = tiny_config()
    heads = Heads(random_heads(cfg, 2).cfg, rngs=nnx.Rngs(0), draft_vocab=np.array([1, 5, 9]))
    save_heads(str(tmp_path / "h"), heads, cfg)
    export_heads(str(tmp_path / "h"), str(tmp_path / "s"))
    for name in ("h", "s"):
        np.testing.assert_array_equal(load_heads(str(tmp_path / name), cfg).draft_vocab[...], [1, 5, 9])
    np.save(tmp_path / "h" / "draft_vocab.npy", np.array([1, 500]))  # beyond the vocabulary
    with pytest.raises(CheckpointError, match="token ids"):
        load_heads(str(tmp_path / "h"), cfg)
    (tmp_path / "h" / "draft_vocab.npy").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_heads(str(tmp_path / "h"), cfg)


def test_heads_for_another_backbone_are_refused(tmp_path):
    cfg = tiny_config()
    save_heads(str(tmp_path / "h"), random_heads(cfg, 2), cfg)
    with pytest.raises(CheckpointError, match="another backbone"):
        load_heads(str(tmp_path / "h"), tiny_config(hidden_size=32, head_dim=8))


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_heads(str(tmp_path / "nothing"))
    cfg = tiny_config()
    save_heads(str(tmp_path / "h"), random_heads(cfg, 2), cfg)
    with open(tmp_path / "h" / "heads.json", "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match=r"heads.json' is not valid JSON \(.* at line 1, column 2\)"):
        load_heads(str(tmp_path / "h"))


def test_heads_source_fails_before_loading_anything(tmp_path):
    assert heads_source(None, "demo", "ar") is None
    assert heads_source("zero", "demo", "verify") == "zero"
    with pytest.raises(CheckpointError, match="needs MTP heads"):
        heads_source(None, "some.gguf", "clp")
    with pytest.raises(CheckpointError, match="does not exist"):
        heads_source(str(tmp_path / "missing"), "demo", "verify")
    cfg = tiny_config()
    save_heads(str(tmp_path / "h"), random_heads(cfg, 2), cfg)
    assert heads_source(str(tmp_path / "h"), "demo", "verify", k=2) == str(tmp_path / "h")
    with pytest.raises(UsageError, match="--k 3 is more than the 2 heads"):
        heads_source(str(tmp_path / "h"), "demo", "verify", k=3)


def test_decode_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    import decode

    assert decode.main(["--mode", "clp", "--model", str(tmp_path / "x.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err  # the model is checked before the heads
    assert decode.main(["--mode", "clp", "--model", "nothing/shipped"]) == 2
    assert "needs MTP heads" in capsys.readouterr().err
    assert decode.main(["--mode", "ar", "--model", str(tmp_path / "x.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"other": 1}) + "\n")
    assert decode.main(["--mode", "ar", "--prompts-file", str(bad)]) == 2
    assert "line 1: the object has no 'prompt' or 'messages' field" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.gguf")
