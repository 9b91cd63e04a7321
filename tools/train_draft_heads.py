"""Train the shipped drafters at scale: teacher-forced corpus features + self-distilled slices.

Three stages, so the heavy one can run where an accelerator is (it needs only jax, flax, optax, numpy,
gguf and this package; no tokenizer, no tfds, no network):

  python tools/train_draft_heads.py prepare --out .gpu_in          # CPU: tokenise corpus and prompts
  python tools/train_draft_heads.py run --data .gpu_in --model X.gguf --out OUT   # GPU (or CPU, slowly)
  python tools/train_draft_heads.py finish --from OUT --out runs/draft_heads      # CPU: Orbax checkpoint

`prepare` packs the Python standard library's sources into records of --seq-len tokens and writes
prompts for self-distillation: raw code completions (a stdlib function's signature and docstring, the
HumanEval form, never a HumanEval problem) and chat-template requests (code and prose; never the
benchmark's own chat prompts). `run` self-distils the prompts with the `ar` decoder, builds the
teacher-forced feature caches, fits the draft layer (k=4 and k=2) and Medusa heads (k=4) on the same
data, measures held-out agreement per position, fits the CLP on self-distilled records the drafters
never saw, and writes parameters (bf16 bits) and report.json. `finish` turns them into a heads
checkpoint (the gate baseline is copied from the previously shipped heads).

Growing a run: the corpus features are cached in shards under --work (a killed job resumes at the first
missing shard), the data splits are fixed in --work/splits.json (a larger --records only adds training
records, and tops the held-out set up with the newest ones), and --init-from warm-starts both drafters
from an earlier run's --out, so held-out figures never include what an earlier run trained on.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOPICS = (
    "how tides work", "the water cycle", "why leaves change colour in autumn", "how vaccines train the immune system",
    "the history of the printing press", "how a bicycle stays upright", "the basics of compound interest",
    "how bees communicate", "what causes earthquakes", "the life of a medieval blacksmith", "how rainbows form",
    "the benefits of regular exercise", "how to plan a small vegetable garden", "the rules of chess",
    "how a refrigerator keeps food cold", "the importance of sleep", "how airplanes generate lift",
    "the invention of the telephone", "how to prepare for a job interview", "the solar system",
    "how credit cards work", "why the ocean is salty", "the Roman Empire", "how to learn a new language",
    "photosynthesis", "how the internet routes data", "climate and weather", "the life cycle of a butterfly",
    "how to write a good cover letter", "the causes of inflation", "how electric cars work", "volcanoes",
    "a robot learning to paint", "a cat who becomes mayor of a small town", "a lost key in an old house",
    "a friendship between a dragon and a baker", "a time traveller stuck in 1920", "a rainy afternoon in Paris",
    "saving money on groceries", "staying motivated while studying", "keeping a houseplant alive",
    "how a compiler works", "what recursion is", "the difference between a process and a thread",
    "how binary search works", "what a database index does", "how public key cryptography works",
    "version control with git", "unit testing", "how garbage collection works", "big O notation",
)
TASKS = (
    "Explain {t} in a short paragraph.", "Write a short story about {t}.", "Give three practical tips about {t}.",
    "Summarise {t} in a few sentences.", "Describe {t} to a ten-year-old.", "Write a short poem about {t}.",
    "What are the most common misconceptions about {t}?", "Write a brief blog post introduction about {t}.",
    "List the key facts about {t}.", "Write a polite email to a friend recommending a book about {t}.",
)


def _stdlib_functions(files, limit: int, seed: int):
    """(name, signature+docstring source, first docstring line) of documented stdlib functions."""
    out = []
    for path in files:
        try:
            src = open(path, encoding="utf-8").read()
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 30 or not node.body or node.col_offset != 0:
                continue
            first = node.body[0]
            text = "\n".join(lines[node.lineno - 1:first.end_lineno]) + "\n"
            if len(text) > 1500:
                continue
            out.append((node.name, text, doc.strip().splitlines()[0]))
    rng = np.random.RandomState(seed)
    return [out[i] for i in rng.permutation(len(out))[:limit]]


def prepare(args) -> None:
    from clp_jax.decode.prompts import CHAT_PROMPTS, encode
    from clp_jax.train.data import packed_rows, source_files, token_stream
    from clp_jax.weights.loading import load_backbone

    tok = load_backbone(args.model).tokenizer
    files = source_files(("stdlib",), 100000, args.seed)
    rows = np.stack(list(packed_rows(token_stream(tok, files), args.seq_len, args.records)))
    funcs = _stdlib_functions(files, args.code_prompts + args.chat_code_prompts, args.seed)
    n_code = len(funcs) * args.code_prompts // (args.code_prompts + args.chat_code_prompts)
    code = [tok(t, add_special_tokens=False)["input_ids"] for _, t, _ in funcs[:n_code]]
    chat_texts = [f"Write a Python function `{n}` that does the following: {d}" for n, _, d in funcs[n_code:]]
    chat_texts += [task.format(t=t) for t in TOPICS for task in TASKS]
    chat_texts = [c for c in chat_texts if c not in CHAT_PROMPTS]
    chat = [encode(tok, c, chat=True) for c in chat_texts]
    prompts = [p for p in code + chat if 4 <= len(p) <= args.max_prompt]
    kinds = np.array([0] * len(code) + [1] * len(chat))[[4 <= len(p) <= args.max_prompt for p in code + chat]]
    flat = np.concatenate([np.asarray(p, np.int32) for p in prompts])
    offsets = np.cumsum([0] + [len(p) for p in prompts])
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, "data.npz"), corpus=rows, prompt_tokens=flat, prompt_offsets=offsets,
             prompt_kinds=kinds, eos=np.asarray([tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]))
    print(f"corpus records {rows.shape}, prompts {len(prompts)} (code {int((kinds == 0).sum())}, chat "
          f"{int((kinds == 1).sum())}) -> {args.out}/data.npz")


def _bits(x) -> np.ndarray:
    import ml_dtypes

    return np.asarray(x).astype(ml_dtypes.bfloat16).view(np.uint16)


def _save_params(module, path: str) -> None:
    from flax import nnx

    flat = {"/".join(map(str, k)): _bits(v) for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    flat = {k: getattr(v, "value", v) for k, v in flat.items()}
    np.savez(path, **flat)


def _splits(path: str, n_corpus: int, n_distilled: int, heldout: int):
    """Held-out corpus records, self-distilled CLP records and self-distilled drafter records, fixed
    across runs in `path` (so a warm start never evaluates on what an earlier run trained on). When the
    corpus has grown since, the held-out set is topped up to `heldout` with the newest records, which no
    earlier run has seen."""
    if os.path.exists(path):
        with open(path) as f:
            sp = json.load(f)
        if sp["distilled_records"] != n_distilled or sp["corpus_records"] > n_corpus:
            raise ValueError(f"{path} was written for {sp['corpus_records']} corpus / {sp['distilled_records']} "
                             f"self-distilled records, not {n_corpus} / {n_distilled}; use a new --work directory.")
        held = list(sp["corpus_heldout"])
        extra = max(0, min(heldout - len(held), n_corpus - sp["corpus_records"]))
        held += list(range(n_corpus - extra, n_corpus))
    else:
        rng = np.random.RandomState(0)
        c_perm, s_perm = rng.permutation(n_corpus), rng.permutation(n_distilled)
        held = c_perm[:heldout].tolist()
        sp = {"distilled_clp": s_perm[: int(n_distilled * 0.3)].tolist(),
              "distilled_train": s_perm[int(n_distilled * 0.3):].tolist()}
    sp.update(corpus_heldout=[int(i) for i in held], corpus_records=n_corpus, distilled_records=n_distilled)
    with open(path, "w") as f:
        json.dump(sp, f)
    return np.array(held, np.int64), np.array(sp["distilled_clp"], np.int64), np.array(sp["distilled_train"], np.int64)


def run(args) -> None:
    import jax
    from flax import nnx

    from clp_jax.decode.loop import DecodeConfig, Decoder
    from clp_jax.drafting.heads import Heads, HeadsConfig
    from clp_jax.train import draft_fit, teacher_forced

    t_start = time.time()
    report = {"device": str(jax.devices()[0]), "jax": jax.__version__, "timings": {}}
    if args.tiny:  # CPU smoke run on a tiny random backbone
        from clp_jax.model.config import ModelConfig
        from clp_jax.model.qwen2 import init_model

        model = init_model(ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2,
                                       num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False))
    else:
        from clp_jax.weights.convert import convert_gguf

        # features close to fp32 CPU decoding (bf16_3x products), training at the default precision
        jax.config.update("jax_default_matmul_precision", "high")
        model = convert_gguf(args.model, progress=False)
    V = model.cfg.vocab_size
    d = np.load(os.path.join(args.data, "data.npz"))
    corpus = np.minimum(d["corpus"][:args.records], V - 1)
    offs = d["prompt_offsets"]
    prompts = [np.minimum(d["prompt_tokens"][offs[i]:offs[i + 1]], V - 1).tolist() for i in range(len(offs) - 1)]
    keep = np.sort(np.random.RandomState(2).permutation(len(prompts))[:args.prompts])  # code and chat mixed
    prompts = [prompts[i] for i in keep]
    prompt_kinds = d["prompt_kinds"][keep]
    report["timings"]["load"] = time.time() - t_start

    # 1. self-distilled continuations (the decode distribution itself); batches in a seeded random
    # order so that every batch has the same prompt bucket (one compiled program)
    t0 = time.time()
    work = args.work
    c_dir, s_dir = os.path.join(work, "corpus_shards"), os.path.join(work, "distilled")
    if not os.path.exists(os.path.join(s_dir, "meta.json")):
        dec = Decoder(model, None, DecodeConfig(mode="ar", max_new_tokens=args.new_tokens),
                      tuple(int(e) for e in d["eos"]))
        order = np.random.RandomState(1).permutation(len(prompts))
        distilled = [None] * len(prompts)
        for i in range(0, len(order), args.gen_batch):
            idx = order[i:i + args.gen_batch]
            out = dec.generate([prompts[j] for j in idx])
            for j, toks in zip(idx, out.tokens):
                distilled[j] = prompts[j] + toks
            print(f"self-distilled {min(i + args.gen_batch, len(order))}/{len(order)} {time.time() - t0:.0f}s", flush=True)
        report["timings"]["self_distill"] = time.time() - t0
        sd_tokens, sd_lengths = teacher_forced.pad_records(distilled, max(len(r) for r in distilled))
        # 2. teacher-forced feature caches
        t0 = time.time()
        teacher_forced.build_cache(model, sd_tokens, sd_lengths, s_dir, batch_size=args.feat_batch, progress=False)
        print(f"distilled features {time.time() - t0:.0f}s", flush=True)
    t0 = time.time()  # corpus features in shards: a killed job resumes at the first missing shard
    teacher_forced.build_sharded(model, corpus, np.full(len(corpus), corpus.shape[1], np.int32), c_dir,
                                 shard_records=args.shard_records, batch_size=args.feat_batch)
    report["timings"]["features"] = time.time() - t0
    print(f"corpus features {time.time() - t0:.0f}s", flush=True)
    if args.features_only:
        return
    sd_lengths = np.load(os.path.join(s_dir, "lengths.npy"))
    sd_len = int(np.load(os.path.join(s_dir, "tokens.npy"), mmap_mode="r").shape[1])
    distilled = sd_lengths
    corpus_c, sd_c = teacher_forced.load_cache(c_dir), teacher_forced.load_cache(s_dir)
    if not args.tiny:
        jax.config.update("jax_default_matmul_precision", "default")

    # splits: corpus held-out records; self-distilled: 70% drafters, 30% CLP (never seen by drafters)
    n_c, n_s = len(corpus), len(distilled)
    c_held, s_clp, s_train = _splits(os.path.join(work, "splits.json"), n_c, n_s, args.heldout)
    c_train = np.setdiff1d(np.arange(n_c), c_held)
    kinds = prompt_kinds
    # held-out agreement and the CLP count only drafts of generated tokens (a record's prompt, the chat
    # template's system turn above all, is not what decoding drafts)
    prompt_lengths = np.array([len(p) for p in prompts])
    sd_gen = draft_fit.mask_prompts(sd_c, prompt_lengths)
    vocab = teacher_forced.label_vocabulary(np.concatenate([np.asarray(corpus_c["labels"]).ravel(),
                                                            np.asarray(sd_c["labels"]).ravel()]), args.vocab_size,
                                            always=[int(e) for e in d["eos"] if e < V])
    report["draft_vocab"] = len(vocab)
    report["init_from"] = args.init_from or None
    report["positions"] = {"corpus_train": int(len(c_train) * corpus.shape[1]),
                           "distilled_train": int(sd_lengths[s_train].sum()),
                           "distilled_clp": int(sd_lengths[s_clp].sum())}
    # one combined training source: windows from both caches, mixed per step
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "draft_vocab.npy"), vocab)

    def train(kind: str, k: int, steps: int):
        cfg = HeadsConfig.for_backbone(model.cfg, k=k, kind=kind, gate=False)
        heads = Heads(cfg, rngs=nnx.Rngs(0), draft_vocab=vocab)
        if kind == "draft_layer":
            heads.drafter.init_from_backbone(model)
        if args.init_from:  # warm start from an earlier run's parameters (same splits: see _splits)
            import glob

            files = (sorted(glob.glob(os.path.join(args.init_from, "draft_layer_*.npz"))) if kind == "draft_layer"
                     else [os.path.join(args.init_from, f"medusa_k{k}.npz")])
            if files and all(os.path.exists(f) for f in files):
                _load_bits(heads.drafter if kind == "draft_layer" else heads.mtp, files)
                print(f"{kind} k={k}: warm start from {files}", flush=True)
            else:
                print(f"{kind} k={k}: nothing to warm start from in {args.init_from}; from the initialisation", flush=True)
        fc = draft_fit.FitConfig(steps=steps, batch_size=args.batch, window=args.window,
                                 learning_rate=args.lr if kind == "draft_layer" else args.medusa_lr)
        fitter = draft_fit.DraftFitter(model, heads, vocab, fc)
        if args.minutes:  # fit the step count to a time budget: time two steps after the compile
            probe = draft_fit.DraftFitter(model, heads, vocab, fc)
            for s in range(3):
                if s == 1:
                    t_probe = time.time()
                jax.block_until_ready(probe.step(draft_fit.sample_windows(corpus_c, s, fc.batch_size, fc.window,
                                                                           fc.seed, c_train))["loss"])
            per_step = (time.time() - t_probe) / 2
            steps = max(10, min(steps, int(args.minutes * 60 / per_step)))
            print(f"{kind} k={k}: {per_step:.2f} s per step -> {steps} steps in {args.minutes} min", flush=True)
            fc = dataclasses.replace(fc, steps=steps)
            fitter = draft_fit.DraftFitter(model, heads, vocab, fc)
        t0 = time.time()
        hist = []
        # alternate the two sources: 3 corpus steps, 1 self-distilled step
        from tqdm.auto import tqdm

        for s in tqdm(range(steps), desc=f"{kind} k={k}", disable=args.tiny, mininterval=10):
            src, recs = (sd_c, s_train) if s % 4 == 3 else (corpus_c, c_train)
            m = fitter.step(draft_fit.sample_windows(src, s, fc.batch_size, fc.window, fc.seed, recs))
            if (s + 1) % 100 == 0 or s + 1 == steps:
                m = jax.device_get(m)
                hist.append({"step": s + 1, "loss": float(m["loss"]), "agreement": np.round(m["agreement"], 3).tolist(),
                             "seconds": round(time.time() - t0, 1)})
                print(kind, k, hist[-1], flush=True)
        train_s = time.time() - t0
        ev = {"corpus": fitter.evaluate(draft_fit.eval_batches(corpus_c, c_held, args.window, args.batch)),
              "chat": fitter.evaluate(draft_fit.eval_batches(sd_gen, s_clp[kinds[s_clp] == 1], sd_len, args.batch)),
              "code": fitter.evaluate(draft_fit.eval_batches(sd_gen, s_clp[kinds[s_clp] == 0], sd_len, args.batch))}
        return fitter.trained_heads(), {"train_seconds": train_s, "steps": steps,
                                        "positions_seen": steps * fc.batch_size * fc.window,
                                        "history": hist, "heldout": ev}

    t0 = time.time()
    results = {}
    shipped, results["draft_layer_k4"] = train("draft_layer", 4, args.steps)
    if args.medusa_minutes:
        args.minutes = args.medusa_minutes
    if args.k2:
        _, results["draft_layer_k2"] = train("draft_layer", 2, args.steps // 2)
    if not args.skip_compare:
        medusa, results["medusa_k4"] = train("medusa", 4, args.medusa_steps or args.steps)
        _save_params(medusa.mtp, os.path.join(args.out, "medusa_k4.npz"))
    report["timings"]["fit"] = time.time() - t0
    report["results"] = results

    # CLP on self-distilled records the drafter never saw
    t0 = time.time()
    h, correct = draft_fit.chain_correct(shipped, model, sd_c, s_clp, first_anchor=prompt_lengths[s_clp] - 1)
    report["clp"] = draft_fit.fit_clp(shipped, h, correct)
    report["clp"]["positions"] = int(len(h))
    report["clp"]["draft_acceptance_on_clp_records"] = correct.mean(0).tolist()
    report["timings"]["clp"] = time.time() - t0
    _save_params(shipped.clp, os.path.join(args.out, "clp.npz"))
    # the draft layer (bf16 bits), split so every file stays under 16 MB
    flat = {"/".join(map(str, k)): _bits(getattr(v, "value", v))
            for k, v in nnx.to_flat_state(nnx.state(shipped.drafter, nnx.Param))}
    parts, cur, size = [], {}, 0
    for name, arr in flat.items():
        if size + arr.nbytes > 15_000_000 and cur:
            parts.append(cur)
            cur, size = {}, 0
        cur[name], size = arr, size + arr.nbytes
    parts.append(cur)
    for i, p in enumerate(parts):
        np.savez(os.path.join(args.out, f"draft_layer_{i}.npz"), **p)
    report["timings"]["total"] = time.time() - t_start
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    for name, r in results.items():
        print(name, json.dumps(r["heldout"]))


def _load_bits(module, files) -> None:
    import jax.numpy as jnp
    import ml_dtypes
    from flax import nnx

    vals = {}
    for f in files:
        with np.load(f) as z:
            vals.update({k: z[k] for k in z.files})
    state = nnx.state(module, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for key, var in flat.items():
        name = "/".join(map(str, key))
        if name not in vals:
            raise KeyError(f"parameter {name} missing from {files}")
        arr = vals[name].view(ml_dtypes.bfloat16)
        if arr.shape != var.value.shape:
            raise ValueError(f"{name}: {arr.shape} != {var.value.shape}")
        var.value = jnp.asarray(arr, var.value.dtype)
    nnx.update(module, state)


def finish(args) -> None:
    import glob

    from flax import nnx

    from clp_jax.drafting.checkpoint import load_heads, save_heads, shipped_heads_path
    from clp_jax.drafting.heads import Heads, HeadsConfig
    from clp_jax.weights.loading import load_backbone

    bb = load_backbone(args.model)
    with open(os.path.join(args.src, "report.json")) as f:
        report = json.load(f)
    vocab = np.load(os.path.join(args.src, "draft_vocab.npy"))
    old = load_heads(shipped_heads_path("demo"), bb.model.cfg)
    if old.draft_vocab is not None:  # the carried-over gate drafted from its own vocabulary too
        vocab = np.union1d(vocab, np.asarray(old.draft_vocab[...])).astype(np.int32)
    cfg = HeadsConfig.for_backbone(bb.model.cfg, k=4, kind="draft_layer", gate=True)
    heads = Heads(cfg, rngs=nnx.Rngs(0), draft_vocab=vocab)
    _load_bits(heads.drafter, sorted(glob.glob(os.path.join(args.src, "draft_layer_*.npz"))))
    _load_bits(heads.clp, [os.path.join(args.src, "clp.npz")])
    nnx.update(heads.gate_heads, nnx.state(old.gate_heads, nnx.Param))
    nnx.update(heads.gate, nnx.state(old.gate, nnx.Param))
    extra = {"training": {k: report.get(k) for k in ("device", "positions", "timings", "draft_vocab", "init_from")},
             "evaluation": {n: r["heldout"] for n, r in report["results"].items()},
             "clp": report["clp"], "clp_confidence": report["clp"]["clp_confidence"],
             "gate": "carried over from the previous shipped heads (Medusa-style gate heads + MLP gate)"}
    save_heads(args.out, heads, bb.model.cfg, extra)
    print("saved", args.out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--model", default="demo")
    p.add_argument("--out", default=".gpu_in")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--records", type=int, default=6400)
    p.add_argument("--code-prompts", type=int, default=2048)
    p.add_argument("--chat-code-prompts", type=int, default=600)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--model", default="")
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="/tmp/clp_tf")
    r.add_argument("--tiny", action="store_true")
    r.add_argument("--records", type=int, default=6400)
    r.add_argument("--prompts", type=int, default=100000)
    r.add_argument("--heldout", type=int, default=128)
    r.add_argument("--new-tokens", type=int, default=128)
    r.add_argument("--gen-batch", type=int, default=128)
    r.add_argument("--feat-batch", type=int, default=16)
    r.add_argument("--shard-records", type=int, default=128, help="corpus records per feature shard")
    r.add_argument("--vocab-size", type=int, default=32768)
    r.add_argument("--steps", type=int, default=3000)
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--window", type=int, default=256)
    r.add_argument("--lr", type=float, default=3e-4)
    r.add_argument("--medusa-lr", type=float, default=1e-3)
    r.add_argument("--skip-compare", action="store_true")
    r.add_argument("--k2", action="store_true", help="also fit a k=2 draft layer (half the steps)")
    r.add_argument("--medusa-steps", type=int, default=0)
    r.add_argument("--features-only", action="store_true")
    r.add_argument("--init-from", default="", help="warm start: an earlier run's --out directory")
    r.add_argument("--medusa-minutes", type=float, default=0)
    r.add_argument("--minutes", type=float, default=0, help="time budget per fit (steps shrink to fit it)")
    f = sub.add_parser("finish")
    f.add_argument("--from", dest="src", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--model", default="demo")
    args = ap.parse_args(argv)
    {"prepare": prepare, "run": run, "finish": finish}[args.cmd](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
