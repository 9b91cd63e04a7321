"""MiMo-MTP export (weights/mimo.py): the layout vLLM loads, and a round trip that drafts exactly as before."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from clp_jax.drafting.checkpoint import CheckpointError, load_heads, read_heads_config, save_heads
from clp_jax.drafting.heads import Heads, HeadsConfig
from clp_jax.weights import convert, loading, mimo

from helpers import random_heads, scaled_random_model, tiny_config

MTP = "model.mtp_layers.0."
# What vLLM's MiMo-MTP layer (vllm/model_executor/models/mimo_mtp.py) holds: its own four tensors, then the
# Qwen2 decoder layer it loads as `mtp_block.*` from these names.
VLLM_MTP_NAMES = {
    "token_layernorm.weight", "hidden_layernorm.weight", "input_proj.weight", "final_layernorm.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
}


def tiny_tokenizer():
    """A Qwen2 tokenizer over 126 single characters (byte-level, no merges) plus Qwen's two end markers, with
    a chat template: what an engine's transformers rebuilds from the exported files."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate([chr(c) for c in range(33, 127)] + ["\u0120"])}  # Ġ: the space
    vocab.update({"<|im_end|>": 126, "<|endoftext|>": 127})
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token=None, bos_token=None)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    return tok


def draft_heads(model, k=3, seed=5, vocab=None, scale=0.05, **kw):
    """Draft-layer heads copied from the backbone's last layer plus noise, with a non-zero CLP."""
    heads = Heads(HeadsConfig.for_backbone(model.cfg, k=k, kind="draft_layer", **kw), rngs=nnx.Rngs(seed),
                  draft_vocab=vocab)
    heads.drafter.init_from_backbone(model)
    state = nnx.state(heads, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + jnp.asarray(scale, x.dtype) * jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)]
    nnx.update(heads, jax.tree.unflatten(treedef, leaves))
    return heads


@pytest.fixture(scope="module")
def backbone():
    """The tiny backbone with a final norm that is not all ones (the export must carry it)."""
    model = scaled_random_model(tiny_config(), seed=3, logit_scale=4.0)
    model.final_norm.scale[...] = 1.0 + 0.3 * jax.random.normal(jax.random.key(9), model.final_norm.scale.shape)
    tok = tiny_tokenizer()
    return loading.Backbone(model.cfg, model, tok, "tiny", loading.eos_token_ids(tok))


@pytest.fixture(scope="module")
def exported(backbone, tmp_path_factory):
    heads = draft_heads(backbone.model, trunk_feature="pre_norm").with_calibration([1.5, 1.2, 0.8])
    out = str(tmp_path_factory.mktemp("mimo") / "export")
    notes = mimo.export(out, backbone, heads, source="test")
    return heads, out, notes


def _tensors(path):
    with safe_open(os.path.join(path, "model.safetensors"), framework="flax") as f:
        return {n: np.asarray(f.get_tensor(n)) for n in f.keys()}


def _drafts(model, heads, k):
    """Heads.draft after a 6-token chunk (anchor at slot 4), greedy."""
    tokens = jnp.asarray([[5, 17, 33, 2, 90, 41], [7, 7, 100, 3, 12, 64]], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), tokens.shape)
    hidden, _ = model(tokens, pos)
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    anchor = jnp.asarray([4, 3])
    return heads.draft(model, hidden, nxt, pos, anchor, k, heads.init_cache(2, 16),
                       lambda j, logits: jnp.argmax(logits, -1).astype(jnp.int32))


def test_layout_is_what_vllm_loads(backbone, exported):
    heads, out, notes = exported
    cfg = backbone.cfg
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["architectures"] == ["MiMoForCausalLM"] and hf["model_type"] == "qwen2"
    assert hf["num_nextn_predict_layers"] == 1 and hf["num_hidden_layers"] == cfg.num_layers
    assert hf["clp_jax"]["k"] == 3
    assert "num_speculative_tokens between 1 and 3" in " ".join(notes)
    tensors = _tensors(out)
    assert {n[len(MTP):] for n in tensors if n.startswith("model.mtp_layers.")} == VLLM_MTP_NAMES
    backbone_names = {n for n in tensors if not n.startswith("model.mtp_layers.")}
    assert backbone_names == set(convert.hf_tensors(backbone.model))
    D = cfg.hidden_size
    fuse = np.asarray(heads.drafter.fuse[...])  # [2D, D]: rows 0:D read the feature
    assert tensors[MTP + "input_proj.weight"].shape == (D, 2 * D)  # nn.Linear(2D -> D) over cat[h, embed]
    np.testing.assert_array_equal(tensors[MTP + "input_proj.weight"], fuse.T)
    np.testing.assert_array_equal(tensors[MTP + "hidden_layernorm.weight"], heads.drafter.norm_feature.scale[...])
    np.testing.assert_array_equal(tensors[MTP + "token_layernorm.weight"], heads.drafter.norm_token.scale[...])
    np.testing.assert_array_equal(tensors[MTP + "final_layernorm.weight"], tensors["model.norm.weight"])
    np.testing.assert_array_equal(tensors[MTP + "self_attn.q_proj.weight"],
                                  np.asarray(heads.drafter.layer.attn.q.kernel[...]).reshape(-1, D))
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert set(gen["eos_token_id"]) == set(backbone.eos_token_ids) and "temperature" not in gen
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    assert "chat_template" in open(os.path.join(out, "tokenizer_config.json")).read() or \
        os.path.exists(os.path.join(out, "chat_template.jinja"))


def test_round_trip_drafts_exactly_as_before(backbone, exported):
    heads, out, _ = exported
    back = loading.load_backbone(out, use_cache=False, progress=False)
    assert back.cfg == backbone.cfg and back.eos_token_ids == backbone.eos_token_ids
    assert back.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        backbone.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    for key, value in convert.flat_params(back.model).items():
        np.testing.assert_array_equal(value, convert.flat_params(backbone.model)[key], err_msg=key)
    assert read_heads_config(out).k == 3
    imported = load_heads(out, back.cfg)
    assert imported.cfg.kind == "draft_layer" and imported.cfg.k == 3 and imported.gate is None
    assert imported.calibration_list() == heads.calibration_list()
    assert imported.cfg.trunk_feature == "pre_norm"  # what engines feed: recorded, and a foreign export's default
    a, b = _drafts(backbone.model, heads, 3), _drafts(back.model, imported, 3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.length_logits, b.length_logits)  # the CLP rides along


def test_draft_vocabulary_is_dropped_and_bf16_kept(backbone, tmp_path):
    """Heads trained on a sub-vocabulary export as drafting over the full vocabulary; bf16 stays bf16."""
    heads = draft_heads(backbone.model, k=2, vocab=np.arange(0, 128, 3), param_dtype="bfloat16")
    notes = mimo.export(str(tmp_path), backbone, heads, dtype="bfloat16")
    assert any("full vocabulary" in n for n in notes)
    assert any('"pre_norm" export exactly' in n for n in notes)  # these heads read the final-normed state
    imported = load_heads(str(tmp_path), backbone.cfg)
    assert imported.draft_vocab is None and imported.drafter.fuse[...].dtype == jnp.bfloat16
    want, got = _drafts(backbone.model, heads.with_draft_vocab(None), 2), _drafts(backbone.model, imported, 2)
    np.testing.assert_array_equal(want.tokens, got.tokens)
    np.testing.assert_allclose(want.logits, got.logits, rtol=1e-6, atol=1e-6)
    assert all(str(t.dtype) == "bfloat16" for t in _tensors(str(tmp_path)).values())


def test_decode_cli_reads_an_export(exported, capsys, tmp_path, monkeypatch):
    """`decode.py --model DIR --heads DIR` on an export."""
    import decode

    monkeypatch.setenv("CLP_JAX_CACHE", str(tmp_path / "cache"))
    _, out, _ = exported
    assert decode.main(["--model", out, "--heads", out, "--mode", "verify", "--prompt", "def f(n):",
                        "--max-new-tokens", "6", "--compare", "ar"]) == 0
    assert "1/1 prompts identical to ar" in capsys.readouterr().out


def test_export_cli(exported, tmp_path, capsys, monkeypatch):
    """tools/export_vllm.py over an export (itself a Hugging Face directory) and a heads checkpoint."""
    from tools import export_vllm

    monkeypatch.setenv("CLP_JAX_CACHE", str(tmp_path / "cache"))
    heads, out, _ = exported
    save_heads(str(tmp_path / "heads"), heads, heads.cfg.layer_config().replace(num_layers=2))
    assert export_vllm.main(["--model", out, "--heads", str(tmp_path / "heads"), "--out", str(tmp_path / "again")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _tensors(str(tmp_path / "again")).keys() == _tensors(out).keys()
    medusa = random_heads(tiny_config(), 2)
    save_heads(str(tmp_path / "medusa"), medusa, tiny_config())
    assert export_vllm.main(["--model", out, "--heads", str(tmp_path / "medusa"), "--out", str(tmp_path / "m")]) == 2
    assert "Medusa" in capsys.readouterr().err and not os.path.exists(tmp_path / "m")


def test_refusals(backbone, exported, tmp_path):
    with pytest.raises(mimo.FormatError, match="Medusa"):
        mimo.export(str(tmp_path / "m"), backbone, random_heads(backbone.cfg, 2))
    other = draft_heads(scaled_random_model(tiny_config(intermediate_size=64)))
    with pytest.raises(mimo.FormatError, match="intermediate_size"):
        mimo.export(str(tmp_path / "g"), backbone, other)
    _, out, _ = exported
    with pytest.raises(CheckpointError, match="another backbone"):
        load_heads(out, tiny_config(num_layers=3))
    # an MTP layer with a final norm of its own (a real MiMo checkpoint's) has no clp_jax form
    tensors = {k: jnp.asarray(v) for k, v in _tensors(out).items()}
    tensors[MTP + "final_layernorm.weight"] = tensors[MTP + "final_layernorm.weight"] + 1.0
    bad = tmp_path / "bad"
    bad.mkdir()
    from safetensors.flax import save_file

    save_file(tensors, str(bad / "model.safetensors"))
    for name in ("config.json", "generation_config.json"):
        (bad / name).write_text(open(os.path.join(out, name)).read())
    with pytest.raises(CheckpointError, match="final_layernorm"):
        load_heads(str(bad), backbone.cfg)
