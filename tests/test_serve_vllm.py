"""Served by vLLM: a tiny random backbone + draft layer, exported in the MiMo-MTP layout, decoded by vLLM on CPU
(offline `LLM.generate`, speculative method "mtp") must give `ar`'s greedy tokens, with its drafts accepted
as often as `verify`'s.

Marked `serve`. vLLM lives in a venv of its own (`bash .ci/serve_venv.sh`, which CI runs before the tests):
it pins transformers<5.20. Without that venv the test is skipped, except under CI=true, where it fails.
vLLM runs in that venv's python through `clp_jax/bench/vllm_worker.py`.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.serve

NEW = 48  # tokens generated per prompt


def run_vllm(request: dict) -> dict:
    """clp_jax/bench/vllm_worker.py in the vLLM venv (a subprocess: vLLM spawns processes and needs its own venv)."""
    from clp_jax.bench.vllm_peer import run_worker

    return run_worker(request, request.pop("workdir"), timeout=1200)


def _vllm_venv_or_skip():
    from clp_jax.bench.vllm_peer import vllm_python

    if os.path.exists(vllm_python()):
        return
    msg = f"no vLLM venv at {vllm_python()}: run `bash .ci/serve_venv.sh` (or set CLP_VLLM_PYTHON)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def tiny_servable(seed: int = 3):
    """A tiny random Qwen2 of a geometry vLLM's CPU attention serves (head_dim 64) and a draft layer copied from
    its last layer plus noise (right about 40% of the time), reading the trunk's pre-norm direction as vLLM feeds
    it (`trunk_feature = "pre_norm"`). The final norm is far from ones, so a layer that read the final-normed state
    instead would draft differently in vLLM."""
    import jax
    from flax import nnx

    from clp_jax.drafting.heads import Heads, HeadsConfig
    from helpers import scaled_random_model, tiny_config

    cfg = tiny_config(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=2, num_kv_heads=1,
                      head_dim=64, tie_word_embeddings=True)
    model = scaled_random_model(cfg, seed=seed)
    g = model.final_norm.scale[...]
    # x3 sharpens the logits (fewer near-ties between two engines' float sums), the noise makes it uneven
    model.final_norm.scale[...] = 3.0 * g * jax.numpy.exp(0.5 * jax.random.normal(jax.random.key(seed + 1), g.shape))
    heads = Heads(HeadsConfig.for_backbone(cfg, k=3, kind="draft_layer", gate=False, trunk_feature="pre_norm"),
                  rngs=nnx.Rngs(seed))
    heads.drafter.init_from_backbone(model)
    state = nnx.state(heads.drafter, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)]
    nnx.update(heads.drafter, jax.tree.unflatten(treedef, leaves))
    return model, heads


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model, heads, export directory, prompts, ar's tokens)."""
    _vllm_venv_or_skip()
    import numpy as np

    from clp_jax.decode.decoder import DecodeConfig, Decoder
    from clp_jax.weights import loading, mimo
    from test_export_vllm import tiny_tokenizer

    model, heads = tiny_servable()
    tok = tiny_tokenizer()
    out = str(tmp_path_factory.mktemp("serve") / "export")
    mimo.export(out, loading.Backbone(model.cfg, model, tok, "tiny", loading.eos_token_ids(tok)), heads)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 126, n).tolist() for n in (5, 9, 14, 7, 20, 3, 11, 16)]
    ar = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=NEW)).generate(prompts)
    return model, heads, out, prompts, ar.tokens


@pytest.mark.parametrize("k", [1, 3])
def test_vllm_serves_the_export_like_ar_and_verify(served, k):
    """vLLM with k speculative tokens from the exported layer: ar's tokens, and per draft position the
    acceptance of clp_jax's verify at the same k (vLLM reuses the one layer at every position, as clp_jax does)."""
    import numpy as np

    from clp_jax.decode.decoder import DecodeConfig, Decoder

    model, heads, out, prompts, ar_tokens = served
    # all k drafts of the draft layer every pass, as vLLM (no budget, no drafts from the context)
    dc = DecodeConfig(mode="verify", k=k, max_new_tokens=NEW, draft_budget="fixed", draft_source="heads")
    verify = Decoder(model, heads, dc).generate(prompts)
    assert verify.tokens == ar_tokens
    result = run_vllm({"model": out, "prompts": prompts, "max_tokens": NEW, "num_speculative_tokens": k,
                       "workdir": os.path.dirname(out)})
    assert result["tokens"] == ar_tokens, "vLLM's greedy tokens differ from ar's"

    spec = result["spec"]
    drafts = spec["vllm:spec_decode_num_drafts"]  # draft chains proposed (k tokens each)
    theirs = np.array([spec[f"vllm:spec_decode_num_accepted_tokens_per_pos[{j}]"] for j in range(k)]) / drafts
    ours = verify.head_acceptance
    noise = 3 * np.sqrt(np.maximum(ours * (1 - ours), 0.05) / drafts)
    print(f"k={k} acceptance per draft position: vLLM {np.round(theirs, 3)} over {drafts} chains, verify "
          f"{np.round(ours, 3)} over {verify.offered.sum(0)}; 3 sigma {np.round(noise, 3)}")
    assert 0.1 < ours[0] < 0.9, "the test's draft layer should be right sometimes, not always"
    assert np.all(np.abs(theirs - ours) <= noise)
