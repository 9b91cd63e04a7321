"""vLLM's side of the serving test and the vLLM bench peers: `.venv-vllm/bin/python clp_jax/bench/vllm_worker.py REQ.json`.

Runs in the vLLM venv (`bash .ci/serve_venv.sh`), never in clp_jax's: it imports only vLLM and the standard
library, and nothing in clp_jax imports it (clp_jax/bench/vllm_peer.py runs it). REQ.json: model (a Hugging Face directory, e.g. an export of tools/export_vllm.py), prompts (lists of
token ids), max_tokens, and optionally num_speculative_tokens (MiMo-MTP drafting from the directory's MTP
layer; 0: none), speculative_config (any other, e.g. {"method": "ngram", ...}), dtype, max_model_len,
max_num_seqs, one_by_one (each prompt alone, as a single user would), stop_token_ids (stop there; default: generate
max_tokens whatever comes). Writes REQ.json.out: the generated token ids per prompt, the wall time of generation
(after a warm-up), each prompt's own time (one_by_one) and vLLM's speculative-decoding counters.
"""

from __future__ import annotations

import json
import sys
import time


def vllm_generate(request: dict) -> dict:
    """One vLLM engine over `request["model"]`, greedy, token-id prompts (see the module docstring)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    n = request.get("num_speculative_tokens", 0)
    spec = {"method": "mtp", "num_speculative_tokens": n} if n else request.get("speculative_config")
    llm = LLM(model=request["model"], dtype=request.get("dtype", "float32"), speculative_config=spec,
              max_model_len=request.get("max_model_len", 512), seed=0, enforce_eager=True,
              max_num_seqs=request.get("max_num_seqs", 8), disable_log_stats=False)
    stop = request.get("stop_token_ids")
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=not stop,
                            stop_token_ids=stop or None)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]]
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    before = _spec_counters(llm)
    t0 = time.perf_counter()
    per_prompt = []
    if request.get("one_by_one"):
        outs = []
        for p in prompts:
            t = time.perf_counter()
            outs.append(llm.generate([p], params, use_tqdm=False)[0])
            per_prompt.append(time.perf_counter() - t)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    after = _spec_counters(llm)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "seconds": seconds, "prompt_seconds": per_prompt,
            "spec": {k: after[k] - before.get(k, 0) for k in after}}


def _spec_counters(llm) -> dict:
    """vLLM's speculative-decoding counters (drafts proposed, accepted, per position)."""
    out = {}
    for m in llm.get_metrics():
        if not m.name.startswith("vllm:spec_decode"):
            continue
        if hasattr(m, "values"):  # a per-position vector
            for i, v in enumerate(m.values):
                out[f"{m.name}[{i}]"] = v
        elif hasattr(m, "value"):
            out[m.name] = out.get(m.name, 0) + m.value
    return out


if __name__ == "__main__":  # vLLM spawns processes that re-import this file: work only under __main__
    with open(sys.argv[1]) as f:
        req = json.load(f)
    result = vllm_generate(req)
    with open(sys.argv[1] + ".out", "w") as f:
        json.dump(result, f)
