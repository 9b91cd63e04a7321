"""tools/scaling_curve.py: one train.py run per size over one shared store, nested subsets, a plot and JSON."""

import inspect
import json
import os
import sys
import textwrap

import pytest

from conftest import make_tiny_hf_model
from helpers import tiny_tokenizer
from test_kill_resume import CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # four train.py runs (~1 min each on 2 cores): run by CI with `-m slow`
def test_scaling_curve_trains_nested_subsets_and_compares_sources(tmp_path, monkeypatch):
    model = str(tmp_path / "model")
    make_tiny_hf_model(model, tied=False, vocab_size=384)
    tiny_tokenizer().save_pretrained(model)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "f.py").write_text(inspect.getsource(textwrap)[:6000])
    config = tmp_path / "base.toml"
    config.write_text(CONFIG.format(model=model, corpus=str(corpus), out=str(tmp_path / "base")))
    monkeypatch.setenv("CLP_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XLA_FLAGS", "")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import scaling_curve

    out = str(tmp_path / "scaling")
    common = ["--config", str(config), "--out", out, "--steps", "4", "--set", "run.clp_steps=1",
              "--set", "run.eval_every=0"]
    assert scaling_curve.main(["--targets", "60,200"] + common) == 0
    assert scaling_curve.main(["--targets", "60", "--compare-sources"] + common) == 0
    rows = json.load(open(os.path.join(out, "scaling.json")))["rows"]
    assert [r["source"] for r in rows] == ["mix", "distilled", "teacher_forced"]  # the second call's rows
    assert os.path.exists(os.path.join(out, "scaling.png"))
    small, big = (json.load(open(os.path.join(out, f"mix_{n}", "eval.json"))) for n in (60, 200))
    assert 60 <= small["train_positions"] < big["train_positions"]
    assert set(rows[1]["train_positions_by_kind"]) and rows[1]["train_positions_by_kind"].get("corpus", 0) == 0
    assert rows[2]["train_positions_by_kind"]["chat"] == 0 and rows[2]["train_positions_by_kind"]["corpus"] > 0
    assert all(0.0 <= v <= 1.0 for r in rows for v in r["first_draft"].values())

    # tools/eval_heads.py: both drafters on the same held-out records give what their runs wrote to eval.json
    import eval_heads

    heads = [os.path.join(out, f"mix_{n}", "heads") for n in (60, 200)]
    table = str(tmp_path / "heads.json")
    assert eval_heads.main(["--config", str(config), "--heads", heads[0], "--heads", heads[1], "--out", table]) == 0
    got = json.load(open(table))["heads"]
    for n, path in zip((60, 200), heads):
        ran = json.load(open(os.path.join(out, f"mix_{n}", "eval.json")))["drafter"]
        assert set(got[path]) == set(ran)
        for kind in ran:
            assert got[path][kind]["records"] == ran[kind]["records"]
            assert got[path][kind]["agreement"] == pytest.approx(ran[kind]["agreement"], abs=0.02)
