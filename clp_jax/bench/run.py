"""One-run benchmark: every decoding mode and the transformers peers, speed and quality side by side.

  python -m clp_jax.bench --limit 8 --max-new-tokens 128 --out bench_out

Prompts are HumanEval problems (raw completion) and a chat/prose set (chat template). Each prompt
is decoded by every method in turn (batch 1, greedy) in this one process, after every program is
compiled, so the ratios compare like with like. Writes bench.json (top-level `modes`), bench.md
and two plots into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import resource
import shlex
import sys
import time
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from clp_jax.bench import drafts, quality, roofline
from clp_jax.bench import report as bench_report
from clp_jax.bench.peers import PEERS, TransformersPeer
from clp_jax.bench.vllm_peer import VLLM_PEERS, check_vllm, vllm_runs
from clp_jax.cli import options
from clp_jax.cli.report import policy
from clp_jax.decode import pass_costs
from clp_jax.decode.decoder import (DRAFT_BUDGETS, DRAFT_SOURCES, MIN_PROMPT_BUCKET, DecodeConfig, DecodeResult,
                                    Decoder, _bucket)
from clp_jax.decode.prompts import CHAT_PROMPTS, encode
from clp_jax.drafting.heads import param_summary
from clp_jax.model.numerics import acceptance_ratio
from clp_jax.weights import loading

log = logging.getLogger(__name__)

SETS = ("humaneval", "chat")
MTP_MODES = ("clp", "verify", "confadapt", "gate")
DEFAULT_MODES = "ar,clp,verify,confadapt,gate"  # gate only where the heads carry one


@dataclasses.dataclass
class Sample:
    set: str  # "humaneval" or "chat"
    name: str
    ids: list[int]
    problem: dict | None = None  # HumanEval problem (prompt, test, entry_point)


@dataclasses.dataclass
class Run:
    """One prompt decoded by one method."""

    tokens: list[int]
    decode_seconds: float  # after the prompt's first token (None for the peers: not separable)
    total_seconds: float  # prefill + decode
    passes: int  # backbone forward passes, prefill included
    offered: np.ndarray | None = None  # [k] drafts offered per head position
    accepted: np.ndarray | None = None
    result: DecodeResult | None = None  # the decoder's own record (policy statistics; None for the peers)
    capacity: int = 0  # the cache length it decoded with (its pass-cost table's)


def load_samples(tokenizer, sets: Sequence[str], limit: int | None) -> list[Sample]:
    samples = []
    if "humaneval" in sets:
        for p in quality.humaneval_problems(limit):
            samples.append(Sample("humaneval", p["task_id"], encode(tokenizer, p["prompt"], chat=False), p))
    if "chat" in sets:
        for i, text in enumerate(CHAT_PROMPTS[:limit] if limit else CHAT_PROMPTS):
            samples.append(Sample("chat", f"chat/{i}", encode(tokenizer, text, chat=True)))
    return samples


def verify_variant(spec: str) -> dict:
    """'BUDGET[-SOURCE][-treeN]' (e.g. 'auto', 'fixed-heads', 'auto-tree2') -> DecodeConfig fields."""
    parts = spec.split("-")
    tree = 0
    if parts[-1].startswith("tree") and parts[-1][4:].isdigit() and len(parts) > 1:
        tree = int(parts.pop()[4:])
    budget, source = parts[0], "-".join(parts[1:])
    if budget not in DRAFT_BUDGETS or (source and source not in DRAFT_SOURCES):
        raise ValueError(f"--verify-variants entry {spec!r}: expected BUDGET[-SOURCE][-treeN] with BUDGET one of "
                         f"{', '.join(DRAFT_BUDGETS)} and SOURCE one of {', '.join(DRAFT_SOURCES)}.")
    return {"draft_budget": budget, **({"draft_source": source} if source else {}), **({"tree": tree} if tree else {})}


def mode_configs(modes: Sequence[str], taus: Sequence[float], k: int, max_new_tokens: int,
                 verify_ks: Sequence[int] = (), clp_confidences: Sequence[float] = (),
                 variants: Sequence[str] = ("auto", "fixed-heads")) -> dict[str, DecodeConfig]:
    """Label -> DecodeConfig; confadapt runs once per tau, verify once per variant (`verify` is the first,
    the others `verify@VARIANT`) and also at each of `verify_ks` heads (`verify@k3`, `verify@k3-VARIANT`),
    clp also with each CLP confidence margin."""
    out = {}

    def verify(label, kk):
        for i, v in enumerate(variants):
            name = label if i == 0 else (f"{label}-{v}" if "@" in label else f"{label}@{v}")
            out[name] = DecodeConfig(mode="verify", k=kk, max_new_tokens=max_new_tokens, **verify_variant(v))

    for mode in ("ar",) + tuple(m for m in modes if m != "ar"):
        if mode == "confadapt":
            for tau in taus:
                out[f"confadapt@{tau:g}"] = DecodeConfig(mode=mode, k=k, max_new_tokens=max_new_tokens, tau=tau)
        elif mode == "verify":
            verify("verify", k)
        else:
            out[mode] = DecodeConfig(mode=mode, k=k, max_new_tokens=max_new_tokens)
        if mode == "clp":
            for c in clp_confidences:
                out[f"clp@p{c:g}"] = DecodeConfig(mode=mode, k=k, max_new_tokens=max_new_tokens, clp_confidence=c)
        if mode == "verify":
            for kk in verify_ks:
                if kk != k:
                    verify(f"verify@k{kk}", kk)
    return out


def _costs_of(decoders: dict, runs: dict) -> dict | None:
    """The pass-cost tables the verify rows read (batch 1, one per cache length the prompts needed), for the
    report: the one most prompts used, `ar`'s measured ms per pass, and a note for every table `ar`'s passes at
    its cache length disagree with (it is then marked stale: the next run re-times it)."""
    for label, d in decoders.items():
        if d.dc.mode != "verify":
            continue
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(runs[label]):
            if r.capacity:
                by_len.setdefault(r.capacity, []).append(i)
        if not by_len:
            return None
        notes, ar_ms = [], {}
        for cap, idx in sorted(by_len.items()):
            ar = [runs["ar"][i] for i in idx]
            ar_ms[cap] = 1e3 * sum(r.decode_seconds for r in ar) / max(sum(r.passes - 1 for r in ar), 1)
            note = pass_costs.check_against(d.model, 1, d.costs(1, cap), ar_ms[cap], cache_len=cap)
            if note:
                log.warning(note)
                notes.append(note)
        cap = max(by_len, key=lambda c: len(by_len[c]))
        c = d.costs(1, cap)
        return {"width": list(c.width), "draft_first": list(c.draft_first), "draft_step": c.draft_step,
                "ms": c.ms, "ar_ms": round(ar_ms[cap], 2), "cache_len": cap, "stale": " ".join(notes),
                "text": c.format()}
    return None


def vllm_acceptance(spec: dict, tokens: int, prompts: int) -> dict:
    """tokens per pass and per-position acceptance of vLLM's MTP drafts from its counters."""
    chains = max(spec.get("vllm:spec_decode_num_drafts", 0), 1)
    per_pos = [spec[key] / chains for key in sorted((k for k in spec if "accepted_tokens_per_pos" in k),
                                                key=lambda k: int(k.rsplit("[", 1)[1].rstrip("]")))]
    # each draft chain rides one decoding pass; the prefill emits each prompt's first token
    return {"tokens_per_pass": tokens / (chains + prompts), "head_acceptance": [round(a, 4) for a in per_pos],
            "vllm_spec": spec}


def warm_up(decoder: Decoder, samples: Sequence[Sample]) -> None:
    """Compiles prefill and loop for every prompt bucket, so no timed run pays for compilation."""
    seen = set()
    for s in samples:
        bucket = _bucket(len(s.ids), MIN_PROMPT_BUCKET)
        if bucket not in seen:
            seen.add(bucket)
            jax.block_until_ready(decoder.advance(decoder.start([s.ids]), 1).length)


def run_decoder(decoder: Decoder, ids: list[int]) -> Run:
    res = decoder.generate([ids])
    return Run(res.tokens[0], res.decode_seconds, res.prefill_seconds + res.decode_seconds,
               int(res.passes.sum()), res.offered.sum(0), res.accepted.sum(0), res, decoder.capacity_for([ids]))


def clock_of(decoder: Decoder, runs: Sequence[Run], ar_runs: Sequence[Run]) -> dict | None:
    """A mode's ms per loop pass over its runs, on the clock and as its pass-cost table models them (the
    overhead per pass included), each run in units of the `ar` run of its prompt (timed beside it), or None
    (ar, a given table). Runs that did not compile fold their overhead into the table for later decoders."""
    c = decoder.clock_beside_ar((r.result, 1, r.capacity, a.result.ms_per_pass if a.result is not None else None)
                                for r, a in zip(runs, ar_runs) if r.result is not None and r.capacity)
    if c is None:
        return None
    return {"passes": c.passes, "clock_ms_per_pass": round(c.clock_ms, 2), "modelled_ms_per_pass": round(c.modelled_ms, 2),
            "error": round(c.error, 4), "overhead_ms_per_pass": round(c.overhead_ms, 2),
            "unit_ms": round(c.unit_ms, 2), "unit": c.unit}


def summarize(runs: Sequence[Run], ref: Sequence[Run], passed: Sequence[bool] | None) -> dict:
    """Speed and quality of one method over a list of prompts, against `ar`'s runs of the same prompts."""
    tokens = sum(len(r.tokens) for r in runs)
    total = sum(r.total_seconds for r in runs)
    ref_tokens = sum(len(r.tokens) for r in ref)
    e2e, ref_e2e = tokens / max(total, 1e-9), ref_tokens / max(sum(r.total_seconds for r in ref), 1e-9)
    out = {"prompts": len(runs), "tokens": tokens, "tokens_per_s_e2e": e2e, "speedup_e2e": e2e / ref_e2e,
           "tokens_per_pass": tokens / max(sum(r.passes for r in runs), 1),
           "exact_match": float(np.mean([r.tokens == q.tokens for r, q in zip(runs, ref)]))}
    if all(r.decode_seconds is not None for r in runs):
        # decode rate: tokens after the first one (which the prefill pass emits) per decode second
        dec = (tokens - len(runs)) / max(sum(r.decode_seconds for r in runs), 1e-9)
        ref_dec = (ref_tokens - len(ref)) / max(sum(r.decode_seconds for r in ref), 1e-9)
        out.update(tokens_per_s=dec, speedup=dec / ref_dec)
    else:  # the peers: end to end only
        out.update(tokens_per_s=e2e, speedup=out["speedup_e2e"])
    if runs[0].offered is not None:
        offered = sum(r.offered for r in runs)
        accepted = sum(r.accepted for r in runs)
        if np.sum(offered):  # ar offers no drafts
            out["head_acceptance"] = acceptance_ratio(accepted, offered).round(4).tolist()
    if runs[0].result is not None:
        out["policy"] = policy([r.result for r in runs])
    for n in (2, 3, 4):
        out[f"rep{n}"] = float(np.mean([quality.rep_n(r.tokens, n) for r in runs]))
    if passed is not None:
        out["pass_at_1"] = float(np.mean(passed))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--heads", default=None, help="heads checkpoint (default: the shipped heads), or 'zero'")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--sets", default="humaneval,chat", help="comma-separated: humaneval, chat")
    p.add_argument("--limit", type=int, default=None, help="prompts per set (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=None, help="heads used (default: all the checkpoint has)")
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help="comma-separated; the default drops gate for heads trained without the gate baseline")
    p.add_argument("--taus", default="0.5,0.7,0.9", help="confadapt thresholds (a sweep)")
    p.add_argument("--verify-ks", default="", help="also run verify with these numbers of heads, e.g. 1,2")
    p.add_argument("--verify-variants", default="auto,fixed-heads",
                   help="verify's draft budget, source and tree, one row each, BUDGET[-SOURCE][-treeN] (budgets: auto, fixed, "
                        "clp; sources: heads, lookup, both; default source: decode.py's): the first is `verify`, "
                        "the others `verify@VARIANT`")
    p.add_argument("--clp-confidences", default="", help="also run clp with these confidence margins, e.g. 0.5")
    p.add_argument("--peers", default="hf_greedy,hf_lookup",
                   help="transformers peers (hf_greedy, hf_lookup) and vLLM's (vllm, vllm_ngram, vllm_mtp: the venv of "
                        "`bash .ci/serve_venv.sh`), or 'none'")
    p.add_argument("--vllm-spec-tokens", type=int, default=1,
                   help="vllm_mtp and vllm_ngram: drafts per step (vLLM reuses the one MTP layer at every position; on this CPU 1 "
                        "beat 3)")
    p.add_argument("--lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens of hf_lookup")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HumanEval test run")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip() and x.strip() != "none"]


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command = "python -m clp_jax.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    options.setup_logging()
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _load_backbone(args):
    return loading.load_backbone(args.model, dtype=args.dtype, progress=not args.no_progress)


def run(args) -> int:

    sets, modes, peers = _split(args.sets), _split(args.modes), _split(args.peers)
    allowed_peers = PEERS + VLLM_PEERS
    for name, given, allowed in (("set", sets, SETS), ("mode", modes, ("ar",) + MTP_MODES), ("peer", peers, allowed_peers)):
        bad = sorted(set(given) - set(allowed))
        if bad:
            raise ValueError(f"Unknown {name}(s) {bad}; choose from {', '.join(allowed)}.")
    if not sets:
        raise ValueError("--sets names no prompt set.")
    taus = [float(t) for t in _split(args.taus)]
    variants = _split(args.verify_variants)
    if not variants:
        raise ValueError("--verify-variants names no variant.")
    for v in variants:
        verify_variant(v)
    mtp = [m for m in modes if m != "ar"]
    options.check_decode_args(args)
    vllm_peers = [p for p in peers if p in VLLM_PEERS]
    if vllm_peers:
        check_vllm()
        if not mtp:
            raise ValueError("The vLLM peers serve the heads' draft layer: add a drafting mode to --modes "
                             "(e.g. --modes ar,verify) so the heads load.")
        if not 1 <= args.vllm_spec_tokens <= 16:
            raise ValueError(f"--vllm-spec-tokens must lie in 1..16, got {args.vllm_spec_tokens}.")
    heads_src = options.heads_source(args.heads, args.model, mtp[0] if mtp else "ar", args.k)
    backbone = _load_backbone(args)
    heads = options.build_heads(heads_src, backbone.cfg, args.k)
    if vllm_peers and heads.cfg.kind != "draft_layer":
        raise ValueError(f"The vLLM peers serve a draft layer; these heads are {heads.cfg.kind!r}.")
    if "gate" in modes and heads is not None and heads.gate is None:
        if args.modes != DEFAULT_MODES:
            raise ValueError(f"Mode 'gate' needs heads trained with the gate baseline; {heads_src} has none "
                             "(train with heads.gate = true, or leave gate out of --modes).")
        log.warning("%s has no gate baseline: the gate row is left out.", heads_src)
        modes = [m for m in modes if m != "gate"]
    k = args.k or (heads.cfg.k if heads is not None else 1)
    samples = load_samples(backbone.tokenizer, sets, args.limit)
    verify_ks = [int(x) for x in _split(args.verify_ks)]
    if heads is not None and any(not 1 <= x <= heads.cfg.k for x in verify_ks):
        raise ValueError(f"--verify-ks must lie in 1..{heads.cfg.k} (the heads provided).")
    configs = mode_configs(modes, taus, k, args.max_new_tokens, verify_ks,
                           [float(c) for c in _split(args.clp_confidences)], variants)
    report = measure(backbone, heads, samples, configs, peers, lookup_tokens=args.lookup_tokens,
                     vllm_spec_tokens=args.vllm_spec_tokens,
                     timeout=args.timeout, progress=not args.no_progress)
    report["meta"].update(command=args.command, dtype=args.dtype, heads=heads_src)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = bench_report.markdown(report)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(table)
    bench_report.plots(report, args.out)
    print(table)
    return 0


def measure(backbone, heads, samples: Sequence[Sample], configs: dict[str, DecodeConfig],
            peers: Sequence[str] = (), lookup_tokens: int = 10, timeout: float = 10.0,
            progress: bool = True, vllm_spec_tokens: int = 1) -> dict:
    """Compiles every decoder, decodes each prompt with every method in turn, scores; returns the report."""

    decoders = {label: Decoder(backbone.model, heads, dc, backbone.eos_token_ids) for label, dc in configs.items()}
    if "ar" not in decoders:
        raise ValueError("The benchmark needs 'ar' among the modes: every ratio is taken against it.")
    for d in decoders.values():
        d.check_prompts([s.ids for s in samples])
    t_compile = time.perf_counter()
    for d in tqdm(decoders.values(), desc="compiling", disable=not progress):
        warm_up(d, samples)
    hf_peers = [p for p in peers if p in PEERS]
    vllm_peers = [p for p in peers if p in VLLM_PEERS]
    if vllm_peers:
        check_vllm()  # before the long part
    peer = None
    if hf_peers:
        peer = TransformersPeer(backbone.model, backbone.eos_token_ids, backbone.tokenizer.pad_token_id)
        peer.generate(samples[0].ids, 2)  # first-call overheads
    log.info("compiled %d decoders in %.1f s", len(decoders), time.perf_counter() - t_compile)

    max_new_tokens = next(iter(configs.values())).max_new_tokens
    runs: dict[str, list[Run]] = {label: [] for label in list(decoders) + hf_peers}
    bar = tqdm(total=len(samples) * len(runs), desc="decoding", disable=not progress)
    for s in samples:  # every method on one prompt, then the next prompt: drifts hit all alike
        for label, d in decoders.items():
            runs[label].append(run_decoder(d, s.ids))
            bar.update()
        for name in hf_peers:
            r = peer.generate(s.ids, max_new_tokens, lookup_tokens if name == "hf_lookup" else 0)
            runs[name].append(Run(r.tokens, None, r.seconds, r.passes))
            bar.update()
    bar.close()
    vllm = {}
    if vllm_peers:  # vLLM's own engines, in their venv, after clp_jax's runs (one process cannot hold both)
        vllm = vllm_runs(backbone, heads, [s.ids for s in samples], max_new_tokens, vllm_spec_tokens, vllm_peers)
        for name, v in vllm.items():
            runs[name] = [Run(r.tokens, None, r.seconds, len(r.tokens)) for r in v["runs"]]

    tok = backbone.tokenizer
    sets = list(dict.fromkeys(s.set for s in samples))
    he = [i for i, s in enumerate(samples) if s.set == "humaneval"]
    results = {}
    for label, rs in tqdm(runs.items(), desc="scoring", disable=not progress):
        passed = None
        if he:
            completions = [tok.decode(rs[i].tokens, skip_special_tokens=True) for i in he]
            passed = quality.pass_at_1([samples[i].problem for i in he], completions, timeout)
        m = summarize(rs, runs["ar"], passed)
        m["sets"] = {}
        for name in sets:
            idx = [i for i, s in enumerate(samples) if s.set == name]
            sub = summarize([rs[i] for i in idx], [runs["ar"][i] for i in idx],
                            [passed[he.index(i)] for i in idx] if name == "humaneval" else None)
            m["sets"][name] = {key: sub[key] for key in ("speedup", "exact_match", "tokens_per_pass", "head_acceptance",
                                                         "policy", "pass_at_1") if key in sub}
        if label in decoders:
            m["clock"] = clock_of(decoders[label], rs, runs["ar"])
            m["compile_seconds"] = decoders[label].compile_seconds
            m["memory_bytes"] = decoders[label].memory_bytes()
        if label in ("vllm_mtp", "vllm_ngram"):  # passes and acceptance from vLLM's counters (over all prompts)
            m.update(vllm_acceptance(vllm[label]["spec"], m["tokens"], len(rs)))
            if label == "vllm_ngram":  # steps without an n-gram match propose nothing: passes are not chains
                m["tokens_per_pass"] = None
            for name in sets:
                m["sets"][name].pop("tokens_per_pass", None)
        results[label] = m

    ar_runs = runs["ar"]
    ar_pass = sum(r.decode_seconds for r in ar_runs) / max(sum(r.passes - 1 for r in ar_runs), 1)
    meta = {
        "command": None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "device": jax.devices()[0].device_kind,
                    "jax": jax.__version__},
        "backbone": backbone.source, "dtype": backbone.cfg.dtype, "heads": None,
        "heads_params": param_summary(heads) if heads is not None else None,
        "k": next(iter(configs.values())).k,
        "prompts": {name: sum(s.set == name for s in samples) for name in sets},
        "max_new_tokens": max_new_tokens, "lookup_tokens": lookup_tokens,
        "vllm_spec_tokens": vllm_spec_tokens if set(vllm_peers) - {"vllm"} else None,
        "roofline": roofline.roofline(backbone.model, ar_pass),
        "pass_costs": _costs_of(decoders, runs),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    report = {"meta": meta, "modes": results}
    if heads is not None and any(dc.mode in MTP_MODES for dc in configs.values()):
        # the drafter at every position of ar's output, not only where a pass anchored it
        report["drafts"] = drafts.by_set(backbone.model, heads, [s.set for s in samples], [s.ids for s in samples],
                                         [r.tokens for r in ar_runs], meta["k"], progress)
    return report


if __name__ == "__main__":
    sys.exit(main())
