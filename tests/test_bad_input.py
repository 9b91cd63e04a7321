"""Bad input through the real command lines fails fast, with one line and exit status 2.

Each case runs `python decode.py ...` or `python train.py ...` in a subprocess and checks the message,
the exit status, that no traceback was printed, that nothing heavy started (no backbone, dataset or
parameter line) and that it took seconds (the demo backbone alone takes ~10 s to load). Files given
as --model are the user's own: they must come out byte-for-byte unchanged. No demo backbone is needed.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SECONDS = 12.0  # ~2 s here (interpreter and imports); the backbone load alone is 9-11 s more
HEAVY = ("backbone ", "parameters:", "dequantiz", "hidden states", "generating", "Traceback")


def _files(d: str) -> dict:
    """The user's files: a tiny truncated GGUF, a text file called .gguf, a config.json, HF directories
    with a broken config.json and with a truncated safetensors file, a k=4 heads checkpoint, configs."""
    import gguf
    from safetensors.numpy import save_file
    from transformers import Qwen2Config

    from clp_jax.drafting.checkpoint import save_heads
    from clp_jax.drafting.heads import Heads, HeadsConfig
    from flax import nnx

    p = {}
    w = gguf.GGUFWriter(os.path.join(d, "full.gguf"), "qwen2")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.ones((256, 256), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with open(os.path.join(d, "full.gguf"), "rb") as f:
        data = f.read()
    p["truncated_gguf"] = os.path.join(d, "truncated.gguf")
    with open(p["truncated_gguf"], "wb") as f:
        f.write(data[:len(data) // 3])
    p["text_gguf"] = os.path.join(d, "notes.gguf")
    with open(p["text_gguf"], "w") as f:
        f.write("not a model\n")
    cfg_dir = os.path.join(d, "hf_bad_config")
    os.makedirs(cfg_dir)
    p["hf_bad_config"] = cfg_dir
    with open(os.path.join(cfg_dir, "config.json"), "w") as f:
        f.write('{"model_type": "qwen2", ')
    st_dir = os.path.join(d, "hf_truncated")
    Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(st_dir)
    p["config_json"] = os.path.join(st_dir, "config.json")
    save_file({"model.embed_tokens.weight": np.ones((128, 64), np.float32)}, os.path.join(st_dir, "model.safetensors"))
    with open(os.path.join(st_dir, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(st_dir, "model.safetensors")) // 2)
    p["hf_truncated"] = st_dir
    p["heads4"] = os.path.join(d, "heads4")
    save_heads(p["heads4"], Heads(HeadsConfig(hidden_size=64, vocab_size=128, k=4), rngs=nnx.Rngs(0)),
               {"hidden_size": 64})
    p["unknown_key_toml"] = os.path.join(d, "unknown_key.toml")
    with open(p["unknown_key_toml"], "w") as f:
        f.write("[run]\nstepz = 5\n")
    p["unknown_section_toml"] = os.path.join(d, "unknown_section.toml")
    with open(p["unknown_section_toml"], "w") as f:
        f.write("[optimizer]\nlr = 1.0\n")
    p["not_toml"] = os.path.join(d, "broken.toml")
    with open(p["not_toml"], "w") as f:
        f.write("[run\nsteps = \n")
    # files that are not UTF-8, not JSON or empty (tests/test_file_errors.py has one test per kind of fault)
    p["latin1_prompts"] = os.path.join(d, "latin1.jsonl")
    with open(p["latin1_prompts"], "wb") as f:
        f.write('"\u00e9t\u00e9"\n'.encode("latin-1"))
    p["bad_json_prompts"] = os.path.join(d, "bad.jsonl")
    with open(p["bad_json_prompts"], "w") as f:
        f.write('"fine"\n{"prompt": \n')
    p["empty_toml"] = os.path.join(d, "empty.toml")
    open(p["empty_toml"], "w").close()
    p["latin1_toml"] = os.path.join(d, "latin1.toml")
    with open(p["latin1_toml"], "wb") as f:
        f.write('[run]\nout_dir = "\u00e9t\u00e9"\n'.encode("latin-1"))
    return p


DEMO = os.path.join(ROOT, "configs", "draft_layer_demo.toml")
# (id, script, argv (with {placeholders} from _files), what the one error line must contain)
CASES = [
    ("k0", "decode.py", ["--k", "0"], "--k 0 is out of range: expected a value >= 1"),
    ("k9_shipped", "decode.py", ["--k", "9"], "--k 9 is more than the 4 heads"),
    ("k9_heads", "decode.py", ["--heads", "{heads4}", "--k", "9"], "--k 9 is more than the 4 heads"),
    ("k_not_int", "decode.py", ["--k", "two"], "argument --k: invalid int value: 'two'"),
    ("max_new_0", "decode.py", ["--max-new-tokens", "0"], "--max-new-tokens 0 is out of range"),
    ("max_new_neg", "decode.py", ["--max-new-tokens", "-5"], "--max-new-tokens -5 is out of range"),
    ("tau2", "decode.py", ["--mode", "confadapt", "--tau", "2"], "--tau 2.0 is out of range: expected a value >= 0 and <= 1"),
    ("top_p0", "decode.py", ["--top-p", "0"], "--top-p 0.0 is out of range"),
    ("temperature_neg", "decode.py", ["--temperature", "-1"], "--temperature -1.0 is out of range"),
    ("batch0", "decode.py", ["--batch-size", "0"], "--batch-size 0 is out of range"),
    ("top_p_greedy", "decode.py", ["--top-p", "0.5"], "--top-p 0.5 filters sampling, but --temperature is 0"),
    ("top_k_greedy", "decode.py", ["--top-k", "20"], "--top-k 20 filters sampling, but --temperature is 0"),
    ("bench_limit0", "clp_jax/bench/__main__.py", ["--limit", "0"], "--limit 0 is out of range"),
    ("draft_budget_bad", "decode.py", ["--draft-budget", "some"], "argument --draft-budget: invalid choice"),
    ("empty_prompt", "decode.py", ["--prompt", ""], "--prompt number 1 is empty"),
    ("prompts_file_missing", "decode.py", ["--prompts-file", "/nonexistent.jsonl"], "does not exist"),
    ("prompts_file_not_utf8", "decode.py", ["--prompts-file", "{latin1_prompts}"],
     "Prompts file '{latin1_prompts}' is not UTF-8 text (byte 0xe9 at line 1, column 2): save it as UTF-8"),
    ("prompts_file_bad_json", "decode.py", ["--prompts-file", "{bad_json_prompts}"],
     "Prompts file '{bad_json_prompts}', line 2: not valid JSON"),
    ("model_missing", "decode.py", ["--model", "/nonexistent.gguf"], "/nonexistent.gguf does not exist"),
    ("model_missing_ar", "decode.py", ["--mode", "ar", "--model", "/nonexistent.gguf"], "does not exist"),
    ("gguf_truncated", "decode.py", ["--mode", "ar", "--model", "{truncated_gguf}"],
     "Could not read the GGUF file {truncated_gguf}: it may be truncated or corrupt"),
    ("gguf_is_text", "decode.py", ["--mode", "ar", "--model", "{text_gguf}"], "{text_gguf} is not a GGUF file"),
    ("model_is_config_json", "decode.py", ["--mode", "ar", "--model", "{config_json}"],
     "{config_json} is a file but not a GGUF file"),
    ("hf_config_broken", "decode.py", ["--mode", "ar", "--model", "{hf_bad_config}"], "config.json' is not valid JSON"),
    ("safetensors_truncated", "decode.py", ["--mode", "ar", "--model", "{hf_truncated}"],
     "model.safetensors is truncated"),
    ("lr_abc", "train.py", ["--config", DEMO, "--set", "train.learning_rate=abc"],
     "train.learning_rate = 'abc': expected a number"),
    ("lr_negative", "train.py", ["--config", DEMO, "--set", "train.learning_rate=-1"],
     "train.learning_rate must be > 0, got -1.0"),
    ("steps0", "train.py", ["--config", DEMO, "--set", "run.steps=0"], "run.steps must be in 1..10000000, got 0"),
    ("steps_float", "train.py", ["--config", DEMO, "--set", "run.steps=1.5"], "run.steps = 1.5: expected an integer"),
    ("heads_k0", "train.py", ["--config", DEMO, "--set", "heads.k=0"], "heads.k must be in 1..16, got 0"),
    ("heads_k99", "train.py", ["--config", DEMO, "--set", "heads.k=99"], "heads.k must be in 1..16, got 99"),
    ("heads_kind", "train.py", ["--config", DEMO, "--set", 'heads.kind="eagle"'], "heads.kind must be one of"),
    ("prompts_huge", "train.py", ["--config", DEMO, "--set", "data.chat_prompts=1000000000"],
     "data.chat_prompts must be in 0..1000000"),
    ("window_too_long", "train.py", ["--config", DEMO, "--set", "run.window=4096"],
     "run.window (4096) must be <= data.seq_len (384)"),
    ("soft_without_store", "train.py", ["--config", DEMO, "--set", "data.soft_topk=0"],
     "train.soft_weight > 0 needs soft labels in the feature store"),
    ("stop_after_word", "train.py", ["--config", DEMO, "--set", 'run.stop_after="eval"'], "run.stop_after must be"),
    ("init_from_missing", "train.py", ["--config", DEMO, "--set", 'run.init_from="/nonexistent/heads"'],
     "run.init_from = '/nonexistent/heads' is not a directory"),
    ("sources_empty", "train.py", ["--config", DEMO, "--set", "data.sources=[]"],
     "data.sources = []: expected a list of strings"),
    ("set_unknown_section", "train.py", ["--config", DEMO, "--set", "optim.lr=1"], "must look like SECTION.KEY=VALUE"),
    ("set_unknown_key", "train.py", ["--config", DEMO, "--set", "train.lr=1"], "Unknown key(s) ['lr'] in [train]"),
    ("toml_unknown_key", "train.py", ["--config", "{unknown_key_toml}"], "Unknown key(s) ['stepz'] in [run]"),
    ("toml_unknown_section", "train.py", ["--config", "{unknown_section_toml}"],
     "Unknown config section(s) ['optimizer']"),
    ("toml_broken", "train.py", ["--config", "{not_toml}"], "is not valid TOML"),
    ("config_missing", "train.py", ["--config", "/nonexistent.toml"], "Config '/nonexistent.toml' does not exist"),
    ("config_empty", "train.py", ["--config", "{empty_toml}"], "Config '{empty_toml}' is empty"),
    ("config_not_utf8", "train.py", ["--config", "{latin1_toml}"], "Config '{latin1_toml}' is not UTF-8 text"),
    ("train_model_missing", "train.py", ["--config", DEMO, "--set", 'model.name="/nonexistent.gguf"'],
     "model.name '/nonexistent.gguf': file or directory /nonexistent.gguf does not exist"),
]


def _digest(path: str) -> str:
    h = hashlib.sha256()
    for root, _, names in sorted(os.walk(path)) if os.path.isdir(path) else [("", [], [path])]:
        for name in sorted(names):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case run once (two at a time: they are independent), with the user's files before and after.
    Once per test session: xdist sent some of this module's tests to a second worker despite its group
    (measured: both workers ran every case at once, 147 s each), so the first worker to get here runs them and
    leaves the outcome (pickled) in the session's temporary root for the other, under a file lock."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # a session's workers share the parent
    with open(root / "bad_input.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "bad_input.pkl"
        if not done.exists():
            out = _run_cases(str(tmp_path_factory.mktemp("bad_input")))
            with open(done.with_suffix(".partial"), "wb") as f:
                pickle.dump(out, f)
            os.replace(done.with_suffix(".partial"), done)
        with open(done, "rb") as f:
            return pickle.load(f)


def _run_cases(d: str):
    files = _files(d)
    before = {k: _digest(v) for k, v in files.items()}
    env = {**os.environ, "PYTHONPATH": ROOT, "CLP_JAX_CACHE": os.path.join(d, "cache"), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": ""}

    def one(case):
        name, script, argv, want = case
        argv = [a.format(**files) for a in argv]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, script, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        return name, (proc, time.perf_counter() - t0, want.format(**files))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        out = dict(pool.map(one, CASES))
    return out, before, {k: _digest(v) for k, v in files.items()}


# the cases' tests go together to one xdist worker where the scheduler allows (see `results`)
pytestmark = pytest.mark.xdist_group("bad_input")


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_bad_input_fails_fast_with_one_line(results, name):
    out, _, _ = results
    proc, seconds, want = out[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert want in lines[-1], proc.stderr
    assert lines[-1].startswith(("error: ", "usage: ", "decode.py: error:", "train.py: error:")), proc.stderr
    assert not any(h in proc.stderr for h in HEAVY), proc.stderr  # nothing heavy started, no traceback
    assert proc.stdout == ""
    assert seconds < MAX_SECONDS, f"{name} took {seconds:.1f} s"
    print(f"{seconds:5.1f} s  {name}: {lines[-1]}")


def test_the_users_files_are_untouched(results):
    _, before, after = results
    assert before == after
