"""The benchmark's peers: Hugging Face transformers (torch) decoding the very same weights.

`TransformersPeer` builds a `Qwen2ForCausalLM` from a converted `Qwen2` (no second download, no
second dequantization), and times greedy `generate` and its prompt-lookup decoding
(`prompt_lookup_num_tokens`). Needs torch (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from clp_jax.weights.convert import hf_tensors
from clp_jax.model.qwen2 import Qwen2

PEERS = ("hf_greedy", "hf_lookup")


@dataclasses.dataclass
class PeerResult:
    tokens: list[int]  # generated tokens (EOS included when hit)
    seconds: float  # wall time of `generate`, end to end
    passes: int  # forward passes of the torch model (prefill included)


def hf_config(cfg) -> "transformers.Qwen2Config":  # noqa: F821
    import transformers

    return transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


class TransformersPeer:
    """transformers' `generate` on the weights of `model`, in float32 on the CPU."""

    def __init__(self, model: Qwen2, eos_ids: Sequence[int], pad_id: int | None = None):
        try:
            import torch
            import transformers
        except ImportError as e:
            raise RuntimeError("The transformers peers need torch: pip install -e '.[bench]'") from e
        cfg = model.cfg
        if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            raise ValueError("transformers' Qwen2 needs head_dim * num_heads == hidden_size.")
        self.torch = torch
        hf = transformers.Qwen2ForCausalLM(hf_config(cfg)).eval()
        state = {name: torch.from_numpy(w) for name, w in hf_tensors(model).items()}
        if cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise RuntimeError(f"Weights do not fit transformers' Qwen2: missing {missing}, "
                               f"unexpected {unexpected}.")
        if cfg.tie_word_embeddings:
            hf.tie_weights()
        self.model = hf
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self._passes = 0
        hf.register_forward_hook(self._count)

    def _count(self, module, args, output):
        self._passes += 1

    def generate(self, prompt: Sequence[int], max_new_tokens: int, lookup_tokens: int = 0) -> PeerResult:
        """Greedy decoding of one prompt; lookup_tokens > 0 switches on prompt-lookup drafting."""
        torch = self.torch
        ids = torch.tensor([list(prompt)], dtype=torch.long)
        kw = dict(prompt_lookup_num_tokens=lookup_tokens) if lookup_tokens else {}
        self._passes = 0
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=self.eos_ids or None,
                                      pad_token_id=self.pad_id, **kw)
            seconds = time.perf_counter() - t0
        tokens = out[0, ids.shape[1]:].tolist()
        if self.eos_ids:  # cut after the first EOS (generate pads finished rows)
            for i, t in enumerate(tokens):
                if t in self.eos_ids:
                    tokens = tokens[:i + 1]
                    break
        return PeerResult(tokens, seconds, self._passes)
