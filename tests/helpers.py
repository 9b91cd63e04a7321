"""Test-only models and drafters whose behaviour is known."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clp_jax.model.config import ModelConfig
from clp_jax.drafting.heads import Drafts, Heads, HeadsConfig
from clp_jax.model.qwen2 import init_model
from clp_jax.decode.pass_costs import PassCosts


# This CPU's pass-cost shape (DESIGN.md 7-8): 2-4 slots ~1.35-1.40x a one-slot pass, a draft step ~0.075. Tests
# that assert how much the draft budget feeds use it: a table timed on a tiny model is microseconds of noise.
CPU_COSTS = PassCosts(width=(1.0, 1.35, 1.38, 1.40, 1.55),
                      draft_first=(0.075, 0.08, 0.085, 0.09, 0.1, 0.1, 0.1, 0.1, 0.1, 0.11, 0.11, 0.12), draft_step=0.075)


def tiny_config(**kw) -> ModelConfig:
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False)
    fields.update(kw)
    return ModelConfig(**fields)


def scaled_random_model(cfg: ModelConfig, seed: int = 0, logit_scale: float = 1.0):
    """A random model; logit_scale sharpens its next-token distributions."""
    model = init_model(cfg, seed)
    if logit_scale != 1.0:
        if cfg.tie_word_embeddings:
            model.embed.embedding[...] = model.embed.embedding[...] * logit_scale
        else:
            model.lm_head.kernel[...] = model.lm_head.kernel[...] * logit_scale
    return model


def random_heads(model_cfg: ModelConfig, k: int, seed: int = 1, scale: float = 0.3, **kw) -> Heads:
    """Heads with random (non-zero) weights: drafts that are sometimes right, often wrong."""
    heads = Heads(HeadsConfig(hidden_size=model_cfg.hidden_size, vocab_size=model_cfg.vocab_size, k=k, **kw),
                  rngs=nnx.Rngs(seed))
    state = nnx.state(heads, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.normal(kk, x.shape, x.dtype) * scale for kk, x in zip(keys, leaves)]
    nnx.update(heads, jax.tree.unflatten(treedef, leaves))
    return heads


def zero_heads(model_cfg: ModelConfig, k: int, **kw) -> Heads:
    """Freshly initialised heads: each repeats the LM head's token; the CLP picks L=0."""
    return Heads(HeadsConfig(hidden_size=model_cfg.hidden_size, vocab_size=model_cfg.vocab_size, k=k, **kw),
                 rngs=nnx.Rngs(0))


def forced_length_heads(model_cfg: ModelConfig, k: int, length: int) -> Heads:
    """Zero heads whose CLP always predicts `length` (its bias alone decides)."""
    heads = zero_heads(model_cfg, k)
    heads.clp.linear.bias[...] = jnp.zeros((k + 1,)).at[length].set(10.0)
    return heads


class OracleHeads(nnx.Module):
    """Drafts the backbone's own greedy continuation, read from a reference table [B, T].

    Row b of the table holds the full greedy sequence (prompt + continuation) of batch row b.
    Its CLP always predicts `length` (default: all k heads).
    """

    def __init__(self, model_cfg: ModelConfig, k: int, reference: np.ndarray, length: int | None = None):
        self.cfg = HeadsConfig(hidden_size=model_cfg.hidden_size, vocab_size=model_cfg.vocab_size, k=k,
                               gate=False)
        self.reference = nnx.Variable(jnp.asarray(reference, jnp.int32))
        self.length = k if length is None else length
        self.gate = None

    drafter = None

    def init_cache(self, batch, capacity, dtype=None):
        return ()

    def draft_kernel(self, backbone):
        return None

    def draft(self, backbone, hidden, next_tokens, positions, anchor, k, cache, pick, kernel=None):
        rows = jnp.arange(hidden.shape[0])
        position = positions[rows, anchor]  # n: drafts are the reference's tokens n+2 .. n+k+1
        ref = self.reference[...]
        idx = jnp.clip(position[:, None] + 2 + jnp.arange(k), 0, ref.shape[1] - 1)
        logits = 30.0 * jax.nn.one_hot(jnp.take_along_axis(ref, idx, axis=1), self.cfg.vocab_size)
        tokens = jnp.stack([pick(j, logits[:, j]) for j in range(k)], axis=1)
        length_logits = jnp.broadcast_to(jax.nn.one_hot(self.length, k + 1), (hidden.shape[0], k + 1))
        return Drafts(logits, tokens, length_logits, cache)


def reference_table(prompts, continuations, rows: int, width: int) -> np.ndarray:
    """[rows, width] of prompt + continuation per row; rows beyond the prompts repeat row 0."""
    table = np.zeros((rows, width), np.int32)
    for i in range(rows):
        seq = list(prompts[i if i < len(prompts) else 0]) + list(continuations[i if i < len(prompts) else 0])
        table[i, :len(seq)] = seq
    return table


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(vocab_size: int = 300):
    """A real byte-level BPE tokenizer trained on a few lines of code, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int\n    y: int\n"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    out.chat_template = CHAT_TEMPLATE
    return out
