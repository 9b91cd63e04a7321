"""Room: the pass-cost table; times the backbone and drafter, writes only its on-disk cache.

What a decoding pass costs on this machine: a table measured once per machine and backbone, cached on disk.

`PassCosts.width[w-1]` is the cost of one backbone pass feeding w slots per row, relative to a one-slot pass
(so `width[0] == 1.0`); `draft_first[w-1]` the drafter's first step over a w-slot chunk (the draft layer writes
its cache for the whole chunk in it) and `draft_step` each further chained step, on the same scale;
`overhead` what every loop pass costs outside the backbone and the drafter (the mode's own kernels, the
loop's bookkeeping), on the same scale. `verify`'s draft budget reads them to weigh one more draft against its
cost, and the decoder adds them up per row, so a run's modelled cost is known (`DecodeResult.cost`) and can be
held against its clock (`clock_check`).

Measurement (`measure`) times the whole model's one-slot pass (the table's unit, in ms) and, for the ratios
between widths, a shallow copy of the trunk (its first layers, same weights) and the output projection
separately at each width, at the cache length decoding uses (attention reads the whole static
cache, so a pass costs what its cache holds, not what is filled), each writing its cache in place (donated) as
the loop's passes do, interleaved over rounds, and takes medians:
cost(w) = head(w) + L/n * layers_n(w); on a loaded machine load hits every width alike. The drafter is timed
the same way, its further steps as the slope of a chain run in one call. Every timing is taken less its call's
dispatch (a no-op call with the same arguments, timed beside it): passes inside the jitted loop pay none. The
overhead cannot be timed apart from a running loop, so it is measured from one: a run timed beside `ar`
(`decode.py --compare ar`, the bench) holds its clock against the table's model in units of `ar`'s pass of the
same run (`clock_check`; this machine's speed drifts 15-25% within an hour, so the table's own
unit, timed at another moment, cannot be), and the table keeps a running mean of the difference per pass
(`record_clock`), which every later decoder includes. Tables live under
`cache_dir("pass_costs")`, one JSON file per device kind, backbone geometry, layout, dtype, batch and cache
bucket; `load_or_measure` fills in what is missing and `remeasure=True` discards what is there.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clp_jax.decode.chain import draft_scores
from clp_jax.drafting.draft_layer import DraftLayer
from clp_jax.model.kv_cache import init_cache
from clp_jax.model.qwen2 import Qwen2, abstract_model, resolve_layout
from clp_jax.weights.assets import cache_dir

log = logging.getLogger(__name__)

SHALLOW_LAYERS = 4  # layers of the timed trunk copy (the per-layer cost is scaled to the full depth)
CHAIN_STEPS = 4  # the drafter's further steps are timed as a chain of this many in one call
# 6: the overhead in one-slot passes, from runs whose unit (an ar pass) was timed beside them; 7: every timing
# less its call's dispatch (a no-op call with the same arguments), the drafter's further steps from one chain;
# 8: the timed passes write their cache in place (donated), as the loop's do
VERSION = 8
MIN_CACHE_BUCKET = 128
# running mean of the measured per-pass overhead: weight of the newest run. Every run records (the bench: each
# prompt), and one prompt's clock says little: at 0.5 the term was the last two prompts' and swung between 0 and
# 8 ms per pass within an hour (2026-12-07), while whole bench runs showed 0-5 ms; at 0.1 it is ~10 runs' mean.
OVERHEAD_RATE = 0.1
MIN_CLOCK_PASSES = 8  # runs with fewer loop passes say too little about the overhead to be recorded


def cache_bucket(cache_len: int) -> int:
    """The cache length a table is timed at: the power of two at or above `cache_len` (at least 128)."""
    return max(MIN_CACHE_BUCKET, 1 << (max(int(cache_len), 1) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class PassCosts:
    """Relative costs (a one-slot backbone pass = 1.0); tuples, so a config holding one stays hashable."""

    width: tuple[float, ...]  # [W] a pass feeding w = 1..W slots per row
    draft_first: tuple[float, ...] = (0.0,)  # [Wd] the drafter's first step over a w = 1..Wd slot chunk
    draft_step: float = 0.0  # one further step of the chain (draft layer; 0 for drafters that draft at once)
    ms: float = 0.0  # a one-slot pass in ms when measured (0: a given table)
    overhead: float = 0.0  # every loop pass, outside the backbone and the drafter (measured from runs' clocks)

    def __post_init__(self):
        if not self.width or abs(self.width[0] - 1.0) > 1e-6:
            raise ValueError(f"PassCosts.width must start at 1.0 (a one-slot pass), got {self.width}.")
        if any(c <= 0 for c in self.width) or any(c < 0 for c in self.draft_first) or self.draft_step < 0:
            raise ValueError("PassCosts entries must be positive (widths) or >= 0 (drafting).")
        if self.overhead < 0:
            raise ValueError(f"PassCosts.overhead must be >= 0, got {self.overhead}.")

    @staticmethod
    def _at(table: Sequence[float], w: int) -> float:
        return float(table[min(max(w, 1), len(table)) - 1])

    def pass_cost(self, w: int) -> float:
        """A w-slot loop pass, its overhead included (widths past the table cost what its widest entry costs)."""
        return self._at(self.width, w) + self.overhead

    def draft_cost(self, first_width: int, steps: int) -> float:
        """A chain of `steps` draft steps whose first runs over `first_width` slots (0 steps: nothing)."""
        if steps <= 0:
            return 0.0
        return self._at(self.draft_first, first_width) + (steps - 1) * self.draft_step

    def widths(self, n: int) -> jax.Array:
        """[n] the cost of widths 1..n as a constant for jitted code."""
        return jnp.asarray([self.pass_cost(w) for w in range(1, n + 1)], jnp.float32)

    def firsts(self, n: int) -> jax.Array:
        return jnp.asarray([self._at(self.draft_first, w) for w in range(1, n + 1)], jnp.float32)

    def format(self) -> str:
        """Two lines for logs and reports."""
        ms = f" ({self.ms:.1f} ms)" if self.ms else ""
        line = "pass cost by fed width (x a 1-slot pass" + ms + "): " + " ".join(
            f"{w}:{c:.2f}" for w, c in enumerate(self.width, 1))
        over = f" + {self.overhead:.3f} per pass outside the backbone" + (
            f" ({self.overhead * self.ms:.1f} ms)" if self.ms else "")
        first = " ".join(f"{w}:{c:.3f}" for w, c in enumerate(self.draft_first, 1))
        return line + over + f"\ndraft step: {self.draft_step:.3f}; first step by chunk width: {first}"


FLAT = PassCosts(width=(1.0,))  # every width costs a one-slot pass, drafting is free: feed every draft


# ---------------------------------------------------------------------- measuring


def _time(fns: dict, rounds: int) -> dict:
    """Seconds of each zero-argument function per round [rounds], interleaved (after one warm-up call each)."""
    for f in fns.values():
        jax.block_until_ready(f())
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for key, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[key].append(time.perf_counter() - t0)
    return {key: np.asarray(t) for key, t in times.items()}


# A call that does nothing with the arguments of a timed one: what dispatching it costs (flattening the
# parameters' pytree, handing their buffers over), which a pass inside the jitted decode loop never pays.
_noop = jax.jit(lambda *args: jnp.zeros((), jnp.float32), keep_unused=True)


def _shallow(model: Qwen2, n: int) -> Qwen2:
    """The model's first n layers (same arrays, no copy) as a model of depth n."""
    graphdef, _ = nnx.split(abstract_model(model.cfg.replace(num_layers=n)))
    state = nnx.state(model)
    layers = state["layers"]
    state["layers"] = type(layers)({i: layers[i] for i in range(n)})
    return nnx.merge(graphdef, state)


def _chunk(model: Qwen2, batch: int, w: int, context: int) -> tuple:
    """(hidden [B, w, D], tokens [B, w], positions [B, w]): a w-slot chunk after `context` committed tokens."""
    return (jnp.ones((batch, w, model.cfg.hidden_size), model.cfg.jnp_dtype), jnp.full((batch, w), 7, jnp.int32),
            jnp.broadcast_to(context + jnp.arange(w, dtype=jnp.int32), (batch, w)))


def _pass_fns(model: Qwen2, widths: Sequence[int], batch: int, cache_len: int = MIN_CACHE_BUCKET) -> dict:
    """Per width: ('trunk', w) the shallow trunk over w slots with a `cache_len` cache; ('head', w) logits of w
    rows; ('whole', 1) the whole model's one-slot pass; (..., 'noop') each one's dispatch."""
    n = min(SHALLOW_LAYERS, model.cfg.num_layers)
    shallow = _shallow(model, n)
    tg, ts = nnx.split(shallow)
    mg, ms = nnx.split(model)
    context = cache_len // 2  # attention reads all cache_len slots whatever the fill
    # each timed pass writes its cache in place, as the decoding loop's passes do: the cache is donated and the
    # next call gets it back (a cache not donated is copied whole into the output, which no loop pass pays: at
    # batch 1 and 512 slots that copy is ~15% of a one-slot trunk pass, and it made wider passes look cheaper)
    caches = {"trunk": init_cache(shallow.cfg, batch, cache_len), "whole": init_cache(model.cfg, batch, cache_len)}

    @functools.partial(jax.jit, donate_argnums=3)
    def trunk(state, tokens, positions, cache):
        hidden, cache = nnx.merge(tg, state)(tokens, positions, cache)
        return hidden[:, -1, :8], cache

    @jax.jit
    def head(state, hidden):
        return jnp.argmax(nnx.merge(mg, state).logits(hidden), axis=-1)

    @functools.partial(jax.jit, donate_argnums=3)
    def whole(state, tokens, positions, cache):  # the real one-slot pass: its ms is the table's unit
        m = nnx.merge(mg, state)
        hidden, cache = m(tokens, positions, cache)
        return jnp.argmax(m.logits(hidden[:, -1]), -1), cache

    def in_place(fn, name, *args):
        out, caches[name] = fn(*args, caches[name])
        return out

    fns = {}
    for w in widths:
        hidden, tokens, positions = _chunk(model, batch, w, context)
        fns["trunk", w] = lambda t=tokens, p=positions: in_place(trunk, "trunk", ts, t, p)
        fns["head", w] = lambda h=hidden: head(ms, h)
    fns["trunk", "noop"] = lambda t=tokens, p=positions: _noop(ts, t, p, caches["trunk"])
    fns["head", "noop"] = lambda h=hidden: _noop(ms, h)
    one, at = jnp.full((batch, 1), 7, jnp.int32), jnp.full((batch, 1), context, jnp.int32)
    fns["whole", 1] = lambda: in_place(whole, "whole", ms, one, at)
    fns["whole", "noop"] = lambda: _noop(ms, one, at, caches["whole"])
    return fns, model.cfg.num_layers / n


def _draft_fns(model: Qwen2, heads, widths: Sequence[int], batch: int, context: int = 64) -> dict:
    """('first', w): the drafter's first step over a w-slot chunk with one row of draft logits, as one call;
    ('noop', w) a call with the same arguments that does nothing (its dispatch); draft layer: ('chain', n) n
    chained steps in one call, so a further step's cost is (chain(n) - first(1)) / (n - 1), free of dispatch.
    Medusa-style drafters: their whole k-draft call as the first step."""
    kernel = heads.draft_kernel(model)
    cache = heads.init_cache(batch, context + 64, model.cfg.jnp_dtype)
    mg, ms = nnx.split(model)
    hg, hs = nnx.split(heads)
    fns = {}
    if isinstance(heads.drafter, DraftLayer):
        def chain_of(n):
            @jax.jit
            def chain(ms, hs, hidden, tokens, positions, cache):  # n chained steps as decode/chain.py runs them
                m, h = nnx.merge(mg, ms), nnx.merge(hg, hs)
                score = lambda j, f: draft_scores(h, m, f, kernel, None, j, jnp.float32(1.0))[1:3]  # noqa: E731
                anchor = jnp.full((batch,), hidden.shape[1] - 1, jnp.int32)
                outs, _ = h.drafter.chain(m, hidden, tokens, positions, anchor, n, cache, score)
                return jnp.stack([o[0] for o in outs], 1)
            return chain

        one, longer = chain_of(1), chain_of(CHAIN_STEPS)
        for w in sorted(set(widths) | {1}):
            args = _chunk(model, batch, w, context)
            fns["first", w] = lambda a=args: one(ms, hs, *a, cache)
            fns["noop", w] = lambda a=args: _noop(ms, hs, *a, cache)
        args = _chunk(model, batch, 1, context)
        fns["chain", CHAIN_STEPS] = lambda: longer(ms, hs, *args, cache)
        return fns
    k = heads.cfg.k

    @jax.jit
    def whole(ms, hs, hidden, tokens, positions):
        m, h = nnx.merge(mg, ms), nnx.merge(hg, hs)
        pick = lambda j, logits: jnp.argmax(logits, -1).astype(jnp.int32)  # noqa: E731
        anchor = jnp.zeros((batch,), jnp.int32)
        return h.draft(m, hidden, tokens, positions, anchor, k, cache, pick, kernel).tokens

    args = _chunk(model, batch, 1, context)
    fns["first", 1] = lambda: whole(ms, hs, *args)
    fns["noop", 1] = lambda: _noop(ms, hs, *args)
    return fns


def drafter_signature(heads) -> str | None:
    """What the drafting cost depends on (None: a drafter this module cannot time, e.g. a test double)."""
    if heads is None or not hasattr(heads, "drafter") or heads.drafter is None:
        return None
    vocab = heads.draft_vocab[...].shape[0] if heads.draft_vocab is not None else heads.cfg.vocab_size
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(nnx.state(heads.drafter, nnx.Param))})
    return f"{heads.cfg.kind}-k{heads.cfg.k}-u{vocab}-{'+'.join(dtypes)}"


def measure(model: Qwen2, heads=None, widths: Sequence[int] = (1, 2, 3, 4), draft_widths: Sequence[int] = (),
            batch: int = 1, rounds: int = 15, cache_len: int = MIN_CACHE_BUCKET) -> dict:
    """Times passes at `widths` with a `cache_len` cache (and the drafter at `draft_widths`), interleaved; returns
    the raw entry
    {'ms': a one-slot pass, 'width': {w: relative}, 'drafters': {signature: {'first': {w: rel}, 'step': rel}}}."""
    t0 = time.perf_counter()
    log.info("measuring this machine's pass costs (once per backbone geometry; cached under %s)",
             cache_dir("pass_costs"))
    widths = sorted(set(widths) | {1})
    fns, scale = _pass_fns(model, widths, batch, cache_len)
    sig = drafter_signature(heads)
    if sig is not None:
        dfns = _draft_fns(model, heads, sorted(set(draft_widths) | {1}), batch)
        fns.update({("draft",) + key: f for key, f in dfns.items()})
    t = _time(fns, rounds)
    # inside the jitted loop no pass pays a call's dispatch: each timing less its no-op call's, round by round
    net = lambda key, noop: np.maximum(t[key] - t[noop], 1e-6)  # noqa: E731
    # each round's costs relative to its own one-slot pass (load drifts between rounds), then the median
    per_round = {w: net(("head", w), ("head", "noop")) + scale * net(("trunk", w), ("trunk", "noop"))
                 for w in widths}  # [rounds] each
    rel = {w: float(np.median(per_round[w] / per_round[1])) for w in widths}
    for a, b in zip(widths, widths[1:]):  # a pass over more slots never costs less (noise aside)
        rel[b] = max(rel[b], rel[a])
    # the unit is the whole model's one-slot pass, timed as it runs (a shallow trunk scaled up overstates it: the
    # per-call costs scale too); the shallow timings give the ratios between widths
    unit = net(("whole", 1), ("whole", "noop"))  # [rounds]
    out = {"ms": 1e3 * float(np.median(unit)), "width": rel, "drafters": {}}
    if sig is not None:
        first = {key[2]: float(np.median(net(key, ("draft", "noop", key[2])) / unit))
                 for key in t if key[:2] == ("draft", "first")}
        step = 0.0  # Medusa heads draft at once
        if isinstance(heads.drafter, DraftLayer):  # further steps: the chain's slope, in one call (no dispatch)
            longer = t["draft", "chain", CHAIN_STEPS] - t["draft", "first", 1]
            step = float(np.median(np.maximum(longer, 1e-6) / (CHAIN_STEPS - 1) / unit))
        out["drafters"][sig] = {"first": first, "step": step}
    log.info("measured pass costs in %.1f s (%d widths%s)", time.perf_counter() - t0, len(widths),
             ", drafter" if sig else "")
    return out


# ---------------------------------------------------------------------- the on-disk table


def table_key(model: Qwen2, batch: int, cache_len: int = MIN_CACHE_BUCKET) -> dict:
    """What a table depends on: device kind, backbone geometry, matmul layout, dtype, batch rows, cache bucket."""
    cfg = model.cfg
    geometry = {k: v for k, v in cfg.to_dict().items()
                if k not in ("dtype", "param_dtype", "matmul_layout", "max_position_embeddings", "rope_theta",
                             "rms_norm_eps")}
    return {"version": VERSION, "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "geometry": geometry, "layout": resolve_layout(cfg), "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
            "batch": batch, "cache": cache_bucket(cache_len)}


def table_path(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir("pass_costs"), f"{key['device'].replace(' ', '_').replace('/', '_')}-{digest}.json")


def _read(path: str) -> dict | None:
    """A cached table, or None: absent, or unreadable (truncated, not JSON), which is said and measured again."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
        if not isinstance(entry, dict):
            raise ValueError(f"it holds a JSON {type(entry).__name__}, not an object")
        return entry
    except (OSError, ValueError) as e:
        log.warning("pass-cost table %s is unreadable (%s): measuring this machine's pass costs again "
                    "(it is rewritten afterwards).", path, e)
        return None


def _write(path: str, entry: dict) -> None:
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entry, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader sees the old table or the new one


def check_against(model: Qwen2, batch: int, costs: PassCosts, observed_ms: float, tolerance: float = 1.5,
                  cache_len: int = MIN_CACHE_BUCKET) -> str:
    """Compares the table's one-slot pass (`costs.ms`) with one measured now (e.g. `ar`'s ms per pass in the
    same process). Where they differ by more than `tolerance`x, the machine's load has changed since the
    table was timed, so its relative costs are suspect too: the cached table is marked stale (the next
    decoder re-times it) and a note saying so is returned; '' when they agree or nothing can be compared."""
    if not costs.ms or observed_ms <= 0 or max(costs.ms / observed_ms, observed_ms / costs.ms) <= tolerance:
        return ""
    path = table_path(table_key(model, batch, cache_len))
    entry = _read(path)
    reason = (f"its one-slot pass took {costs.ms:.1f} ms when timed ({entry.get('measured', '?') if entry else '?'}),"
              f" {observed_ms:.1f} ms in a run of {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if entry is not None and abs(float(entry.get("ms") or 0.0) - costs.ms) < 1e-6:  # still the table used
        entry["stale"] = reason
        _write(path, entry)
    return (f"note: the pass-cost table is stale ({reason}): the draft budget weighed drafts with it; the next "
            "run re-times it (or now: --remeasure-costs)")


def _interp(points: dict, n: int) -> tuple[float, ...]:
    """Values at widths 1..n from measured {"w": value} (linear between measured widths, flat beyond)."""
    ws = sorted(int(w) for w in points)
    return tuple(float(np.interp(w, ws, [points[str(x)] for x in ws])) for w in range(1, n + 1))


def load_or_measure(model: Qwen2, heads=None, max_width: int = 4, draft_widths: Sequence[int] = (),
                    batch: int = 1, remeasure: bool = False, rounds: int = 15,
                    cache_len: int = MIN_CACHE_BUCKET) -> PassCosts:
    """This machine's table for widths 1..max_width (and the drafter's first step at `draft_widths`) at a
    cache of `cache_len` (timed at its bucket), from the cache where it has them, else measured now (a few
    seconds) and stored."""
    key = table_key(model, batch, cache_len)
    path = table_path(key)
    entry = None if remeasure else _read(path)
    if entry is not None and entry.get("key") != key:
        entry = None
    entry = entry or {"key": key, "ms": None, "width": {}, "drafters": {}}
    sig = drafter_signature(heads)
    need_w = [w for w in range(1, max_width + 1) if str(w) not in entry["width"]]
    d = entry["drafters"].get(sig, {"first": {}, "step": 0.0}) if sig else None
    if entry.get("stale"):
        log.info("re-timing the pass-cost table: %s", entry["stale"])
        entry = {"key": key, "ms": None, "width": {}, "drafters": {}}
        need_w, d = list(range(1, max_width + 1)), {"first": {}, "step": 0.0} if sig else None
    need_d = [w for w in sorted(set(draft_widths) | {1}) if sig and str(w) not in d["first"]]
    if need_w or need_d:
        # widths are timed together (relative to w=1 of the same run), so a missing width re-times the cached
        # ones too; a drafter new to the table is timed against a one-slot pass of its own run and leaves the
        # widths (and other drafters) as they were, so the table does not depend on which tool ran first
        widths = sorted({int(w) for w in entry["width"]} | set(range(1, max_width + 1))) if need_w else [1]
        dws = sorted(set(int(w) for w in (d or {}).get("first", {})) | set(draft_widths) | {1}) if sig else ()
        new = measure(model, heads, widths, dws, batch, rounds, cache_bucket(cache_len))
        if need_w:
            entry.pop("overhead", None)  # measured against the old widths' clock
            entry["ms"] = new["ms"]
            entry["width"] = {str(w): c for w, c in new["width"].items()}
            entry["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
        for s, dd in new["drafters"].items():
            entry["drafters"][s] = {"first": {str(w): c for w, c in dd["first"].items()}, "step": dd["step"],
                                    "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        _write(path, entry)
    width = _interp(entry["width"], max_width)
    width = (1.0,) + width[1:]
    ms = float(entry["ms"] or 0.0)
    overhead = float(entry.get("overhead") or 0.0)
    if sig is None:
        return PassCosts(width=width, ms=ms, overhead=overhead)
    d = entry["drafters"][sig]
    n_first = max(int(w) for w in d["first"])
    return PassCosts(width=width, draft_first=_interp(d["first"], n_first), draft_step=float(d["step"]),
                     ms=ms, overhead=overhead)


# ---------------------------------------------------------------------- the model against the clock


@dataclasses.dataclass(frozen=True)
class ClockCheck:
    """One run's loop passes: ms per pass on the clock and as the table models them."""

    passes: int  # loop passes (batched steps; the prefill excluded)
    clock_ms: float  # per pass, measured
    modelled_ms: float  # per pass: the table's costs of what ran (backbone, drafting, overhead) x unit_ms
    overhead_ms: float  # per pass, the part of modelled_ms the table puts outside the backbone and drafter
    unit_ms: float = 0.0  # the one-slot pass the model is scaled by
    unit: str = "table"  # where unit_ms comes from: "table" (timed with the table) or "ar" (this run's ar passes)

    @property
    def error(self) -> float:
        """modelled / clock - 1."""
        return self.modelled_ms / max(self.clock_ms, 1e-9) - 1.0

    @classmethod
    def combine(cls, checks) -> "ClockCheck | None":
        """Several runs' checks as one, weighted by their passes (None: no passes)."""
        checks = [c for c in checks if c is not None]
        n = sum(c.passes for c in checks)
        if not n:
            return None
        mean = lambda f: sum(f(c) * c.passes for c in checks) / n  # noqa: E731
        units = {c.unit for c in checks}
        return cls(n, mean(lambda c: c.clock_ms), mean(lambda c: c.modelled_ms), mean(lambda c: c.overhead_ms),
                   mean(lambda c: c.unit_ms), units.pop() if len(units) == 1 else "mixed")

    def format(self) -> str:
        unit = ("an ar pass timed in this run" if self.unit == "ar" else "the table's one-slot pass"
                if self.unit == "table" else "mixed units")
        return (f"ms per pass: clock {self.clock_ms:.1f}, modelled {self.modelled_ms:.1f} ({100 * self.error:+.1f}%; "
                f"unit {self.unit_ms:.1f} ms: {unit}; of which {self.overhead_ms:.1f} ms outside the backbone and "
                f"drafter, measured from earlier runs' clocks) over {self.passes} passes")


def clock_check(costs: PassCosts, cost_units: float, passes: int, decode_seconds: float,
                unit_ms: float | None = None) -> ClockCheck | None:
    """A run against its table: `cost_units` the run's modelled cost of its `passes` loop passes in one-slot
    passes (the batch's widest row: the loop runs at its cost), `decode_seconds` its clock. The unit is
    `unit_ms` where given (an `ar` pass timed beside the run: this machine's speed drifts 15-25% within an
    hour, so only a unit timed side by side can be held to a few percent), else the table's own one-slot pass.
    None without a measured table or passes."""
    if not costs.ms or passes <= 0:
        return None
    unit, source = (unit_ms, "ar") if unit_ms else (costs.ms, "table")
    return ClockCheck(passes, 1e3 * decode_seconds / passes, unit * cost_units / passes, unit * costs.overhead,
                      unit, source)


def record_clock(model: Qwen2, batch: int, cache_len: int, costs: PassCosts, check: ClockCheck | None) -> float | None:
    """Folds one run's measured overhead per pass (clock - the table's backbone and drafting, in units of the
    check's one-slot pass) into the table on disk (a running mean), so later decoders include it; returns the
    new overhead in one-slot passes, or None when the run is too short to say, its unit was not timed beside
    it (`ar` in the same run: a table's unit timed at another hour would read the machine's drift as
    overhead), or the table on disk is not the one the run used."""
    if check is None or check.passes < MIN_CLOCK_PASSES or check.unit != "ar":
        return None
    path = table_path(table_key(model, batch, cache_len))
    entry = _read(path)
    if entry is None or abs(float(entry.get("ms") or 0.0) - costs.ms) > 1e-6:
        return None
    seen = (check.clock_ms - (check.modelled_ms - check.overhead_ms)) / check.unit_ms  # this run's, in units
    old = entry.get("overhead")
    new = max(0.0, seen if old is None else (1 - OVERHEAD_RATE) * float(old) + OVERHEAD_RATE * seen)
    entry["overhead"] = round(new, 5)
    entry["overhead_runs"] = int(entry.get("overhead_runs", 0)) + 1
    _write(path, entry)
    return new
