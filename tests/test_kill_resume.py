"""A training run killed with SIGKILL at any moment resumes from its last complete checkpoint and ends
with the same heads, bit for bit, as an uninterrupted run.

Real `python train.py` processes on a tiny random backbone (a Hugging Face directory with its own
tokenizer) and a tiny corpus: one runs uninterrupted; another is killed once a phase-1 checkpoint
exists, restarted, killed while a phase-2 save is in flight (an Orbax temporary directory exists),
and restarted to the end. The draft-layer objective with soft labels, on a feature store it builds.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from clp_jax.drafting.checkpoint import load_heads

from conftest import make_tiny_hf_model
from helpers import tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = """
[model]
name = "{model}"
[heads]
kind = "draft_layer"
k = 2
gate = false
[data]
sources = ["{corpus}"]
max_files = 10
seq_len = 96
corpus_records = 12
code_prompts = 0
chat_code_prompts = 0
chat_prompts = 8
max_prompt_len = 88
new_tokens = 8
soft_topk = 2
shard_records = 4
heldout_fraction = 0.15
clp_fraction = 0.25
[train]
learning_rate = 1e-2
warmup_steps = 2
soft_weight = 0.5
[run]
out_dir = "{out}"
steps = 8
batch_size = 4
window = 32
vocab_size = 0
save_every = 1
keep = 2
eval_batch_size = 8
eval_every = 4
validation_records = 2
gen_batch_size = 4
feature_batch_size = 4
clp_steps = 4
clp_batch_size = 4
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    model = str(d / "model")
    make_tiny_hf_model(model, tied=False, vocab_size=384)
    tiny_tokenizer().save_pretrained(model)
    corpus = d / "corpus"
    corpus.mkdir()
    for i, mod in enumerate([json, textwrap]):
        (corpus / f"f{i}.py").write_text(inspect.getsource(mod)[:6000])
    return d, model, str(corpus)


def _config(d, model, corpus, name):
    path = d / f"{name}.toml"
    path.write_text(CONFIG.format(model=model, corpus=corpus, out=str(d / name)))
    return str(path)


def _start(config: str, cache: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT, "CLP_JAX_CACHE": cache, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.Popen([sys.executable, "train.py", "--config", config, "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 900.0) -> bool:
    """SIGKILLs `proc` as soon as ready() holds; returns whether it did (False: the run ended first)."""
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    proc.wait()
    return False


def _steps(directory: str) -> list[int]:
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(directory, "*"))
                  if os.path.basename(p).isdigit())


def _in_flight(directory: str) -> list[str]:
    return glob.glob(os.path.join(directory, "*tmp*"))


def _params(out: str):
    heads = load_heads(os.path.join(out, "heads"))
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(heads, nnx.Param))]


def test_sigkill_at_any_moment_loses_nothing(setup):
    d, model, corpus = setup
    ref_cfg, killed_cfg = _config(d, model, corpus, "ref"), _config(d, model, corpus, "killed")
    ref_out, out = str(d / "ref"), str(d / "killed")
    phase1 = os.path.join(out, "checkpoints")
    # the CLP phase's directory names the drafter step it starts from: the best-scored one (eval_every)
    phase2_dirs = lambda: glob.glob(os.path.join(out, "checkpoints_clp_after_*"))  # noqa: E731
    # the uninterrupted run, beside the killed one (own caches: the dataset is built the same way by each)
    ref = _start(ref_cfg, str(d / "cache_ref"))
    ref_log = []
    reader = threading.Thread(target=lambda: ref_log.append(ref.communicate()[0]))
    reader.start()

    first = _start(killed_cfg, str(d / "cache"))
    assert _kill_when(first, lambda: len(_steps(phase1)) >= 1 and _steps(phase1)[-1] >= 2), first.stdout.read()
    assert first.returncode == -signal.SIGKILL and not os.path.exists(os.path.join(out, "heads"))
    killed_at = _steps(phase1)[-1]

    second = _start(killed_cfg, str(d / "cache"))
    caught = _kill_when(second, lambda: any(_steps(p) and _in_flight(p) for p in phase2_dirs()))
    assert caught, "the second run ended before a phase-2 save was seen in flight"
    assert second.returncode == -signal.SIGKILL
    (phase2,) = phase2_dirs()
    partial = _in_flight(phase2)  # the step the kill left half-written
    assert partial, "the kill came after the save was renamed into place"
    assert _steps(phase1)[-1] == 8 and not os.path.exists(os.path.join(out, "eval.json"))

    third = _start(killed_cfg, str(d / "cache"))
    log = third.communicate()[0]
    assert third.returncode == 0, log
    assert f"phase drafter resumed from step 8 of {phase1}\n" in log and f" of {phase2}\n" in log, log
    reader.join()
    assert ref.returncode == 0, ref_log
    for a, b in zip(_params(ref_out), _params(out), strict=True):
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(ref_out, "eval.json")) as f, open(os.path.join(out, "eval.json")) as g:
        want, got = json.load(f), json.load(g)
    for key in ("drafter", "clp", "calibration", "drafter_steps"):
        assert got[key] == want[key], key
    with open(os.path.join(out, "scores_drafter.jsonl")) as f:  # held-out scores at steps 0, 4 and 8; the best kept
        scores = {row["step"]: row["score"] for row in map(json.loads, f)}
    assert sorted(scores) == [0, 4, 8] and got["drafter_steps"] == max(scores, key=lambda s: (scores[s], -s))
    assert phase2.endswith(f"_after_{got['drafter_steps']}")
    print(f"killed after phase-1 step {killed_at}; killed mid phase-2 save ({len(partial)} partial dirs left)")
    # what train.py wrote is what decode.py loads, and `verify` with it decodes exactly like `ar`
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "CLP_JAX_CACHE": str(d / "cache")}
    dec = subprocess.run([sys.executable, "decode.py", "--model", model, "--heads", os.path.join(out, "heads"),
                          "--mode", "verify", "--compare", "ar", "--prompt", "def add(a, b):", "--max-new-tokens", "24"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert dec.returncode == 0, dec.stderr[-3000:]
    assert "exact match 1.00" in dec.stdout + dec.stderr, dec.stdout[-2000:]
