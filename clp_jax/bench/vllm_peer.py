"""vLLM as a benchmark peer: the same backbone and draft layer, served by vLLM's engine on this machine.

vLLM pins transformers<5.20, so it lives in a venv of its own (`bash .ci/serve_venv.sh` makes `.venv-vllm`);
this module exports the backbone and heads in the MiMo-MTP layout (weights/mimo.py), writes a request, runs
`clp_jax/bench/vllm_worker.py` in that venv's interpreter and reads the tokens and times back. The worker
imports only vLLM and the standard library.

Peers: `vllm` (plain decoding), `vllm_ngram` (vLLM's own prompt lookup, `num_speculative_tokens` drafts from
2-4-gram matches) and `vllm_mtp` (the draft layer as vLLM's MTP drafter, `num_speculative_tokens` drafts per step). Each prompt is generated alone (batch 1, greedy, stopping at EOS, after a warm-up), in
one engine per peer. The engines run after clp_jax's own timed runs, in another process (the two cannot
share one), so the bench reports their ratio to `ar` end to end and their ratio to each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Sequence

from clp_jax.bench.peers import PeerResult

VLLM_PEERS = ("vllm", "vllm_ngram", "vllm_mtp")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_worker.py")


def vllm_python() -> str:
    """The vLLM venv's interpreter: $CLP_VLLM_PYTHON, else `.venv-vllm/bin/python` in the repository."""
    return os.environ.get("CLP_VLLM_PYTHON", os.path.join(ROOT, ".venv-vllm", "bin", "python"))


def check_vllm() -> str:
    """The interpreter, or a clear error before anything heavy starts."""
    py = vllm_python()
    if not os.path.exists(py):
        raise RuntimeError(f"The vLLM peers need vLLM in a venv of its own (it pins transformers<5.20): no "
                           f"interpreter at {py}. Run `bash .ci/serve_venv.sh` (about 5 minutes) or set "
                           "CLP_VLLM_PYTHON, or leave vllm out of --peers.")
    return py


def run_worker(request: dict, workdir: str, timeout: float = 3600, name: str | None = None) -> dict:
    """Runs the worker on `request` in the vLLM venv; returns its output (see vllm_worker.py)."""
    path = os.path.join(workdir, f"request-{name or request.get('num_speculative_tokens', 0)}.json")
    with open(path, "w") as f:
        json.dump(request, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "PYTHONPATH"))}
    env.update({"VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"), "TOKENIZERS_PARALLELISM": "false"})
    proc = subprocess.run([check_vllm(), WORKER, path], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(path + ".out") as f:
        return json.load(f)


def vllm_runs(backbone, heads, prompts: Sequence[Sequence[int]], max_new_tokens: int, num_speculative: int,
              peers: Sequence[str] = VLLM_PEERS, max_model_len: int = 1024) -> dict[str, dict]:
    """Each vLLM peer over `prompts`, one prompt at a time: peer -> {"runs": [PeerResult], "spec": counters}."""
    from clp_jax.weights import mimo

    check_vllm()
    out = {}
    with tempfile.TemporaryDirectory(prefix="clp_vllm_") as tmp:
        model_dir = os.path.join(tmp, "model")
        mimo.export(model_dir, backbone, heads)
        for name in peers:
            ngram = {"method": "ngram", "num_speculative_tokens": num_speculative, "prompt_lookup_min": 2,
                     "prompt_lookup_max": 4}
            req = {"model": model_dir, "prompts": [list(map(int, p)) for p in prompts], "max_tokens": max_new_tokens,
                   "num_speculative_tokens": num_speculative if name == "vllm_mtp" else 0, "one_by_one": True,
                   "speculative_config": ngram if name == "vllm_ngram" else None,
                   "stop_token_ids": list(backbone.eos_token_ids), "max_model_len": max_model_len,
                   "max_num_seqs": 1}
            res = run_worker(req, tmp, name=name)
            runs = [PeerResult(tokens=t, seconds=s, passes=0) for t, s in zip(res["tokens"], res["prompt_seconds"])]
            out[name] = {"runs": runs, "spec": res["spec"]}
    return out
