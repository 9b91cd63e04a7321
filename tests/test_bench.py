"""The benchmark end to end on a tiny random backbone, and the quality measures it relies on."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from clp_jax.bench import run as bench
from clp_jax.bench import quality
from clp_jax.drafting.checkpoint import save_heads
from clp_jax.weights.loading import Backbone
from helpers import random_heads, scaled_random_model, tiny_config, tiny_tokenizer


def test_rep_n():
    assert quality.rep_n([1, 2, 3, 4], 2) == 0.0
    assert quality.rep_n([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)
    assert quality.rep_n([7] * 5, 3) == pytest.approx(1 - 1 / 3)
    assert quality.rep_n([1], 2) == 0.0


def test_humaneval_runs_code_in_a_subprocess():
    """The canonical solution passes; a wrong one, a crashing one and an endless one do not."""
    problem = quality.humaneval_problems(1)[0]
    assert problem["task_id"] == "HumanEval/0"
    good = problem["canonical_solution"] + "\ndef unrelated():\n    pass\n"  # cut at the stop sequence
    assert quality.truncate_completion(good) == problem["canonical_solution"]
    results = quality.pass_at_1([problem] * 4, [good, "    return False\n", "    raise SystemExit(3)\n",
                                                "    while True:\n        pass\n"], timeout=3)
    assert results == [True, False, False, False]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    tok = tiny_tokenizer()
    cfg = tiny_config(vocab_size=len(tok), tie_word_embeddings=True)
    model = scaled_random_model(cfg, seed=3, logit_scale=4.0)
    heads_dir = str(tmp_path_factory.mktemp("heads") / "heads")
    save_heads(heads_dir, random_heads(cfg, k=2, gate=True), cfg)
    eos = (tok.eos_token_id,)
    return Backbone(cfg=cfg, model=model, tokenizer=tok, source="tiny-random", eos_token_ids=eos), heads_dir


def test_bench_smoke(tiny_setup, tmp_path, monkeypatch):
    """Every mode and both transformers peers on one HumanEval and one chat prompt: the files it writes,
    ar as its own reference, verify exact, and transformers' greedy decoding equal to ar (same weights)."""
    backbone, heads_dir = tiny_setup
    monkeypatch.setattr(bench, "_load_backbone", lambda args: backbone)
    out = tmp_path / "out"
    args = bench.parse_args(["--model", "tiny", "--heads", heads_dir, "--limit", "1", "--max-new-tokens", "12",
                             "--taus", "0.5", "--out", str(out), "--no-progress", "--timeout", "5"])
    args.command = "python -m clp_jax.bench (test)"
    assert bench.run(args) == 0
    report = json.loads((out / "bench.json").read_text())
    modes = report["modes"]
    assert list(modes) == ["ar", "clp", "verify", "verify@fixed-heads", "confadapt@0.5", "gate", "hf_greedy",
                           "hf_lookup"]
    for label, m in modes.items():
        # speedup is the tokens/s ratio to ar's (decode-only; end to end for the peers, which cannot separate
        # prefill); two prompts and one HumanEval problem give these fractions
        rate = "tokens_per_s_e2e" if label.startswith("hf_") else "tokens_per_s"
        assert m["speedup"] == pytest.approx(m[rate] / modes["ar"][rate]), label
        assert m["exact_match"] in (0.0, 0.5, 1.0) and m["pass_at_1"] in (0.0, 1.0), label
        assert set(m["sets"]) == {"humaneval", "chat"}
    assert modes["ar"]["speedup"] == 1.0 and modes["ar"]["exact_match"] == 1.0
    assert modes["ar"]["tokens_per_pass"] == pytest.approx(1.0)
    assert modes["verify"]["exact_match"] == 1.0 and modes["verify@fixed-heads"]["exact_match"] == 1.0
    clock = modes["verify"]["clock"]  # held to the ar run of each prompt
    assert clock["unit"] == "ar" and clock["unit_ms"] > 0 and clock["clock_ms_per_pass"] > 0
    for label in ("verify", "verify@fixed-heads"):  # the budget's policy, overall and per set
        pol = modes[label]["policy"]
        assert sum(pol["fed_share"]) == pytest.approx(1.0) and len(pol["fed_share"]) == 3
        assert set(modes[label]["sets"]["chat"]["policy"]) == set(pol)
    assert modes["verify@fixed-heads"]["policy"]["ar_cost_share"] == 0.0  # every pass feeds both drafts
    assert modes["ar"]["policy"]["cost_per_token"] == pytest.approx(1.0)
    assert report["meta"]["pass_costs"]["width"][0] == 1.0
    assert modes["hf_greedy"]["exact_match"] == 1.0
    assert modes["hf_lookup"]["exact_match"] == 1.0
    assert len(modes["clp"]["head_acceptance"]) == 2
    for label in ("verify", "clp"):  # per-set acceptance in decoding; ar and the peers offer no drafts
        per_set = [modes[label]["sets"][name]["head_acceptance"] for name in ("humaneval", "chat")]
        assert all(len(a) == 2 and all(0.0 <= x <= 1.0 for x in a) for a in per_set), label
        lo, hi = np.minimum(*per_set), np.maximum(*per_set)  # the overall ratio lies between the sets' ratios
        assert np.all(lo - 1e-4 <= modes[label]["head_acceptance"]) and np.all(modes[label]["head_acceptance"] <= hi + 1e-4)
    assert "head_acceptance" not in modes["ar"]["sets"]["chat"] and "head_acceptance" not in modes["hf_greedy"]["sets"]["chat"]
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(backbone.model, nnx.Param)))
    assert modes["verify"]["memory_bytes"] >= weight_bytes  # XLA's analysis counts the weights it reads
    assert 0 < report["meta"]["roofline"]["fraction_of_roofline"]
    assert report["meta"]["prompts"] == {"humaneval": 1, "chat": 1}
    for name in ("bench.md", "speedup_vs_quality.png", "acceptance.png"):
        assert os.path.getsize(out / name) > 0
    drafts = report["drafts"]  # the drafter at every position of ar's output, per set
    assert set(drafts) == {"humaneval", "chat"}
    assert sum(d["positions"] for d in drafts.values()) == modes["ar"]["tokens"] - 2  # one per token but the last
    for name, d in drafts.items():
        assert len(d["every_position"]) == 2 and all(0.0 <= a <= 1.0 for a in d["every_position"] + d["chain_accepted"])
        assert 1 <= d["chain_anchors"] <= d["positions"], name
    md = (out / "bench.md").read_text()
    assert "| verify |" in md and "| verify@fixed-heads |" in md and "Pass costs" in md
    assert "every generated position" in md


def test_mode_configs_label_every_variant():
    """Each mode, tau, CLP margin, verify variant and extra k becomes one labelled config (compiling none)."""
    configs = bench.mode_configs(("ar", "clp", "verify", "confadapt"), (0.5, 0.9), 3, 16, verify_ks=(1, 3),
                                 clp_confidences=(0.9,), variants=("auto", "fixed-heads", "fixed-both-tree1"))
    assert list(configs) == ["ar", "clp", "clp@p0.9", "verify", "verify@fixed-heads", "verify@fixed-both-tree1",
                             "verify@k1", "verify@k1-fixed-heads", "verify@k1-fixed-both-tree1", "confadapt@0.5",
                             "confadapt@0.9"]
    assert configs["clp@p0.9"].clp_confidence == 0.9 and configs["verify@k1"].k == 1
    tree = configs["verify@fixed-both-tree1"]
    assert (tree.draft_budget, tree.draft_source, tree.tree, tree.k) == ("fixed", "both", 1, 3)
    assert configs["confadapt@0.9"].tau == 0.9
    with pytest.raises(ValueError, match="BUDGET"):
        bench.verify_variant("fast-heads")


def test_bench_rejects_limit_zero(tmp_path, capsys):
    """--limit 0 used to mean every problem (a 4-hour job); it is an error before anything loads."""
    assert bench.main(["--limit", "0", "--out", str(tmp_path)]) == 2
    assert "--limit 0 is out of range" in capsys.readouterr().err


def test_bench_rejects_unknown_modes(tmp_path):
    args = bench.parse_args(["--modes", "ar,fast", "--out", str(tmp_path)])
    assert bench.main(["--modes", "ar,fast", "--out", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="fast"):
        bench.run(args)


def test_bench_without_a_gate(tiny_setup, tmp_path, monkeypatch):
    """Heads trained without the gate baseline: the default modes leave the gate row out; asking for it is an
    error before anything compiles."""
    backbone, _ = tiny_setup
    heads_dir = str(tmp_path / "heads")
    save_heads(heads_dir, random_heads(backbone.cfg, k=2, gate=False), backbone.cfg)
    monkeypatch.setattr(bench, "_load_backbone", lambda args: backbone)
    seen = {}

    def measure(backbone, heads, samples, configs, *a, **kw):
        seen.update(configs)
        raise KeyboardInterrupt  # stop before compiling

    monkeypatch.setattr(bench, "measure", measure)
    common = ["--model", "tiny", "--heads", heads_dir, "--limit", "1", "--out", str(tmp_path / "out")]
    with pytest.raises(KeyboardInterrupt):
        bench.run(bench.parse_args(common))
    assert "gate" not in seen and "verify" in seen and "clp" in seen
    with pytest.raises(ValueError, match="gate baseline"):
        bench.run(bench.parse_args(common + ["--modes", "ar,verify,gate"]))


def test_vllm_acceptance_reads_the_spec_counters():
    """The vLLM peers' tokens per pass and per-position acceptance come from its counters (a pure function the
    vLLM rows call; a slip once deleted it, and no test without vLLM reached it)."""
    from clp_jax.bench.run import vllm_acceptance

    spec = {"vllm:spec_decode_num_drafts": 10, "vllm:spec_decode_num_accepted_tokens_per_pos[1]": 3,
            "vllm:spec_decode_num_accepted_tokens_per_pos[0]": 6}
    out = vllm_acceptance(spec, tokens=30, prompts=2)
    assert out["tokens_per_pass"] == 30 / 12 and out["head_acceptance"] == [0.6, 0.3]
