"""Conversion parity: tiny random Hugging Face Qwen2 (tied and untied) and GGUF against transformers."""

import numpy as np
import pytest

import jax.numpy as jnp

from clp_jax.weights import convert
from clp_jax.model.config import ModelConfig


def _logits(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = model(jnp.asarray(tokens), positions)
    return np.asarray(model.logits(hidden))


def test_hf_parity_batch_of_two(tiny_hf, rng):
    torch = pytest.importorskip("torch")
    hf_model, path = tiny_hf
    model = convert.convert_hf_dir(path)
    assert model.cfg.tie_word_embeddings == hf_model.config.tie_word_embeddings
    tokens = rng.randint(0, 128, size=(2, 17))
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens)).logits.numpy()
    diff = np.abs(_logits(model, tokens) - ref).max()
    print(f"max |logit diff| ({'tied' if model.cfg.tie_word_embeddings else 'untied'}): {diff:.2e}")
    assert diff < 1e-4


def test_hf_parity_with_padding(tiny_hf, rng):
    """A right-padded row of a batch matches the same sequence run alone."""
    torch = pytest.importorskip("torch")
    hf_model, path = tiny_hf
    model = convert.convert_hf_dir(path)
    tokens = rng.randint(0, 128, size=(2, 12))
    valid = np.ones((2, 12), bool)
    valid[1, 7:] = False
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    hidden, _ = model(jnp.asarray(tokens), positions, kv_valid=jnp.asarray(valid))
    out = np.asarray(model.logits(hidden))
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens[1:, :7])).logits.numpy()
    assert np.abs(out[1, :7] - ref[0]).max() < 1e-4


def _write_gguf(path, hf_model, quantize_type=None):
    import gguf

    cfg = hf_model.config
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    names = {hf: g for g, hf in [
        ("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight")]}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    state = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, t in state.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{per_layer[rest]}"
        else:
            gname = names[name]
        arr = t.float().numpy()
        if quantize_type is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, quantize_type), raw_dtype=quantize_type)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_matches_safetensors(tiny_hf, tmp_path, rng):
    hf_model, path = tiny_hf
    gguf_path = str(tmp_path / "tiny.gguf")
    _write_gguf(gguf_path, hf_model)
    from_gguf = convert.convert_gguf(gguf_path)
    from_st = convert.convert_hf_dir(path)
    assert from_gguf.cfg == from_st.cfg.replace(max_position_embeddings=from_gguf.cfg.max_position_embeddings)
    tokens = rng.randint(0, 128, size=(2, 9))
    diff = np.abs(_logits(from_gguf, tokens) - _logits(from_st, tokens)).max()
    print(f"max |logit diff| GGUF vs safetensors: {diff:.2e}")
    assert diff == 0.0


def test_gguf_quantized_dequantizes(tiny_hf, tmp_path, rng):
    """A Q8_0 GGUF dequantizes to nearly the same model (vocab and widths are multiples of 32)."""
    import gguf

    hf_model, path = tiny_hf
    gguf_path = str(tmp_path / "tiny-q8.gguf")
    _write_gguf(gguf_path, hf_model, quantize_type=gguf.GGMLQuantizationType.Q8_0)
    tokens = rng.randint(0, 128, size=(1, 9))
    a, b = _logits(convert.convert_gguf(gguf_path), tokens), _logits(convert.convert_hf_dir(path), tokens)
    assert np.abs(a - b).max() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.8


def test_every_parameter_set_exactly_once(tiny_hf):
    _, path = tiny_hf
    cfg = ModelConfig.from_hf_config(f"{path}/config.json")
    tensors = list(convert.iter_safetensors(path))
    with pytest.raises(convert.ConversionError, match="missing"):
        convert.params_from_tensors(cfg, tensors[1:])
    with pytest.raises(convert.ConversionError, match="twice"):
        convert.params_from_tensors(cfg, tensors + tensors[:1])
    name, w = next((n, w) for n, w in tensors if n.endswith("q_proj.weight"))
    with pytest.raises(convert.ConversionError, match="shape"):
        convert.params_from_tensors(cfg, [(n, w[:-1] if n == name else t) for n, t in tensors])
    with pytest.raises(convert.ConversionError, match="Unexpected"):
        convert.params_from_tensors(cfg, tensors + [("model.extra.weight", w)])


def test_tied_checkpoint_with_stored_lm_head():
    """Some tied exporters still store lm_head.weight: it is checked against the embedding and dropped."""
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8, tie_word_embeddings=True)
    from clp_jax.model.qwen2 import init_model

    ref = init_model(cfg)
    flat = convert.flat_params(ref)
    tensors = list(convert.hf_tensors(ref).items())
    embed = np.asarray(flat["embed.embedding"])
    model = convert.params_from_tensors(cfg, tensors + [("lm_head.weight", embed)])
    for key, value in convert.flat_params(model).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat[key]), err_msg=key)
    with pytest.raises(convert.ConversionError, match="differs"):
        convert.params_from_tensors(cfg, tensors + [("lm_head.weight", embed + 1.0)])
