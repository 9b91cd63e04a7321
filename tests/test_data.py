"""The tfds data pipeline (array_record, no TensorFlow) with a real, tiny, freshly trained BPE tokenizer."""

import numpy as np
import pytest

from clp_jax.train import data
from helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def corpus_dir(tmp_path):
    for i in range(6):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 8)
    (tmp_path / "notes.jsonl").write_text('{"text": "plain prose for the corpus"}\n"a bare string"\n')
    return tmp_path


def test_data_mode_rows_through_tfds(tokenizer, corpus_dir, tmp_path):
    dc = data.DataConfig(sources=(str(corpus_dir),), mode="data", seq_len=16, max_records=20,
                         validation_fraction=0.25)
    rows = data.records(dc, tokenizer, None, pad_id=0, progress=False)
    assert len(rows) == 20 and all(r["tokens"].shape == (16,) for r in rows)
    ds = data.build_dataset(dc, data.dataset_name(dc, "tiny"), lambda: rows, str(tmp_path / "tfds"))
    assert (len(ds["train"]), len(ds["validation"])) == (15, 5)
    batch = data.get_batch(ds["train"], data.batch_indices(15, 0, 4, seed=0))
    assert batch["tokens"].shape == (4, 16) and batch["mask"].all()
    reopened = data.build_dataset(dc, data.dataset_name(dc, "tiny"), lambda: [], str(tmp_path / "tfds"))
    assert len(reopened["train"]) == 15  # built once, then reused


def test_self_distill_masks_the_continuation(tokenizer, corpus_dir):
    dc = data.DataConfig(sources=(str(corpus_dir),), mode="self_distill", seq_len=12, prompt_len=5, max_records=3)
    rows = data.records(dc, tokenizer, lambda prompts: [[7] * 4 for _ in prompts], pad_id=0, progress=False)
    for r in rows:
        np.testing.assert_array_equal(r["tokens"][5:9], [7] * 4)
        np.testing.assert_array_equal(r["mask"], [False] * 4 + [True] * 5 + [False] * 3)


def test_empty_or_missing_sources(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError):
        data.source_files([str(tmp_path / "missing")], 10, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        data.source_files([str(tmp_path / "empty")], 10, 0)
    dc = data.DataConfig(sources=(str(tmp_path),), mode="data", seq_len=16)
    with pytest.raises(ValueError):
        data.build_dataset(dc, "empty", lambda: [], str(tmp_path / "tfds"))


def test_stdlib_corpus_exists_and_excludes_tests():
    files = data.source_files(["stdlib"], 50, 0)
    assert len(files) == 50 and not any("/test" in f for f in files)


def test_catalog_dataset_offline_says_what_to_do():
    with pytest.raises(RuntimeError, match="catalog dataset"):
        list(data.read_texts("tfds:no_such_dataset_here:train"))
