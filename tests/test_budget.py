"""verify's draft budget: hopeless drafts cost (almost) nothing, good drafts are all fed, greedy output stays ar's;
the pass-cost table is measured once and cached; the budget's rule on hand-made confidences."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clp_jax.decode import budget, pass_costs
from clp_jax.decode.budget import Budget, Stats
from clp_jax.decode.decoder import DecodeConfig, Decoder
from clp_jax.drafting.heads import Drafts, Heads, HeadsConfig

from helpers import CPU_COSTS, OracleHeads, reference_table

CPU = CPU_COSTS
NEW = 96


class WrongHeads(OracleHeads):
    """Drafts the token after the backbone's own greedy one (always wrong), with confidence ~1."""

    def draft(self, backbone, hidden, next_tokens, positions, anchor, k, cache, pick, kernel=None):
        d = super().draft(backbone, hidden, next_tokens, positions, anchor, k, cache, pick, kernel)
        wrong = (jnp.argmax(d.logits, -1) + 1) % self.cfg.vocab_size
        logits = 30.0 * jnp.eye(self.cfg.vocab_size)[wrong]
        return Drafts(logits, jnp.stack([pick(j, logits[:, j]) for j in range(k)], 1), d.length_logits, cache)


@pytest.fixture(scope="module")
def long_ar(model, prompts):
    out = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=NEW)).generate(prompts[1:2])
    return out


@pytest.mark.parametrize("source", ["heads", "both"])
def test_always_wrong_drafts_cost_at_most_5_percent_more_than_ar(model, prompts, long_ar, source):
    """A prompt where no draft of the heads is ever right: passes x measured costs within 5% of ar's (with
    drafts from the context as well, which are sometimes right here, it can only be cheaper)."""
    table = reference_table(prompts[1:2], long_ar.tokens, rows=1, width=64 + NEW)
    dc = DecodeConfig(mode="verify", k=3, max_new_tokens=NEW, draft_source=source)
    out = Decoder(model, WrongHeads(model.cfg, 3, table), dc, costs=CPU).generate(prompts[1:2])
    assert out.tokens == long_ar.tokens
    assert source == "both" or out.accepted.sum() == 0
    ar_cost = float(long_ar.cost.sum())  # one per loop pass
    assert ar_cost == NEW - 1
    widths = out.widths.sum(0)
    pass_cost = sum(n * CPU.pass_cost(w) for w, n in enumerate(widths, 1))
    assert float(out.cost.sum()) >= pass_cost  # the decoder's total = passes + drafting
    print(f"wrong drafts ({source}): {float(out.cost.sum()):.2f} one-slot passes against ar's {ar_cost:.0f} "
          f"(passes {pass_cost:.2f}, widths {widths.tolist()}, drafts fed {out.fed.sum(0).tolist()})")
    assert float(out.cost.sum()) <= 1.05 * ar_cost
    if source == "heads":  # once the row has learnt, its probes only look: no further pass is wider than ar's
        assert widths[1:].sum() <= 3
    if source == "heads":  # the fixed budget pays for every wrong draft
        fixed = Decoder(model, WrongHeads(model.cfg, 3, table), dc.replace(draft_budget="fixed"), costs=CPU)
        assert float(fixed.generate(prompts[1:2]).cost.sum()) > 1.3 * ar_cost


def test_right_drafts_are_all_fed(model, prompts, long_ar):
    table = reference_table(prompts[1:2], long_ar.tokens, rows=1, width=64 + NEW)
    dc = DecodeConfig(mode="verify", k=3, max_new_tokens=NEW, draft_source="heads")
    out = Decoder(model, OracleHeads(model.cfg, 3, table), dc, costs=CPU).generate(prompts[1:2])
    assert out.tokens == long_ar.tokens and out.tokens_per_pass > 3.5
    assert out.fed[0, 3] >= out.fed[0].sum() - 1  # every pass feeds all three (the last may be cut)
    assert float(out.cost.sum()) < 0.45 * float(long_ar.cost.sum())


def test_draft_layer_catch_up_keeps_ar_and_saves_cost(model, prompts, long_ar):
    """A draft layer whose drafts rarely pay stops drafting; its cache catches up every few tokens, so
    whenever it drafts, its first draft is the offline chain's (the cache holds every committed entry)."""
    from test_draft_layer import draft_heads

    heads = draft_heads(model, k=3, scale=0.3)  # far from the backbone: mostly wrong
    p = prompts[1]
    dc = DecodeConfig(mode="verify", k=3, max_new_tokens=NEW, draft_source="heads")
    dec = Decoder(model, heads, dc, costs=CPU)
    drafted = []
    st = dec.start([p])
    while not bool(st.done[0]):
        st = dec.advance(st, 1)
        if bool(st.mode_state.drafted[0]) and not bool(st.done[0]):
            drafted.append((int(st.length[0]), int(st.mode_state.first[0]), int(st.mode_state.gap_n[0])))
    auto = dec.result_of(st, 1, 0.0, 0.0)
    fixed = Decoder(model, heads, dc.replace(draft_budget="fixed"), costs=CPU).generate([p])
    assert auto.tokens == long_ar.tokens == fixed.tokens
    steps = int(auto.fed.sum())
    print(f"draft layer: {len(drafted)} drafting passes of {steps}, drafts fed {auto.fed[0].tolist()}, cost "
          f"{float(auto.cost.sum()):.1f} (fixed {float(fixed.cost.sum()):.1f}, ar {NEW - 1})")
    assert len(drafted) < 0.5 * steps  # it stopped drafting
    assert float(auto.cost.sum()) < float(fixed.cost.sum())
    full = jnp.asarray([p + long_ar.tokens[0]], jnp.int32)
    pos = jnp.arange(full.shape[1], dtype=jnp.int32)[None]
    feats = heads.drafter.unrolled(model, model(full, pos)[0], full, 1)[0, 0]  # [T, D]
    want = np.asarray(jnp.argmax(model.logits(feats), -1))
    for length, first, _ in drafted:
        assert first == want[length - 2], length


def test_budget_rule():
    """Sure drafts: feed all; hopeless: none; a weak first draft before sure ones: all (greedy looks at
    every draft computed); the chain goes on while one more draft like the last would raise the value."""
    b = Budget(CPU.width[:4], CPU.draft_step, 3, greedy=True)
    stats = Stats.init(1, 3)
    L = stats.rate()
    assert float(L[0]) == pytest.approx(budget.RATE_INIT)
    D = jnp.asarray([0.075])
    yes = jnp.ones((1,), bool)
    for c, m in (([0.99, 0.99, 0.99], 3), ([0.05, 0.05, 0.05], 0), ([0.3, 0.9, 0.9], 3)):
        conf = b.corrected(jnp.asarray([c]), stats)
        assert int(b.choose(conf, jnp.asarray([3]), D + 0.15, yes[:, None].repeat(3, 1), L)[0]) == m, c
    feed, more = b.after_step(jnp.asarray([[0.5]]), D, yes, L)
    assert bool(feed[0]) and bool(more[0])  # 1.5 + 0.25 + 0.125 - 1.2 x 1.625 beats 1 - 1.2 x 1.075
    feed, more = b.after_step(jnp.asarray([[0.05]]), D, yes, L)
    assert not bool(more[0]) and not bool(feed[0])
    # the online correction: drafts seen wrong at confidence 0.9 count for much less
    wrong = dataclasses.replace(Stats.init(1, 3), seen=jnp.full((1, 3), 20.0), gain=jnp.zeros((1,)))
    c = float(b.corrected(jnp.asarray([[0.9]]), wrong)[0, 0])
    assert c == pytest.approx(0.9 * budget.PRIOR / (20.0 + budget.PRIOR)) and c < 0.3


def test_a_pass_is_valued_at_the_rows_long_run_rate():
    """The rate L follows the tokens and cost of the row's passes (discounted); a draft is fed when its chance
    beats L x the extra width's cost, whatever the drafting already spent (the ratio of each pass, the rule
    before, counted that sunk cost in and so fed less where drafting was dear)."""
    b = Budget(CPU.width[:4], CPU.draft_step, 3, greedy=True)
    yes = jnp.ones((1,), bool)
    s = Stats.init(1, 3)
    s = b.account(s, jnp.asarray([4.0]), jnp.asarray([2.0]), yes)  # a pass: 4 tokens at cost 2
    L0 = budget.RATE_PRIOR * budget.RATE_INIT
    assert float(s.rate()[0]) == pytest.approx((budget.RATE_DISCOUNT * L0 + 4) / (budget.RATE_DISCOUNT * 2 + 2))
    for _ in range(200):  # the prior fades: every pass commits 4 tokens at cost 1.6
        s = b.account(s, jnp.asarray([4.0]), jnp.asarray([1.6]), yes)
    assert float(s.rate()[0]) == pytest.approx(2.5, rel=1e-3)
    idle = b.account(s, jnp.asarray([1.0]), jnp.asarray([1.0]), ~yes)  # a finished row learns nothing
    assert float(idle.rate()[0]) == float(s.rate()[0])
    # feed the first draft iff its chance beats L x (P(2) - P(1)) = L x 0.35, for any sunk drafting cost
    c, steps, fed = jnp.asarray([[0.4, 0.0, 0.0]]), jnp.asarray([1]), jnp.ones((1, 3), bool)
    for D in (0.0, 0.5, 2.0):
        D = jnp.asarray([D])
        assert int(b.choose(c, steps, D, fed, jnp.asarray([1.0]))[0]) == 1  # 0.4 > 0.35
        assert int(b.choose(c, steps, D, fed, jnp.asarray([1.2]))[0]) == 0  # 0.4 < 0.42


def test_a_probe_only_looks():
    """A row whose drafting has not paid drafts one step, feeds nothing, and learns from the free check of
    that draft what feeding it would have earned; a drafting row that fed nothing just paid for drafting."""
    b = Budget(CPU.width[:4], CPU.draft_step, 3, greedy=True)
    k, cost = 3, 0.075
    seasoned = jnp.full((2,), 100.0)  # drafting passes seen: the gain forgets at GAIN_RATE
    stats = dataclasses.replace(Stats.init(2, k), gain=jnp.asarray([-0.2, 0.2]), drafting=seasoned)  # row 0 probes
    assert b.probing(stats).tolist() == [True, False]
    near = dataclasses.replace(stats, gain=jnp.asarray([-0.5, -0.5]) * budget.STOP_MARGIN)
    assert b.probing(near).tolist() == [False, False]  # lost less than the margin: the row feeds on
    conf = jnp.asarray([[0.9, 0, 0], [0.9, 0, 0]])
    none, yes = jnp.zeros((2,), jnp.int32), jnp.ones((2,), bool)
    after = b.observe(stats, conf, none, none, (yes, jnp.ones((2,))), yes, jnp.full((2,), cost), yes)
    g_probe = 1.0 - (CPU.width[1] - CPU.width[0]) - cost
    r, rp = budget.GAIN_RATE, budget.PROBE_WEIGHT  # a probe weighs the PROBE_EVERY tokens it stands for
    assert float(after.gain[0]) == pytest.approx((1 - rp) * -0.2 + rp * g_probe)  # right: drafting resumes
    assert not b.probing(after).tolist()[0]
    assert float(after.gain[1]) == pytest.approx((1 - r) * 0.2 - r * cost)
    assert float(after.hit[0, 0]) == 1.0 and float(after.seen[0, 0]) == pytest.approx(0.9)
    wrong = b.observe(stats, conf, none, none, (yes, jnp.zeros((2,))), yes, jnp.full((2,), cost), yes)
    assert float(wrong.gain[0]) < float(stats.gain[0])
    assert after.drafting.tolist() == [101.0, 101.0]


def test_the_gain_is_a_mean_with_a_prior_then_forgets_slowly():
    """A new row's first drafting pass weighs 1 / (1 + GAIN_PRIOR) against the prior GAIN_INIT (a row whose
    drafts are all wrong stops within a few passes); later passes weigh GAIN_RATE, so a couple of misses in a
    row do not stop a row whose drafts paid for dozens of passes."""
    b = Budget(CPU.width[:4], CPU.draft_step, 3, greedy=True)
    none, yes = jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool)
    three = jnp.full((1,), 3, jnp.int32)
    conf, cost = jnp.full((1, 3), 0.9), jnp.full((1,), 0.1)
    miss = lambda s: b.observe(s, conf, three, none, (~yes, jnp.zeros((1,))), yes, cost, yes)  # noqa: E731
    hit = lambda s: b.observe(s, conf, three, three, (~yes, jnp.zeros((1,))), yes, cost, yes)  # noqa: E731
    g_miss = -(CPU.width[3] - CPU.width[0]) - 0.1
    s = miss(Stats.init(1, 3))
    assert float(s.gain[0]) == pytest.approx((budget.GAIN_PRIOR * budget.GAIN_INIT + g_miss) / (budget.GAIN_PRIOR + 1))
    s = miss(s)
    assert b.probing(s).tolist() == [True]  # two wrong passes from the start: it stops
    s = Stats.init(1, 3)
    for _ in range(40):  # a row whose three drafts were right 40 times
        s = hit(s)
    s = miss(miss(miss(s)))
    assert b.probing(s).tolist() == [False]


def test_pass_cost_table_is_measured_once_and_cached(model, monkeypatch, tmp_path):
    monkeypatch.setenv("CLP_JAX_CACHE", str(tmp_path))
    calls = []
    real = pass_costs.measure
    monkeypatch.setattr(pass_costs, "measure", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    heads = Heads(HeadsConfig.for_backbone(model.cfg, k=2, kind="draft_layer"), rngs=nnx.Rngs(0))
    a = pass_costs.load_or_measure(model, heads, max_width=3, draft_widths=(1, 2, 3, 11), rounds=2)
    assert len(calls) == 1 and len(a.width) == 3 and a.width[0] == 1.0 and len(a.draft_first) == 11
    assert a.draft_step > 0 and all(c > 0 for c in a.width)
    b = pass_costs.load_or_measure(model, heads, max_width=3, draft_widths=(1, 11), rounds=2)
    assert len(calls) == 1 and b == a  # from the cache
    (path,) = [p for p in os.listdir(tmp_path / "pass_costs")]
    entry = json.loads((tmp_path / "pass_costs" / path).read_text())
    assert entry["key"]["layout"] in ("rows", "cols") and entry["key"]["geometry"]["hidden_size"] == 64
    # a Decoder reads the table at first use (widths 1..k+1, drafter 1..k+1 and the catch-up's 8+k+1)
    dec = Decoder(model, heads, DecodeConfig(mode="verify", k=2, max_new_tokens=4))
    assert dec.costs(1) == a and len(calls) == 1
    pass_costs.load_or_measure(model, heads, max_width=3, remeasure=True, rounds=2)
    assert len(calls) == 2


def test_measure_takes_each_call_less_its_dispatch_and_the_draft_step_from_a_chain(model, monkeypatch):
    """Inside the jitted loop no pass pays a call's dispatch: `measure` subtracts each family's no-op call and
    takes the drafter's further step from the slope of a chain run in one call (synthetic timings, in ms)."""
    D = 2.0  # every call's dispatch

    def fake_time(fns, rounds):
        def ms(key):
            if key[-1] == "noop" or key[:2] == ("draft", "noop"):
                return D
            if key[0] == "trunk":
                return D + 1.0 * key[1]  # a shallow trunk's layers over w slots
            if key[0] == "head":
                return D + 0.1 * key[1]
            if key[0] == "whole":
                return D + 10.0
            if key[:2] == ("draft", "first"):
                return D + 0.5 + 0.1 * key[2]
            assert key == ("draft", "chain", pass_costs.CHAIN_STEPS), key
            return D + 0.6 + 0.4 * (pass_costs.CHAIN_STEPS - 1)  # a first step over 1 slot, then 0.4 each
        assert {k for k in fns} >= {("whole", "noop"), ("trunk", "noop"), ("head", "noop")}
        return {key: np.full(rounds, ms(key) / 1e3) for key in fns}

    monkeypatch.setattr(pass_costs, "_time", fake_time)
    heads = Heads(HeadsConfig.for_backbone(model.cfg, k=2, kind="draft_layer"), rngs=nnx.Rngs(0))
    out = pass_costs.measure(model, heads, widths=(1, 2), draft_widths=(1, 3), rounds=3)
    scale = model.cfg.num_layers / min(pass_costs.SHALLOW_LAYERS, model.cfg.num_layers)
    assert out["ms"] == pytest.approx(10.0)
    assert out["width"][2] == pytest.approx((0.2 + scale * 2.0) / (0.1 + scale * 1.0))
    (d,) = out["drafters"].values()
    assert d["first"][1] == pytest.approx(0.06) and d["first"][3] == pytest.approx(0.08)
    assert d["step"] == pytest.approx(0.04)


def test_tables_are_timed_at_the_cache_length_decoding_uses(model, monkeypatch, tmp_path):
    """Attention reads the whole static cache, so a table is per cache bucket, timed at that bucket's length."""
    monkeypatch.setenv("CLP_JAX_CACHE", str(tmp_path))
    seen = []
    real = pass_costs._pass_fns
    monkeypatch.setattr(pass_costs, "_pass_fns", lambda *a: seen.append(a[3]) or real(*a))
    assert [pass_costs.cache_bucket(n) for n in (1, 128, 129, 448, 512, 513)] == [128, 128, 256, 512, 512, 1024]
    a = pass_costs.load_or_measure(model, None, max_width=2, rounds=2, cache_len=448)
    assert seen == [512]
    assert pass_costs.load_or_measure(model, None, max_width=2, rounds=2, cache_len=500) == a and seen == [512]
    pass_costs.load_or_measure(model, None, max_width=2, rounds=2, cache_len=100)
    assert seen == [512, 128] and len(os.listdir(tmp_path / "pass_costs")) == 2


def test_the_overhead_per_pass_is_measured_from_the_clock_and_included(model, monkeypatch, tmp_path):
    """A run's clock minus the table's backbone and drafting, per pass, in units of an ar pass timed beside it,
    becomes the table's overhead (a running mean, never negative); later tables include it in every pass's
    cost; short runs, runs held to the table's own unit and runs of another table are not recorded."""
    monkeypatch.setenv("CLP_JAX_CACHE", str(tmp_path))
    a = pass_costs.load_or_measure(model, None, max_width=3, rounds=2)
    assert a.overhead == 0.0 and a.pass_cost(2) == a.width[1]
    unit = 2.0 * a.ms  # the machine runs at half the speed it had when the table was timed
    units = 40 * a.width[1]  # 40 two-slot passes
    seconds = 40 * (a.width[1] * unit + 3.0) / 1e3  # 3 ms more per pass
    check = pass_costs.clock_check(a, units, 40, seconds, unit)
    assert check.clock_ms == pytest.approx(a.width[1] * unit + 3.0) and check.overhead_ms == 0.0
    assert check.unit == "ar" and check.unit_ms == unit and check.error < 0 and "clock" in check.format()
    on_table = pass_costs.clock_check(a, units, 40, seconds)  # the table's unit reads the drift as overhead
    assert on_table.unit == "table" and on_table.modelled_ms == pytest.approx(a.width[1] * a.ms)
    assert pass_costs.record_clock(model, 1, 128, a, on_table) is None
    assert pass_costs.record_clock(model, 1, 128, a, check) == pytest.approx(3.0 / unit)
    b = pass_costs.load_or_measure(model, None, max_width=3, rounds=2)
    assert b.overhead == pytest.approx(3.0 / unit, rel=1e-3)
    assert b.pass_cost(2) == pytest.approx(b.width[1] + 3.0 / unit, rel=1e-3)
    # the model now agrees with that clock: b's units include the overhead
    same = pass_costs.clock_check(b, 40 * b.pass_cost(2), 40, seconds, unit)
    assert abs(same.error) < 1e-3 and same.overhead_ms == pytest.approx(3.0, rel=1e-3)
    faster = pass_costs.clock_check(b, 40 * b.pass_cost(2), 40, 40 * (b.width[1] * unit + 1.0) / 1e3, unit)
    assert pass_costs.record_clock(model, 1, 128, b, faster) == pytest.approx(
        ((1 - pass_costs.OVERHEAD_RATE) * 3.0 + pass_costs.OVERHEAD_RATE * 1.0) / unit, rel=1e-3)
    never_negative = pass_costs.clock_check(b, 40 * b.pass_cost(2), 40, 40 * 0.5 * unit / 1e3, unit)
    seen = [pass_costs.record_clock(model, 1, 128, b, never_negative) for _ in range(int(8 / pass_costs.OVERHEAD_RATE))]
    assert all(x >= y >= 0.0 for x, y in zip(seen, seen[1:])) and seen[-1] == 0.0  # falls to zero, never below
    short = pass_costs.clock_check(b, 4 * b.pass_cost(2), 4, 4 * 2 * unit / 1e3, unit)
    assert pass_costs.record_clock(model, 1, 128, b, short) is None
    other = dataclasses.replace(b, ms=b.ms * 2)
    assert pass_costs.record_clock(model, 1, 128, other, check) is None
    with pytest.raises(ValueError, match="overhead"):
        dataclasses.replace(b, overhead=-0.1)


def test_a_decoder_holds_its_runs_against_an_ar_pass_and_records_them(model, monkeypatch, tmp_path):
    monkeypatch.setenv("CLP_JAX_CACHE", str(tmp_path))
    heads = Heads(HeadsConfig.for_backbone(model.cfg, k=2, kind="draft_layer"), rngs=nnx.Rngs(0))
    dec = Decoder(model, heads, DecodeConfig(mode="verify", k=2, max_new_tokens=24))
    ar = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=24))
    prompt = [[3, 5, 7, 9, 11]]
    assert dec.generate(prompt).compiled and ar.generate(prompt).compiled
    table = pass_costs.table_path(pass_costs.table_key(model, 1, dec.capacity_for(prompt)))
    res, ref = dec.generate(prompt), ar.generate(prompt)
    assert not res.compiled
    assert "overhead" not in json.loads(open(table).read())  # generate alone records nothing
    check = dec.clock_check(res, 1, dec.capacity_for(prompt), ref.ms_per_pass)
    assert check.passes == int(res.passes[0]) - 1 >= pass_costs.MIN_CLOCK_PASSES
    assert check.clock_ms == pytest.approx(1e3 * res.decode_seconds / check.passes)
    assert check.modelled_ms == pytest.approx(ref.ms_per_pass * float(res.cost[0]) / check.passes, rel=1e-6)
    assert dec.record_clock(res, 1, dec.capacity_for(prompt), ref.ms_per_pass) >= 0.0
    entry = json.loads(open(table).read())
    assert entry["overhead_runs"] == 1 and entry["overhead"] >= 0.0
    assert ar.clock_check(res, 1, 64) is None
    # several runs at once, as decode.py --compare and the bench pair them: weighted by passes, each recorded
    both = dec.clock_beside_ar([(res, 1, dec.capacity_for(prompt), ref.ms_per_pass)] * 2
                                + [(res, 1, dec.capacity_for(prompt), None)])
    assert both.passes == 3 * check.passes and both.unit == "mixed"
    assert json.loads(open(table).read())["overhead_runs"] == 3  # the unit-less run records nothing


def test_a_new_drafter_keeps_the_width_table_and_a_stale_table_is_retimed(model, monkeypatch, tmp_path):
    """The table must not depend on which tool ran first: timing a drafter new to it leaves the widths as they
    were; a table whose one-slot pass disagrees with one timed now is marked stale and re-timed next time."""
    monkeypatch.setenv("CLP_JAX_CACHE", str(tmp_path))
    calls = []
    real = pass_costs.measure
    monkeypatch.setattr(pass_costs, "measure", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    two = Heads(HeadsConfig.for_backbone(model.cfg, k=2, kind="draft_layer"), rngs=nnx.Rngs(0))
    three = Heads(HeadsConfig.for_backbone(model.cfg, k=3, kind="draft_layer"), rngs=nnx.Rngs(0))
    a = pass_costs.load_or_measure(model, two, max_width=3, draft_widths=(1, 3), rounds=2)
    b = pass_costs.load_or_measure(model, three, max_width=3, draft_widths=(1, 3), rounds=2)
    assert calls == [[1, 2, 3], [1]]  # the second drafter is timed against a one-slot pass only
    assert b.width == a.width and b.ms == a.ms
    assert pass_costs.load_or_measure(model, two, max_width=3, draft_widths=(1, 3), rounds=2) == a
    assert pass_costs.check_against(model, 1, a, a.ms * 1.2) == ""  # within 1.5x: trusted
    note = pass_costs.check_against(model, 1, a, a.ms * 3)
    assert "stale" in note and "--remeasure-costs" in note and len(calls) == 2
    pass_costs.load_or_measure(model, two, max_width=3, draft_widths=(1, 3), rounds=2)
    assert calls[2:] == [[1, 2, 3]]  # re-timed whole
    pass_costs.load_or_measure(model, three, max_width=3, draft_widths=(1, 3), rounds=2)
    assert calls[3:] == [[1]]  # the other drafter, dropped with the stale table, is timed again on its own


def test_flat_costs_feed_every_computed_draft(model, prompts, long_ar):
    """Where every width costs the same and drafting is free, the budget feeds all k drafts."""
    table = reference_table(prompts[1:2], long_ar.tokens, rows=1, width=64 + NEW)
    wrong = WrongHeads(model.cfg, 3, table)
    dc = DecodeConfig(mode="verify", k=3, max_new_tokens=8, draft_source="heads")
    out = Decoder(model, wrong, dc, costs=pass_costs.FLAT).generate(
        prompts[1:2])
    assert out.fed[0, 3] == out.fed[0].sum()
    assert np.allclose(out.cost, out.widths.sum())
