"""Room: `Decoder`, its programs and host API; runs the backbone (the KV cache), leaves commits to AfterPass.

One jit-compiled `lax.while_loop` decoder for every mode: ar, clp, verify, confadapt and gate.

Each loop step feeds a static-width chunk of up to W = k+1 slots per row (1 for `ar`) at that row's own
positions: the committed tokens whose keys/values are not cached yet, followed (in `verify`) by the
drafts to check. Slots beyond a row's count are fed but harmless: they lie above every valid query
position, so causal masking hides them, and the next step overwrites them. Each row then commits a
variable number of tokens (1 .. k+1) into its token buffer. With an adaptive width, each step runs at
the widest row's need (a `lax.switch` over widths 1..W), so a pass feeding no drafts costs an `ar` pass.

What each mode drafts, feeds and commits is its own object (decode/modes.py, decode/verify.py); the shared
tail after every pass is `AfterPass` (decode/after_pass.py). Prefill is its own jitted function and ends with
the same `AfterPass` as a loop step. Prompt lengths and batch sizes are bucketed (powers of two), so a session
compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clp_jax.decode import pass_costs, tree
from clp_jax.decode.after_pass import AfterPass, init_stats
from clp_jax.decode.budget import PROBE_EVERY
from clp_jax.decode.modes import make_mode
from clp_jax.decode.protocol import Step
from clp_jax.decode.state import DRAFT_BUDGETS, DRAFT_SOURCES, MODES, DecodeConfig, DecodeState  # noqa: F401
from clp_jax.model import kv_cache
from clp_jax.model.kv_cache import init_cache
from clp_jax.model.numerics import acceptance_ratio
from clp_jax.model.qwen2 import Qwen2

MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass
class DecodeResult:
    tokens: list[list[int]]  # generated tokens per prompt (EOS included when hit)
    passes: np.ndarray  # [B] backbone passes per row (prefill counted)
    offered: np.ndarray  # [B, k]
    accepted: np.ndarray  # [B, k]
    prefill_seconds: float  # compilation excluded
    decode_seconds: float  # compilation excluded
    # loop passes only (prefill excluded), per row: passes at each fed width [B, W], drafts fed per pass
    # [B, k+1] (verify's budget: index 0 = ar-cost passes), draft steps run [B], cost in one-slot passes
    # from the pass-cost table [B] (ar: its passes), drafts fed by source [B, 2] (heads, lookup)
    widths: np.ndarray | None = None
    fed: np.ndarray | None = None
    draft_steps: np.ndarray | None = None
    cost: np.ndarray | None = None
    source: np.ndarray | None = None
    tree: np.ndarray | None = None  # [B, 2] siblings fed and accepted (verify with a draft tree)
    # DecodeConfig.record_hidden / record_topk: per prompt, arrays over positions 0 .. len(prompt + tokens)
    hidden: list[np.ndarray] | None = None  # [L, D] bf16
    topk_ids: list[np.ndarray] | None = None  # [L, K] (rows before the last prompt position are zero)
    topk_probs: list[np.ndarray] | None = None  # [L, K]
    compiled: bool = False  # the loop compiled during the run (decode_seconds excludes it; its clock is rough)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def ms_per_pass(self) -> float:
        """Decoding ms per batched loop pass (the prefill excluded)."""
        return 1e3 * self.decode_seconds / max(int(self.passes.max()) - 1, 1)

    @property
    def tokens_per_pass(self) -> float:
        return self.num_tokens / max(int(self.passes.sum()), 1)

    @property
    def head_acceptance(self) -> np.ndarray:
        """Per head position: committed drafts / offered drafts."""
        return acceptance_ratio(self.accepted.sum(0), self.offered.sum(0))


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def prompt_bucket(n: int) -> int:
    """The padded prompt length of a prefill: a power of two up to 64, then a multiple of 64 (a 130-token
    prompt runs at 192, not 256: prefill costs as much per token as decoding)."""
    if n <= 64:
        return _bucket(n, MIN_PROMPT_BUCKET)
    return -(-n // 64) * 64


def _compute_dtype_heads(heads, dtype):
    """The heads' parameters cast once to the backbone's compute dtype on CPU: XLA:CPU does not fuse a
    weight conversion into its dots, so bf16 heads would pay a cast of every weight at every draft step
    (measured ~3x the drafting time). Elsewhere low-precision weights stay (they halve the bytes read)."""
    if heads is None or jax.default_backend() != "cpu":
        return heads
    state = nnx.state(heads, nnx.Param)
    if all(x.dtype == dtype or not jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(state)):
        return heads
    graphdef, params, rest = nnx.split(heads, nnx.Param, ...)
    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return nnx.merge(graphdef, params, rest)


class Decoder:
    """Compiles and runs the decoder for one backbone, one set of heads and one DecodeConfig.

    `costs`: the pass-cost table (decode/pass_costs.py) verify's draft budget and the cost statistics read;
    None: this machine's, from the on-disk cache or measured at first use (a few seconds, per batch bucket).
    """

    def __init__(self, model: Qwen2, heads, dc: DecodeConfig, eos_ids: Sequence[int] = (),
                 costs: pass_costs.PassCosts | None = None, remeasure_costs: bool = False):
        cfg = model.cfg
        mode = make_mode(dc)
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
        self.width, self._drafts = mode.width, mode.drafts
        self.slack = 2 * self.width + dc.k
        self.eos_ids = tuple(eos_ids)
        self._model = model
        self._heads = _compute_dtype_heads(heads, cfg.jnp_dtype) if dc.mode != "ar" else None
        self._model_def, self._model_state = nnx.split(model)
        if self._heads is not None:
            self._heads_def, self._heads_state = nnx.split(self._heads)
        else:
            self._heads_def, self._heads_state = None, None
        self._costs_given, self._remeasure = costs, remeasure_costs
        self._costs: dict[int, pass_costs.PassCosts] = {}
        self._compiled: dict = {}
        self.num_compiles = 0
        self.compile_seconds = 0.0

    @property
    def model(self) -> Qwen2:
        return self._model

    # ------------------------------------------------------------------ costs and modes per batch bucket

    def costs(self, batch: int = 1, cache_len: int = 0) -> pass_costs.PassCosts:
        """The pass-cost table at this batch size and cache length (0: a 64-token prompt's; `ar` needs none:
        every pass is one slot)."""
        key = (batch, pass_costs.cache_bucket(cache_len or self._capacity(64)))
        if key not in self._costs:
            if self._costs_given is not None:
                self._costs[key] = self._costs_given
            elif self.dc.mode == "ar":
                self._costs[key] = pass_costs.FLAT
            else:
                W = self.width
                self._costs[key] = pass_costs.load_or_measure(
                    self._model, self._heads if self._drafts else None, max_width=W,
                    draft_widths=(1, W, PROBE_EVERY + W) if self._drafts else (), batch=batch,
                    remeasure=self._remeasure, cache_len=key[1])
        return self._costs[key]

    def clock_check(self, result: "DecodeResult", batch: int, cache_len: int,
                    unit_ms: float | None = None) -> pass_costs.ClockCheck | None:
        """The run's loop passes on the clock against the pass-cost table's model of them, in units of
        `unit_ms` (an `ar` pass timed beside the run) or of the table's one-slot pass (None for `ar` or a given
        table)."""
        if self.dc.mode == "ar" or result.cost is None or not len(result.passes):
            return None
        costs = self.costs(batch, cache_len)
        passes = int(result.passes.max()) - 1  # batched loop steps: the prefill is not one
        return pass_costs.clock_check(costs, float(result.cost.max()), passes, result.decode_seconds, unit_ms)

    def record_clock(self, result: "DecodeResult", batch: int, cache_len: int, unit_ms: float) -> float | None:
        """Folds a run timed beside `ar` (`unit_ms`: its ms per pass) into this machine's table: the overhead per
        pass outside the backbone and drafter that later decoders include (decode/pass_costs.py)."""
        if self._costs_given is not None:
            return None
        return pass_costs.record_clock(self._model, batch, cache_len, self.costs(batch, cache_len),
                                       self.clock_check(result, batch, cache_len, unit_ms))

    def clock_beside_ar(self, runs) -> pass_costs.ClockCheck | None:
        """Several runs, each timed beside an `ar` run of the same prompts, held to the table as one check.
        `runs`: (result, batch, cache_len, ar_ms_per_pass or None) each. A run that did not compile also folds
        the overhead its clock shows into the table for later decoders (`record_clock`)."""
        checks = []
        for result, batch, cache_len, unit_ms in runs:
            checks.append(self.clock_check(result, batch, cache_len, unit_ms))
            if unit_ms and not result.compiled:
                self.record_clock(result, batch, cache_len, unit_ms)
        return pass_costs.ClockCheck.combine(checks)

    def _after_pass(self, batch: int, cache_len: int) -> AfterPass:
        costs = self.costs(batch, cache_len)
        return AfterPass(make_mode(self.dc, costs), costs, self.eos_ids, self.slack)

    # ------------------------------------------------------------------ jitted programs

    def _merge_model_and_heads(self, model_state, heads_state):
        model = nnx.merge(self._model_def, model_state)
        heads = None if self._heads_def is None else nnx.merge(self._heads_def, heads_state)
        return model, heads

    def _fresh_state(self, model, heads, tokens, prompt_len, done, rng, capacity: int, cache_len: int,
                     batch: int):
        """The state of rows about to be prefilled with `tokens` [B, P]: buffers of `capacity` positions,
        a KV cache of `cache_len` (the refill of a few rows caches only their prompt's positions); `batch`:
        the running batch's size (whose mode and pass-cost table they use)."""
        B, P = tokens.shape
        S, k = capacity, self.dc.k
        rec = lambda n, *shape, dtype: jnp.zeros((B, S if n else 0, *shape), dtype)  # noqa: E731
        return DecodeState(
            buf=jnp.zeros((B, S), jnp.int32).at[:, :P].set(tokens),
            length=prompt_len, fed=jnp.zeros((B,), jnp.int32), n_draft=jnp.zeros((B,), jnp.int32),
            n_tree=jnp.zeros((B,), jnp.int32),
            prompt_len=prompt_len, done=done, rng=rng, steps=jnp.zeros((), jnp.int32),
            passes=jnp.zeros((B,), jnp.int32), offered=jnp.zeros((B, k), jnp.int32),
            accepted=jnp.zeros((B, k), jnp.int32), cache=init_cache(self.cfg, B, cache_len),
            mode_state=self._after_pass(batch, S).mode.init_state(B, S, model, heads),
            stats=init_stats(B, self.width, k),
            rec_hidden=rec(self.dc.record_hidden, self.cfg.hidden_size, dtype=jnp.bfloat16),
            rec_topk_ids=rec(self.dc.record_topk, self.dc.record_topk, dtype=jnp.int32),
            rec_topk_probs=rec(self.dc.record_topk, self.dc.record_topk, dtype=jnp.float32))

    def _prefill_pass(self, model, heads, st: DecodeState, tokens, prompt_len, batch: int) -> DecodeState:
        """The prompt's pass over `tokens` [B, P] and the first commit (a batch of `batch`'s AfterPass)."""
        B, P = tokens.shape
        after_pass = self._after_pass(batch, st.buf.shape[1])
        positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
        hidden, cache = model(tokens, positions, st.cache)
        st = st.replace(cache=cache)
        kernel = heads.draft_kernel(model) if after_pass.mode.drafts else None
        step = Step(hidden, tokens, positions, prompt_len - 1, kernel, prefill=True)
        return after_pass(model, heads, st, step)

    def _prefill_impl(self, model_state, heads_state, tokens, prompt_len, done, rng, capacity: int):
        model, heads = self._merge_model_and_heads(model_state, heads_state)
        B = tokens.shape[0]
        st = self._fresh_state(model, heads, tokens, prompt_len, done, rng, capacity, capacity, B)
        return self._prefill_pass(model, heads, st, tokens, prompt_len, B)

    def _refill_impl(self, model_state, heads_state, st: DecodeState, rows, tokens, prompt_len):
        """Prefills new prompts `tokens` [R, P] into rows `rows` [R] of a running batch (index B: a padding
        row, dropped); every other row is left as it was. The new rows' state is built as a prefill of R
        rows with a P-position cache, then scattered in: buffers and statistics whole, the cache's first P
        positions (later positions hold the old prompt's entries, masked by position until overwritten)."""
        model, heads = self._merge_model_and_heads(model_state, heads_state)
        B, S = st.buf.shape
        rng, key = jax.random.split(st.rng)
        sub = self._fresh_state(model, heads, tokens, prompt_len, rows >= B, key, S, tokens.shape[1], B)
        sub = self._prefill_pass(model, heads, sub, tokens, prompt_len, B)

        def put(big, small):
            if big.ndim == 0:  # the step counter and the RNG key stay the batch's
                return big
            return big.at[rows].set(small, mode="drop")

        cache = tuple(big.put_rows(rows, small) for big, small in zip(st.cache, sub.cache))  # [R, K, P, H] in
        rest = jax.tree.map(put, st.replace(cache=()), sub.replace(cache=()))
        return rest.replace(cache=cache, rng=rng)

    def _run_impl(self, model_state, heads_state, st: DecodeState, stop_at):
        model, heads = self._merge_model_and_heads(model_state, heads_state)
        W = self.width
        B, S = st.buf.shape
        after_pass = self._after_pass(B, S)
        # the drafters' output rows [U, D], gathered once here rather than in every loop step
        kernel = heads.draft_kernel(model) if after_pass.mode.drafts else None

        def cond(s):
            return (s.steps < stop_at) & ~jnp.all(s.done)

        def chunk_of(s, w):
            """The w slots each row feeds: tokens [B, w], positions [B, w] and a draft tree's masks (or None)."""
            positions = s.fed[:, None] + jnp.arange(w, dtype=jnp.int32)  # [B, w] where the chunk sits in buf
            chunk = jnp.take_along_axis(s.buf, jnp.clip(positions, 0, S - 1), axis=1)
            masks = None
            if self.dc.tree:  # siblings at their depth's position, masked to their own path
                positions, masks = tree.tree_pass(s.fed, s.length, s.n_draft, s.n_tree, w)
            return chunk, positions, masks

        def feed(s, w):
            """One pass of w slots per row that writes its entries into the cache as it attends (in place)."""
            chunk, positions, masks = chunk_of(s, w)
            hidden, cache = model(chunk, positions, s.cache, tree=masks)
            s = s.replace(cache=cache)
            return after_pass(model, heads, s, Step(hidden, chunk, positions, s.length - s.fed - 1, kernel))

        def feed_reading(rest, cache, w):
            """A branch of the width switch: one pass of w slots per row that only reads the cache; returns
            the state after it (its cache left out) and the chunk's new entries with where to write them,
            padded to W slots (past the cache: dropped), so that every branch returns the same shapes."""
            chunk, positions, masks = chunk_of(rest, w)
            masks = kv_cache.chain(rest.fed, w) if masks is None else masks
            hidden, entries = model(chunk, positions, cache, tree=masks, write=False)  # [B, w, K, H] per layer
            rest = after_pass(model, heads, rest, Step(hidden, chunk, positions, rest.length - rest.fed - 1, kernel))
            pad = ((0, 0), (0, W - w))
            end = cache[0].capacity  # a write position past the cache: dropped
            at = jnp.pad(jnp.where(masks.cached, positions, end), pad, constant_values=end)  # [B, W]
            entries = jax.tree.map(lambda x: jnp.pad(x, pad + ((0, 0),) * (x.ndim - 2)), entries)
            return rest, entries, at

        def body(s):
            if self.dc.adaptive and W > 1:
                # a branch that wrote the cache made XLA copy every layer's cache in and out of the switch
                # (4.5-10 ms per verify pass at batch 1): the branches read it, one scatter per layer follows
                count = jnp.where(s.done, 1, s.length - s.fed + s.n_draft + s.n_tree)  # slots each row needs
                branch = jnp.clip(jnp.max(count), 1, W) - 1
                cache, rest = s.cache, s.replace(cache=())
                rest, entries, at = jax.lax.switch(
                    branch, [functools.partial(feed_reading, w=w) for w in range(1, W + 1)], rest, cache)
                s = rest.replace(cache=tuple(c.write(at, e.k, e.v) for c, e in zip(cache, entries)))
            else:  # one width: the pass writes in place (deferred writes measured ~13% slower at batch 32)
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

    def programs(self, name: str) -> list:
        """The compiled programs of one kind ("run": the loop, "refill", "prefill@S"), one per shape compiled
        (their `as_text()` is the optimized HLO: tools/profile_step.py reads it)."""
        return [c for key, c in self._compiled.items() if key[0] == name]

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
        need = prompt_bucket + self.dc.max_new_tokens + self.slack
        return -(-need // 64) * 64  # round up: fewer distinct shapes

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        """Raises before any compilation if a prompt cannot fit the cache."""
        if not prompts:
            raise ValueError("No prompts given.")
        limit = min(self.dc.max_cache_len, self.cfg.max_position_embeddings)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"Prompt {i} is empty.")
            if len(p) + self.slack > limit:
                raise ValueError(f"Prompt {i} has {len(p)} tokens, more than the cache holds "
                                 f"({limit} positions incl. {self.slack} for one step); "
                                 "shorten it or raise --max-cache-len.")
            if len(p) + self.dc.max_new_tokens + self.slack > limit:
                raise ValueError(f"Prompt {i} ({len(p)} tokens) + max_new_tokens "
                                 f"({self.dc.max_new_tokens}) exceeds the cache ({limit} positions); "
                                 "lower --max-new-tokens or raise --max-cache-len.")

    def start(self, prompts: Sequence[Sequence[int]], seed: int = 0, capacity: int = 0) -> DecodeState:
        """Prefills a batch of prompts (bucketed) and returns the state after the first token(s).
        `capacity`: at least this many cache positions (rows refilled later with longer prompts)."""
        self.check_prompts(prompts)
        n = len(prompts)
        B = _bucket(n, 1)
        P = prompt_bucket(max(len(p) for p in prompts))
        tokens = np.zeros((B, P), np.int32)
        lengths = np.ones((B,), np.int32)
        for i in range(B):  # padding rows repeat prompt 0 and start finished
            p = prompts[i] if i < n else prompts[0]
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        S = max(self._capacity(P), capacity)
        self.costs(B, S)  # measured here (first use on this machine), not while tracing
        args = (self._model_state, self._heads_state, jnp.asarray(tokens), jnp.asarray(lengths),
                jnp.asarray(np.arange(B) >= n), jax.random.key(seed))
        return self._get(f"prefill@{S}", functools.partial(self._prefill_impl, capacity=S), (), args)(*args)

    def refill(self, st: DecodeState, rows: Sequence[int], prompts: Sequence[Sequence[int]]) -> DecodeState:
        """Prefills `prompts` into the (finished) rows `rows` of a running state, which keeps its other rows
        and their caches (continuous batching: decode/batching.py). Donates `st`."""
        self.check_prompts(prompts)
        B, S = st.buf.shape
        if len(rows) != len(prompts) or not 0 < len(rows) <= B:
            raise ValueError(f"refill: {len(rows)} rows for {len(prompts)} prompts in a batch of {B}.")
        P = prompt_bucket(max(len(p) for p in prompts))
        if P + self.dc.max_new_tokens + self.slack > S:
            raise ValueError(f"refill: a prompt of {max(len(p) for p in prompts)} tokens does not fit this "
                             f"batch's cache ({S} positions); start it with a larger capacity.")
        R = _bucket(len(rows), 1)
        tokens = np.zeros((R, P), np.int32)
        lengths = np.ones((R,), np.int32)
        index = np.full((R,), B, np.int32)  # padding rows: index B, dropped
        for i, p in enumerate(prompts):
            tokens[i, :len(p)], lengths[i], index[i] = p, len(p), rows[i]
        tokens[len(prompts):], lengths[len(prompts):] = tokens[0], lengths[0]
        args = (self._model_state, self._heads_state, st, jnp.asarray(index), jnp.asarray(tokens),
                jnp.asarray(lengths))
        return self._get("refill", self._refill_impl, (2,), args)(*args)

    def capacity_for(self, prompts: Sequence[Sequence[int]]) -> int:
        """Cache positions a batch needs to hold any of `prompts` with its continuation."""
        return self._capacity(prompt_bucket(max(len(p) for p in prompts)))

    def advance(self, st: DecodeState, max_steps: int) -> DecodeState:
        """Runs up to max_steps loop iterations (fewer if every row finishes). Donates `st`."""
        self.costs(*st.buf.shape)
        args = (self._model_state, self._heads_state, st, st.steps + max_steps)
        return self._get("run", self._run_impl, (2,), args)(*args)

    def tokens_of(self, st: DecodeState, n: int) -> list[list[int]]:
        buf, length, plen = jax.device_get((st.buf, st.length, st.prompt_len))
        return [buf[i, plen[i]:length[i]].tolist() for i in range(n)]

    def generate(self, prompts: Sequence[Sequence[int]], seed: int = 0) -> DecodeResult:
        """Decodes every prompt to completion in one loop call."""
        B, S = _bucket(len(prompts), 1), self.capacity_for(prompts)
        self.costs(B, S)  # first use on this machine: measured before the clock starts
        c0 = self.compile_seconds
        t0 = time.perf_counter()
        st = self.start(prompts, seed)
        jax.block_until_ready(st.length)
        c1, t1 = self.compile_seconds, time.perf_counter()
        st = self.advance(st, 1 << 30)
        jax.block_until_ready(st.length)
        c2, t2 = self.compile_seconds, time.perf_counter()
        result = self.result_of(st, len(prompts), (t1 - t0) - (c1 - c0), (t2 - t1) - (c2 - c1))
        result.compiled = c2 != c1
        return result

    def result_of(self, st: DecodeState, n: int, prefill_seconds: float, decode_seconds: float) -> DecodeResult:
        passes, offered, accepted, length, stats = jax.device_get(
            (st.passes, st.offered, st.accepted, st.length, st.stats))
        recs = {}
        for name in ("hidden", "topk_ids", "topk_probs"):
            arr = getattr(st, f"rec_{name}")
            if arr.shape[1]:
                arr = np.asarray(jax.device_get(arr))
                recs[name] = [arr[i, :length[i]] for i in range(n)]
        return DecodeResult(self.tokens_of(st, n), passes[:n], offered[:n], accepted[:n],
                            prefill_seconds, decode_seconds, widths=stats["width"][:n], fed=stats["fed"][:n],
                            draft_steps=stats["draft_steps"][:n], cost=stats["cost"][:n],
                            source=stats["source"][:n], tree=stats["tree"][:n], **recs)

    def stream(self, prompts: Sequence[Sequence[int]], seed: int = 0,
               steps_per_call: int = 4) -> Iterator[tuple[list[list[int]], DecodeState]]:
        """Yields (tokens so far per prompt, state) every few steps, until every row finishes."""
        st = self.start(prompts, seed)
        while True:
            yield self.tokens_of(st, len(prompts)), st
            if bool(jnp.all(st.done)):
                return
            st = self.advance(st, steps_per_call)
