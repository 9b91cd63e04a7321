"""Training inputs through tensorflow-datasets (array_record, no TensorFlow) with a real, tiny, freshly
trained BPE tokenizer (with a ChatML template), and the self-distillation prompts."""

import numpy as np
import pytest

from clp_jax.decode.prompts import CHAT_PROMPTS
from clp_jax.train import data, prompts
from helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def corpus_dir(tmp_path):  # apart from the tfds directories the tests write (they hold .json files)
    tmp_path = tmp_path / "corpus"
    tmp_path.mkdir()
    for i in range(6):
        body = "".join(f"def f{i}_{j}(x):\n    \"\"\"Scale x by {i} and shift it by {j} (documented).\"\"\"\n"
                       f"    return x * {i} + {j}\n\n" for j in range(4))
        (tmp_path / f"m{i}.py").write_text(body)
    (tmp_path / "notes.jsonl").write_text('{"text": "plain prose for the corpus"}\n"a bare string"\n')
    return tmp_path


def _config(corpus_dir, **kw):
    fields = dict(sources=(str(corpus_dir),), seq_len=256, corpus_records=3, code_prompts=4, chat_code_prompts=3,
                  chat_prompts=5, max_prompt_len=200, new_tokens=8)
    fields.update(kw)
    return data.DataConfig(**fields)


def test_inputs_through_tfds_per_kind(tokenizer, corpus_dir, tmp_path):
    dc = _config(corpus_dir)
    inputs = data.build_inputs(dc, tokenizer, "tiny", str(tmp_path / "tfds"))
    assert {k: len(v) for k, v in inputs.items()} == {"corpus": 3, "code": 4, "chat_code": 3, "chat": 5}
    assert all(len(r) == 256 for r in inputs["corpus"])
    assert all(len(r) <= 200 for kind in ("code", "chat_code", "chat") for r in inputs[kind])
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(r[0] == im_start for r in inputs["chat"] + inputs["chat_code"])  # through the chat template
    assert all(im_start not in r for r in inputs["code"])  # raw completions
    assert tokenizer.decode(inputs["code"][0]).startswith("def f")
    again = data.build_inputs(dc, tokenizer, "tiny", str(tmp_path / "tfds"))  # built once, then reused
    assert again == inputs


def test_growing_the_counts_only_appends(tokenizer, corpus_dir, tmp_path):
    """A larger dataset starts with the records of the smaller one (tfds stores them in generation order),
    so a grown run's feature shards stay valid."""
    small = data.build_inputs(_config(corpus_dir), tokenizer, "tiny", str(tmp_path / "tfds"))
    big = data.build_inputs(_config(corpus_dir, corpus_records=4, code_prompts=8, chat_prompts=9), tokenizer,
                            "tiny", str(tmp_path / "tfds"))
    for kind, rows in small.items():
        assert len(big[kind]) >= len(rows) and big[kind][:len(rows)] == rows, kind
    assert len(big["chat"]) > len(small["chat"]) and len(big["corpus"]) > len(small["corpus"])


def test_prompts_never_hold_the_bench_prompts():
    assert not set(CHAT_PROMPTS) & set(prompts.chat_requests(0))
    assert len(prompts.chat_requests(0)) > 4000


def test_config_bounds_say_what_to_change():
    with pytest.raises(ValueError, match="max_prompt_len.*new_tokens.*seq_len"):
        data.DataConfig(seq_len=64, max_prompt_len=48, new_tokens=32)
    with pytest.raises(ValueError, match="No records"):
        data.DataConfig(corpus_records=0, code_prompts=0, chat_code_prompts=0, chat_prompts=0)
    with pytest.raises(ValueError, match="chat_prompts must be in 0..1000000"):
        data.DataConfig(chat_prompts=10 ** 9)


def test_empty_or_missing_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.source_files([str(tmp_path / "missing")], 10, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        data.source_files([str(tmp_path / "empty")], 10, 0)


def test_stdlib_corpus_exists_and_excludes_tests():
    files = data.source_files(["stdlib"], 50, 0)
    assert len(files) == 50 and not any("/test" in f for f in files)


def test_catalog_dataset_offline_says_what_to_do():
    with pytest.raises(RuntimeError, match="catalog dataset"):
        list(data.read_texts("tfds:no_such_dataset_here:train"))


def test_prompts_sharing_a_run_of_words_with_a_bench_prompt_are_dropped():
    overlap = prompts.BenchOverlap(["Write a Python function that reverses the words of a sentence, keeping order."])
    assert overlap("Please write a python function that reverses the words of a sentence!")
    assert not overlap("Write a Python function that sorts the words of a sentence.")
    bench = prompts.BenchOverlap.of_bench()
    assert all(bench(t) for t in CHAT_PROMPTS)
    assert not any(bench(t) for t in prompts.chat_requests(0)[:500])


def test_sharegpt_reads_a_truncated_file_and_keeps_distinct_opening_requests(tmp_path):
    from clp_jax.train import sharegpt

    recs = [{"id": "a_0", "conversations": [{"from": "human", "value": "How do tides work, in short?"},
                                            {"from": "gpt", "value": "The Moon..."}]},
            {"id": "a_1", "conversations": [{"from": "human", "value": "And what about the Sun's part?"}]},
            {"id": "b_0", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "Why is the"
                                                                                                 " sky blue?"}]},
            {"id": "c_0", "conversations": [{"from": "human", "value": "How do tides work, in short?"}]},
            {"id": "d_0", "conversations": [{"from": "human", "value": "ok"}]},
            {"id": "e_0", "conversations": [{"from": "human", "value": "Это вопрос на русском языке?"}]}]
    import json

    text = "[" + ", ".join(json.dumps(r) for r in recs) + ', {"id": "f_0", "conversations": [{"from": "hu'
    path = tmp_path / "sharegpt.json"
    path.write_text(text, encoding="utf-8")
    assert sharegpt.requests(str(path)) == ["How do tides work, in short?", "Why is the sky blue?"]


def test_decode_py_default_prompts_are_neither_bench_nor_training_prompts():
    from clp_jax.decode.prompts import DEFAULT_PROMPTS

    bench = prompts.BenchOverlap.of_bench()
    training = prompts.BenchOverlap(prompts.chat_requests(0))
    assert not any(bench(p) or training(p) for p in DEFAULT_PROMPTS)
