"""What the decoder is asked for and what it carries: `DecodeConfig` and the loop state `DecodeState`."""

from __future__ import annotations

import dataclasses

import jax

from clp_jax.decode import sampling
from clp_jax.model.kv_cache import LayerCache

MODES = ("ar", "clp", "verify", "confadapt", "gate")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    mode: str = "ar"
    k: int = 4  # heads used (<= heads trained)
    max_new_tokens: int = 128
    sampling: sampling.SamplingConfig = sampling.SamplingConfig()
    tau: float = 0.9  # confadapt threshold on the heads' top-1 probability
    # clp: None = the paper's argmax of the CLP; p = accept the most heads l with P(L* >= l) >= p under the
    # CLP's softmax (a conservative margin for weak heads)
    clp_confidence: float | None = None
    gate_threshold: float = 0.5  # gate: accept while sigmoid(gate logit) >= this
    verify_drafts: str = "all"  # verify: feed all k drafts, or the CLP's predicted number ("clp")
    adaptive_width: bool = False  # per step, feed only as many slots as the widest row needs
    # (lax.switch over widths 1..k+1: k+1 times the compile time; pays where a wider pass costs more, e.g. CPU)
    max_cache_len: int = 4096  # upper bound on prompt + generated tokens + one chunk

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Unknown mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.verify_drafts not in ("all", "clp"):
            raise ValueError(f"verify_drafts must be 'all' or 'clp', got {self.verify_drafts!r}.")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}.")
        if self.clp_confidence is not None and not 0.0 < self.clp_confidence <= 1.0:
            raise ValueError(f"clp_confidence must be in (0, 1], got {self.clp_confidence}.")

    @property
    def width(self) -> int:
        """Slots fed per step."""
        return 1 if self.mode == "ar" else self.k + 1

    @property
    def slack(self) -> int:
        """Cache positions one step may touch beyond the committed length (commits, drafts, chunk)."""
        return 2 * self.width + self.k


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    buf: jax.Array  # [B, S] prompt, committed tokens, then pending drafts (verify)
    length: jax.Array  # [B] committed tokens, prompt included
    fed: jax.Array  # [B] tokens whose keys/values are in the cache
    n_draft: jax.Array  # [B] drafts stored after `length` (verify)
    draft_q: jax.Array  # [B, k, V] distributions the drafts were sampled from (verify, T > 0)
    prompt_len: jax.Array  # [B]
    done: jax.Array  # [B] bool
    rng: jax.Array
    steps: jax.Array  # [] loop iterations run
    passes: jax.Array  # [B] backbone passes while the row was active, prefill included
    offered: jax.Array  # [B, k] drafts offered at each head position
    accepted: jax.Array  # [B, k] drafts committed at each head position
    cache: tuple[LayerCache, ...]
    draft_cache: tuple[LayerCache, ...]  # the draft layer's own cache (empty for Medusa heads)

    def replace(self, **kw) -> "DecodeState":
        return dataclasses.replace(self, **kw)


