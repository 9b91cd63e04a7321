"""The real demo backbone (Qwen2.5-Coder-0.5B-Instruct GGUF) against transformers loading the same file.

Marked `demo`: the first run downloads ~490 MB (cached in $CLP_JAX_CACHE or ~/.cache/clp_jax).
"""

import os

import numpy as np
import pytest

import jax.numpy as jnp

from clp_jax.decode.decoder import Decoder, DecodeConfig
from clp_jax.weights.loading import load_backbone

pytestmark = pytest.mark.demo

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("demo")


@pytest.fixture(scope="module")
def hf_model(backbone):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path = backbone.source
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


def test_demo_logits_match_transformers(backbone, hf_model):
    import torch

    ids = backbone.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    hidden, _ = backbone.model(jnp.asarray([ids]), jnp.arange(len(ids))[None])
    ours = np.asarray(backbone.model.logits(hidden)[0])
    diff = np.abs(ours - ref).max()
    print(f"demo backbone max |logit diff| over {len(ids)} positions: {diff:.2e}")
    assert diff < 1e-3


def test_demo_greedy_tokens_match_transformers(backbone, hf_model):
    import torch

    ids = backbone.tokenizer(PROMPT)["input_ids"]
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                            pad_token_id=backbone.tokenizer.pad_token_id)[0, len(ids):].tolist()
    out = Decoder(backbone.model, None, DecodeConfig(mode="ar", max_new_tokens=32)).generate([ids])
    assert out.tokens[0] == ref


def test_demo_tokenizer_and_chat_template(backbone):
    tok = backbone.tokenizer
    assert tok.decode(tok(PROMPT)["input_ids"]) == PROMPT
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") in backbone.eos_token_ids


def test_torch_free_gguf_tokenizer_matches_transformers(backbone):
    """Our tokenizer (gguf reader, no torch) encodes like transformers' torch-based GGUF loader."""
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    from clp_jax.weights.tokenizer import tokenizer_from_gguf

    path = backbone.source
    ours = tokenizer_from_gguf(path)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in (PROMPT, "Hello  world! 你好 ünïcödé\t\ttabs", "<|im_start|>user\nhi<|im_end|>\n"):
        assert ours(text)["input_ids"] == ref(text)["input_ids"]
    messages = [{"role": "user", "content": "Write a haiku."}]
    assert (ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert (ours.eos_token, ours.pad_token) == (ref.eos_token, ref.pad_token)
