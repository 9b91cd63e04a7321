"""One jit-compiled `lax.while_loop` decoder for every mode: ar, clp, verify, confadapt and gate.

Each loop step feeds a static-width chunk of W = k+1 slots per row (1 for `ar`) at that row's own
positions: the committed tokens whose keys/values are not cached yet, followed (in `verify`) by the
drafts to check. Slots beyond a row's count are fed but harmless: they lie above every valid query
position, so causal masking hides them, and the next step overwrites them. Each row then commits a
variable number of tokens (1 .. k+1) into its token buffer.

  * ar        commit t1 = argmax LM(h_n)                  (or a sample)
  * clp       commit t1 and the first L head tokens, L = argmax CLP(h_n)
  * confadapt commit t1 and the longest prefix of head tokens whose top-1 probability >= tau
  * gate      prior design: heads predict n+1..n+k, an MLP gate accepts a prefix; head 1 replaces t1
  * verify    lossless: drafts are fed with the next pass, the backbone checks them, the longest
              matching prefix plus the backbone's own next token is committed (speculative
              sampling when temperature > 0, so the output distribution equals `ar`'s)

Prefill is its own jitted function and ends with the same `_advance` as a loop step. Prompt lengths
and batch sizes are bucketed (powers of two), so a session compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clp_jax.decode import sampling
from clp_jax.model.kv_cache import LayerCache, init_cache
from clp_jax.model.numerics import acceptance_ratio, prefix_len
from clp_jax.model.qwen2 import Qwen2

MODES = ("ar", "clp", "verify", "confadapt", "gate")
MIN_PROMPT_BUCKET = 16


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


def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, W, ...] gathered at idx [B, J] along axis 1 -> [B, J, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


class Commit(NamedTuple):
    """What one mode decides after a backbone pass, before EOS, budget and capacity cut it."""

    tokens: jax.Array  # [B, k+1] tokens to commit after the row's length
    count: jax.Array  # [B] how many of them (1 .. k+1)
    head_ok: jax.Array  # [B, k] head tokens accepted into `tokens`
    offered: jax.Array  # [B, k] head tokens that were on offer
    head_start: int  # index in `tokens` of head token 0 (1 after t1; 0 for gate and verify)
    anchor: jax.Array | None  # [B] chunk slot of h_n for the next drafts (None: no drafting)
    t1: jax.Array | None  # [B] the backbone's token after the anchor


class Step(NamedTuple):
    """One fed chunk: the trunk's states of it and where each row's last committed token sits."""

    hidden: jax.Array  # [B, W, D]
    chunk: jax.Array  # [B, W] the tokens fed
    positions: jax.Array  # [B, W]
    last: jax.Array  # [B] slot of the last committed token (its state is h_n)


class _Advance:
    """Turns the hidden states of one fed chunk into committed tokens and the next drafts.

    One small function per mode returns a `Commit`; the shared code then drafts (heads modes), cuts
    the commit at EOS / budget / capacity and writes it.
    """

    def __init__(self, dc: DecodeConfig, eos_ids: Sequence[int]):
        self.dc = dc
        self.eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
        self.mode_fn = {"ar": self._ar, "clp": self._heads_commit, "confadapt": self._heads_commit,
                        "gate": self._gate, "verify": self._verify}[dc.mode]

    def __call__(self, model: Qwen2, heads, st: DecodeState, step: Step) -> DecodeState:
        dc, sc, k = self.dc, self.dc.sampling, self.dc.k
        B, S = st.buf.shape
        rows = jnp.arange(B)
        rng, key_mode, key_draft = jax.random.split(st.rng, 3)
        active = ~st.done
        j = jnp.arange(k + 1)

        c, drafts = self.mode_fn(model, heads, st, step, key_mode, key_draft)

        # Stop at the first EOS, the token budget, or the cache's capacity.
        in_span = j[None, :] < c.count[:, None]
        is_eos = jnp.isin(c.tokens, self.eos) & in_span
        has_eos = jnp.any(is_eos, axis=-1)
        n_commit = jnp.where(has_eos, jnp.argmax(is_eos, axis=-1) + 1, c.count)
        n_commit = jnp.minimum(n_commit, dc.max_new_tokens - (st.length - st.prompt_len))
        new_length = st.length + n_commit
        finished = has_eos | (new_length - st.prompt_len >= dc.max_new_tokens)
        finished |= new_length + dc.slack > S

        write = jnp.where(active[:, None] & (j[None, :] < n_commit[:, None]), st.length[:, None] + j, S)
        buf = st.buf.at[rows[:, None], write].set(c.tokens, mode="drop")  # S = dropped
        n_next, draft_q = jnp.zeros((B,), jnp.int32), st.draft_q
        if dc.mode == "verify":  # the drafts wait in the buffer, fed with the bonus token next pass
            n_next = jnp.full((B,), k, jnp.int32)
            if dc.verify_drafts == "clp":
                n_next = jnp.minimum(jnp.argmax(drafts.length_logits, -1), k).astype(jnp.int32)
            n_next = jnp.where(finished, 0, n_next)
            if not sc.greedy:
                draft_q = sampling.probs(drafts.logits, sc)  # [B, k, V]
            write = jnp.where(active[:, None] & (j[None, :k] < n_next[:, None]), new_length[:, None] + j[:k], S)
            buf = buf.at[rows[:, None], write].set(drafts.tokens, mode="drop")
            fed = new_length - 1  # the bonus token is fed with the drafts
        else:
            fed = st.length  # everything committed before this step is now cached
        draft_cache = st.draft_cache if drafts is None else drafts.cache

        def keep(new, old):
            mask = active.reshape(active.shape + (1,) * (new.ndim - 1))
            return jnp.where(mask, new, old)

        # a head token counts as accepted only inside the (EOS- and budget-cut) committed span
        in_commit = j[None, :k] + c.head_start < n_commit[:, None]
        return st.replace(
            buf=buf, length=keep(new_length, st.length), fed=keep(fed, st.fed),
            n_draft=keep(n_next, st.n_draft), draft_q=keep(draft_q, st.draft_q),
            done=st.done | finished, rng=rng, passes=st.passes + active,
            offered=st.offered + (c.offered & active[:, None]),
            accepted=st.accepted + (c.head_ok & in_commit & active[:, None]),
            draft_cache=draft_cache,
        )

    # ------------------------------------------------------------------ drafting

    def _draft(self, model, heads, st: DecodeState, step: Step, anchor, t1, key):
        """The heads' k drafts after `anchor` (whose next token is t1), greedy unless verify samples."""
        sc = self.dc.sampling
        W = step.chunk.shape[1]
        slot = jnp.arange(W)[None, :]
        shifted = jnp.concatenate([step.chunk[:, 1:], step.chunk[:, -1:]], axis=1)  # token after each slot
        next_tokens = jnp.where(slot == anchor[:, None], t1[:, None], shifted)

        def pick(j, logits):
            if self.dc.mode == "verify" and not sc.greedy:
                return sampling.sample(jax.random.fold_in(key, j), sampling.probs(logits, sc))
            return jnp.argmax(logits, -1).astype(jnp.int32)

        return heads.draft(model, step.hidden, next_tokens, step.positions, anchor, self.dc.k,
                           st.draft_cache, pick)

    # ------------------------------------------------------------------ one function per mode

    def _ar(self, model, heads, st, step, key, key_draft):
        """ar: the backbone's next token t1."""
        B, k = step.chunk.shape[0], self.dc.k
        h = _take_rows(step.hidden, step.last[:, None])[:, 0]  # [B, D]
        t1 = sampling.choose(key, model.logits(h), self.dc.sampling)
        none = jnp.zeros((B, k), bool)
        return Commit(jnp.pad(t1[:, None], ((0, 0), (0, k))), jnp.ones((B,), jnp.int32), none, none, 1,
                      None, None), None

    def _heads_commit(self, model, heads, st, step, key, key_draft):
        """clp / confadapt: t1 from the backbone plus the accepted prefix of the heads' drafts."""
        dc, sc, k = self.dc, self.dc.sampling, self.dc.k
        h = _take_rows(step.hidden, step.last[:, None])[:, 0]  # [B, D]
        t1_logits = model.logits(h)
        t1 = sampling.choose(key, t1_logits, sc)
        d = self._draft(model, heads, st, step, step.last, t1, key_draft)
        if dc.mode == "clp" and dc.clp_confidence is None:
            n_heads = jnp.minimum(jnp.argmax(d.length_logits, -1), k)
        elif dc.mode == "clp":  # P(L* >= l) is a reversed cumulative sum; it only falls with l
            p = jax.nn.softmax(d.length_logits, axis=-1)  # [B, K+1] over all trained lengths
            at_least = jnp.flip(jnp.cumsum(jnp.flip(p, -1), -1), -1)  # mass beyond k counts for l <= k
            n_heads = jnp.sum(at_least[:, 1:k + 1] >= dc.clp_confidence, axis=-1)
        else:  # confadapt
            conf = jnp.max(jax.nn.softmax(d.logits, axis=-1), axis=-1)  # [B, k]
            n_heads = prefix_len(conf >= dc.tau)
        if not sc.greedy and heads.drafter is None:  # Medusa heads continue the greedy t1 only
            n_heads = jnp.where(t1 == jnp.argmax(t1_logits, -1), n_heads, 0)
        j = jnp.arange(k)
        tokens = jnp.concatenate([t1[:, None], d.tokens], axis=1)  # [B, k+1]
        commit = Commit(tokens, (1 + n_heads).astype(jnp.int32), j[None, :] < n_heads[:, None],
                        jnp.ones_like(d.tokens, bool), 1, step.last, t1)
        return commit, d

    def _gate(self, model, heads, st, step, key, key_draft):
        """gate (prior design): heads for n+1 .. n+k, head 1 replacing t1 when the gate accepts it."""
        dc, k = self.dc, self.dc.k
        h = _take_rows(step.hidden, step.last[:, None])[:, 0]  # [B, D]
        prop = heads.propose_gate(model, h, k)
        t1 = sampling.choose(key, prop.t1_logits, dc.sampling)
        drafts = jnp.argmax(prop.draft_logits, -1).astype(jnp.int32)  # [B, k] for n+1 .. n+k
        m = prefix_len(jax.nn.sigmoid(prop.length_logits) >= dc.gate_threshold)
        tokens = jnp.where((m > 0)[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
                           jnp.pad(t1[:, None], ((0, 0), (0, k))))
        ok = jnp.arange(k)[None, :] < m[:, None]
        return Commit(tokens, jnp.maximum(m, 1), ok, jnp.ones_like(ok), 0, None, None), None

    def _verify(self, model, heads, st, step, key, key_draft):
        """verify (lossless): the longest prefix of the fed drafts the backbone confirms, plus its own
        next token; then new drafts after it. Scores J = min(k+1, W) rows: a narrow chunk (adaptive
        width) carries fewer drafts."""
        sc, k = self.dc.sampling, self.dc.k
        hidden, chunk, i0 = step.hidden, step.chunk, step.last
        B, W = chunk.shape
        J = min(k + 1, W)
        rows = jnp.arange(B)
        j = jnp.arange(J)
        idx = jnp.clip(i0[:, None] + j, 0, W - 1)  # [B, J]
        logits = model.logits(_take_rows(hidden, idx))  # [B, J, V]
        drafts = _take_rows(chunk, jnp.clip(idx[:, :J - 1] + 1, 0, W - 1))  # [B, J-1] d_j sits at i0 + j
        valid = j[None, :J - 1] < st.n_draft[:, None]
        if sc.greedy:
            target = jnp.argmax(logits, -1).astype(jnp.int32)  # [B, J]
            n_acc = prefix_len((drafts == target[:, :J - 1]) & valid)
            bonus = target[rows, n_acc]
        else:
            key_u, key_x = jax.random.split(key)
            p = sampling.probs(logits, sc)  # [B, J, V]
            q = st.draft_q[:, :J - 1]
            p_d = jnp.take_along_axis(p[:, :J - 1], drafts[..., None], -1)[..., 0]  # [B, J-1]
            q_d = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
            u = jax.random.uniform(key_u, (B, J - 1))
            n_acc = prefix_len((u * q_d < p_d) & valid)  # accept with probability min(1, p/q)
            p_a = p[rows, n_acc]  # [B, V]
            q_a = st.draft_q[rows, jnp.minimum(n_acc, k - 1)]
            residual = jnp.maximum(p_a - q_a, 0.0)
            rejected = (n_acc < st.n_draft) & (jnp.sum(residual, -1) > 0)
            dist = jnp.where(rejected[:, None], residual / jnp.sum(residual, -1, keepdims=True), p_a)
            bonus = sampling.sample(key_x, dist)
        padded = jnp.pad(drafts, ((0, 0), (0, k + 2 - J)))  # [B, k+1]
        tokens = jnp.where(jnp.arange(k + 1)[None, :] < n_acc[:, None], padded, bonus[:, None])
        anchor = i0 + n_acc  # slot of the last accepted token: its state is h_n for the next drafts
        d = self._draft(model, heads, st, step, anchor, bonus, key_draft)
        jk = jnp.arange(k)[None, :]
        commit = Commit(tokens, n_acc + 1, jk < n_acc[:, None], jk < st.n_draft[:, None], 0, anchor, bonus)
        return commit, d


@dataclasses.dataclass
class DecodeResult:
    tokens: list[list[int]]  # generated tokens per prompt (EOS included when hit)
    passes: np.ndarray  # [B] backbone passes per row (prefill counted)
    offered: np.ndarray  # [B, k]
    accepted: np.ndarray  # [B, k]
    prefill_seconds: float  # compilation excluded
    decode_seconds: float  # compilation excluded

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_pass(self) -> float:
        return self.num_tokens / max(int(self.passes.sum()), 1)

    @property
    def head_acceptance(self) -> np.ndarray:
        """Per head position: committed drafts / offered drafts."""
        return acceptance_ratio(self.accepted.sum(0), self.offered.sum(0))


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


class Decoder:
    """Compiles and runs the decoder for one backbone, one set of heads and one DecodeConfig."""

    def __init__(self, model: Qwen2, heads, dc: DecodeConfig, eos_ids: Sequence[int] = ()):
        cfg = model.cfg
        if dc.mode != "ar":
            if heads is None:
                raise ValueError(f"Mode {dc.mode!r} needs MTP heads (--heads); only 'ar' runs without.")
            hc = heads.cfg
            if (hc.hidden_size, hc.vocab_size) != (cfg.hidden_size, cfg.vocab_size):
                raise ValueError(
                    f"These heads were trained for another backbone (hidden size {hc.hidden_size}, "
                    f"vocabulary {hc.vocab_size}); this backbone has {cfg.hidden_size} and {cfg.vocab_size}.")
            if dc.k > hc.k:
                raise ValueError(f"k={dc.k} is larger than the {hc.k} heads these heads provide; "
                                 f"use --k {hc.k} or fewer.")
            if dc.mode == "gate" and heads.gate is None:
                raise ValueError("Mode 'gate' needs heads trained with the gate baseline (HeadsConfig.gate).")
        self.cfg, self.dc = cfg, dc
        self.eos_ids = tuple(eos_ids)
        self._model_def, self._model_state = nnx.split(model)
        if heads is not None:
            self._heads_def, self._heads_state = nnx.split(heads)
        else:
            self._heads_def, self._heads_state = None, None
        self._advance = _Advance(dc, self.eos_ids)
        self._compiled: dict = {}
        self.num_compiles = 0
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------ jitted programs

    def _merge(self, model_state, heads_state):
        model = nnx.merge(self._model_def, model_state)
        heads = None if self._heads_def is None else nnx.merge(self._heads_def, heads_state)
        return model, heads

    def _prefill_impl(self, model_state, heads_state, tokens, prompt_len, done, rng):
        model, heads = self._merge(model_state, heads_state)
        B, P = tokens.shape
        S = self._capacity(P)
        k = self.dc.k
        vq = self.cfg.vocab_size if (self.dc.mode == "verify" and not self.dc.sampling.greedy) else 0
        st = DecodeState(
            buf=jnp.zeros((B, S), jnp.int32).at[:, :P].set(tokens),
            length=prompt_len, fed=jnp.zeros((B,), jnp.int32), n_draft=jnp.zeros((B,), jnp.int32),
            draft_q=jnp.zeros((B, k if vq else 0, vq), jnp.float32), prompt_len=prompt_len, done=done,
            rng=rng, steps=jnp.zeros((), jnp.int32), passes=jnp.zeros((B,), jnp.int32),
            offered=jnp.zeros((B, k), jnp.int32), accepted=jnp.zeros((B, k), jnp.int32),
            cache=init_cache(self.cfg, B, S),
            draft_cache=() if heads is None else heads.init_cache(B, S, self.cfg.jnp_dtype))
        positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
        hidden, cache = model(tokens, positions, st.cache)
        st = st.replace(cache=cache)
        return self._advance(model, heads, st, Step(hidden, tokens, positions, prompt_len - 1))

    def _run_impl(self, model_state, heads_state, st: DecodeState, stop_at):
        model, heads = self._merge(model_state, heads_state)
        W = self.dc.width
        S = st.buf.shape[1]

        def cond(s):
            return (s.steps < stop_at) & ~jnp.all(s.done)

        def feed(s, w):
            positions = s.fed[:, None] + jnp.arange(w, dtype=jnp.int32)  # [B, w]
            chunk = jnp.take_along_axis(s.buf, jnp.clip(positions, 0, S - 1), axis=1)
            hidden, cache = model(chunk, positions, s.cache)
            s = s.replace(cache=cache)
            return self._advance(model, heads, s, Step(hidden, chunk, positions, s.length - s.fed - 1))

        def body(s):
            if self.dc.adaptive_width and W > 1:
                count = jnp.where(s.done, 1, s.length - s.fed + s.n_draft)  # slots each row needs
                branch = jnp.clip(jnp.max(count), 1, W) - 1
                s = jax.lax.switch(branch, [functools.partial(feed, w=w) for w in range(1, W + 1)], s)
            else:
                s = feed(s, W)
            return s.replace(steps=s.steps + 1)

        return jax.lax.while_loop(cond, body, st)

    def _get(self, name, fn, donate, args):
        key = (name,) + tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args[2:]))
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
            self.num_compiles += 1
        return self._compiled[key]

    def memory_bytes(self) -> int:
        """Arguments + outputs + temporaries - aliased buffers of the largest compiled program (XLA's
        own memory analysis: weights, KV cache and scratch of one decoding run)."""
        best = 0
        for compiled in self._compiled.values():
            m = compiled.memory_analysis()
            if m is not None:
                best = max(best, m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                           - m.alias_size_in_bytes)
        return best

    # ------------------------------------------------------------------ host API

    def _capacity(self, prompt_bucket: int) -> int:
        need = prompt_bucket + self.dc.max_new_tokens + self.dc.slack
        return -(-need // 64) * 64  # round up: fewer distinct shapes

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        """Raises before any compilation if a prompt cannot fit the cache."""
        if not prompts:
            raise ValueError("No prompts given.")
        limit = min(self.dc.max_cache_len, self.cfg.max_position_embeddings)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"Prompt {i} is empty.")
            if len(p) + self.dc.slack > limit:
                raise ValueError(f"Prompt {i} has {len(p)} tokens, more than the cache holds "
                                 f"({limit} positions incl. {self.dc.slack} for one step); "
                                 "shorten it or raise --max-cache-len.")
            if len(p) + self.dc.max_new_tokens + self.dc.slack > limit:
                raise ValueError(f"Prompt {i} ({len(p)} tokens) + max_new_tokens "
                                 f"({self.dc.max_new_tokens}) exceeds the cache ({limit} positions); "
                                 "lower --max-new-tokens or raise --max-cache-len.")

    def start(self, prompts: Sequence[Sequence[int]], seed: int = 0) -> DecodeState:
        """Prefills a batch of prompts (bucketed) and returns the state after the first token(s)."""
        self.check_prompts(prompts)
        n = len(prompts)
        B = _bucket(n, 1)
        P = _bucket(max(len(p) for p in prompts), MIN_PROMPT_BUCKET)
        tokens = np.zeros((B, P), np.int32)
        lengths = np.ones((B,), np.int32)
        for i in range(B):  # padding rows repeat prompt 0 and start finished
            p = prompts[i] if i < n else prompts[0]
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        args = (self._model_state, self._heads_state, jnp.asarray(tokens), jnp.asarray(lengths),
                jnp.asarray(np.arange(B) >= n), jax.random.key(seed))
        return self._get("prefill", self._prefill_impl, (), args)(*args)

    def advance(self, st: DecodeState, max_steps: int) -> DecodeState:
        """Runs up to max_steps loop iterations (fewer if every row finishes). Donates `st`."""
        args = (self._model_state, self._heads_state, st, st.steps + max_steps)
        return self._get("run", self._run_impl, (2,), args)(*args)

    def tokens_of(self, st: DecodeState, n: int) -> list[list[int]]:
        buf, length, plen = jax.device_get((st.buf, st.length, st.prompt_len))
        return [buf[i, plen[i]:length[i]].tolist() for i in range(n)]

    def generate(self, prompts: Sequence[Sequence[int]], seed: int = 0) -> DecodeResult:
        """Decodes every prompt to completion in one loop call."""
        c0 = self.compile_seconds
        t0 = time.perf_counter()
        st = self.start(prompts, seed)
        jax.block_until_ready(st.length)
        c1, t1 = self.compile_seconds, time.perf_counter()
        st = self.advance(st, 1 << 30)
        jax.block_until_ready(st.length)
        c2, t2 = self.compile_seconds, time.perf_counter()
        return self.result_of(st, len(prompts), (t1 - t0) - (c1 - c0), (t2 - t1) - (c2 - c1))

    def result_of(self, st: DecodeState, n: int, prefill_seconds: float, decode_seconds: float) -> DecodeResult:
        passes, offered, accepted = jax.device_get((st.passes, st.offered, st.accepted))
        return DecodeResult(self.tokens_of(st, n), passes[:n], offered[:n], accepted[:n],
                            prefill_seconds, decode_seconds)

    def stream(self, prompts: Sequence[Sequence[int]], seed: int = 0,
               steps_per_call: int = 4) -> Iterator[tuple[list[list[int]], DecodeState]]:
        """Yields (tokens so far per prompt, state) every few steps, until every row finishes."""
        st = self.start(prompts, seed)
        while True:
            yield self.tokens_of(st, len(prompts)), st
            if bool(jnp.all(st.done)):
                return
            st = self.advance(st, steps_per_call)
