"""Room: the decoder's data, `DecodeConfig` and the loop state `DecodeState`; definitions only, no logic."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from clp_jax.decode import sampling
from clp_jax.model.kv_cache import LayerCache

MODES = ("ar", "clp", "verify", "confadapt", "gate")
# verify: how many drafts each pass feeds. "auto": the draft budget (decode/budget.py: drafts only while they
# pay for their measured cost); "fixed": all k; "clp": the CLP's predicted number.
DRAFT_BUDGETS = ("auto", "fixed", "clp")
# verify: where drafts come from. "heads": the drafter; "lookup": a suffix match over the prompt and the
# committed text (prompt lookup); "both": per step, the retrieved continuation where the text's last tokens
# occurred before, else the drafter's (measured on held-out prompts: decode/verify.py).
DRAFT_SOURCES = ("heads", "lookup", "both")


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
    draft_budget: str = "auto"  # verify: DRAFT_BUDGETS
    draft_source: str = "both"  # verify: DRAFT_SOURCES
    # per step, feed only as many slots as the widest row needs (lax.switch over widths 1..k+1: k+1 times the
    # compile time; pays where a wider pass costs more, e.g. CPU). None: on with a varying budget (auto, clp)
    adaptive_width: bool | None = None
    # verify: up to this many siblings beside the chain (a draft tree: the drafter's runner-up at depths 1..tree,
    # each a leaf), checked in the same pass (decode/tree.py); the budget picks how many per pass (0: a chain)
    tree: int = 0
    max_cache_len: int = 4096  # upper bound on prompt + generated tokens + one chunk
    # ar only: keep the trunk's hidden state of every position (bf16) and the top-`record_topk` of the
    # backbone's next-token distribution at every generated anchor, so self-distilled training records
    # cost one pass (clp_jax/train/feature_store.py); 0 = no soft labels
    record_hidden: bool = False
    record_topk: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Unknown mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.draft_budget not in DRAFT_BUDGETS:
            raise ValueError(f"draft_budget must be one of {', '.join(DRAFT_BUDGETS)}, got {self.draft_budget!r}.")
        if self.draft_source not in DRAFT_SOURCES:
            raise ValueError(f"draft_source must be one of {', '.join(DRAFT_SOURCES)}, got {self.draft_source!r}.")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}.")
        if self.clp_confidence is not None and not 0.0 < self.clp_confidence <= 1.0:
            raise ValueError(f"clp_confidence must be in (0, 1], got {self.clp_confidence}.")
        if (self.record_hidden or self.record_topk) and self.mode != "ar":
            raise ValueError("Recording hidden states / soft labels is for 'ar' (self-distillation) only.")
        if self.tree:
            if self.mode != "verify":
                raise ValueError(f"tree={self.tree}: draft trees are verified by mode 'verify' only.")
            if not 0 < self.tree <= self.k:
                raise ValueError(f"tree must be in 0..k ({self.k}): one sibling per chain depth, got {self.tree}.")
            if self.draft_source == "lookup":
                raise ValueError("tree: siblings are the drafter's runners-up; use --draft-source heads or both.")
        if not 0 <= self.record_topk <= 64:
            raise ValueError(f"record_topk must be in 0..64, got {self.record_topk}.")

    def replace(self, **kw) -> "DecodeConfig":
        return dataclasses.replace(self, **kw)

    @property
    def adaptive(self) -> bool:
        """Whether each step runs at the widest row's need (see `adaptive_width`)."""
        if self.adaptive_width is not None:
            return self.adaptive_width
        return self.mode == "verify" and self.draft_budget != "fixed"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    buf: jax.Array  # [B, S] prompt, committed tokens, then pending drafts (fed with the next chunk)
    length: jax.Array  # [B] committed tokens, prompt included
    fed: jax.Array  # [B] tokens whose keys/values are in the cache
    n_draft: jax.Array  # [B] pending drafts stored after `length` (verify)
    n_tree: jax.Array  # [B] pending siblings stored after the drafts (verify with a draft tree)
    prompt_len: jax.Array  # [B]
    done: jax.Array  # [B] bool
    rng: jax.Array
    steps: jax.Array  # [] loop iterations run
    passes: jax.Array  # [B] backbone passes while the row was active, prefill included
    offered: jax.Array  # [B, k] drafts offered at each head position
    accepted: jax.Array  # [B, k] drafts committed at each head position
    cache: tuple[LayerCache, ...]
    mode_state: Any  # the mode's own state (decode/modes.py, `init_state`), e.g. the draft layer's KV cache
    # per row, loop passes only (prefill excluded): passes run at each width [B, W], drafts fed [B, k+1]
    # (verify), draft steps run [B], cost in one-slot passes from the pass-cost table [B], draft source
    # of the fed drafts [B, 2] (heads, lookup)
    stats: dict
    # DecodeConfig.record_hidden / record_topk (else zero-length): per position of the buffer
    rec_hidden: jax.Array  # [B, S, D] bf16 trunk state of the token at each position
    rec_topk_ids: jax.Array  # [B, S, K] int32 top-K next-token ids at each generated anchor
    rec_topk_probs: jax.Array  # [B, S, K] float32 their probabilities (greedy distribution, T=1)

    def replace(self, **kw) -> "DecodeState":
        return dataclasses.replace(self, **kw)
