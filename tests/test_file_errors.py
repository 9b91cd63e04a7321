"""Every file a user hands in that cannot be read fails with one line naming the file, what is wrong with it
(missing, a directory, not UTF-8, empty, invalid JSON or TOML at line N, a missing field) and what to do.

The library functions are called directly on tiny files (milliseconds each); tests/test_bad_input.py runs a
few of the same files through the real command lines.
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from clp_jax.decode import pass_costs
from clp_jax.decode.prompts import read_prompts_file
from clp_jax.drafting.checkpoint import CheckpointError, read_heads_config
from clp_jax.model import files
from clp_jax.train import data
from clp_jax.train.run_config import ConfigError, load_config
from clp_jax.weights import convert, loading


def _write(path, content) -> str:
    with open(path, "wb" if isinstance(content, bytes) else "w", encoding=None if isinstance(content, bytes)
              else "utf-8") as f:
        f.write(content)
    return str(path)


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


# ---------------------------------------------------------------------- prompts files (decode.py --prompts-file)


def test_prompts_file_not_utf8_names_the_file_the_byte_and_the_fix(tmp_path):
    path = _write(tmp_path / "latin1.jsonl", '"ok"\n"caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(files.FileFormatError) as e:
        read_prompts_file(path)
    _one_line(e, f"Prompts file {path!r} is not UTF-8 text", "byte 0xe9 at line 2, column 5", "save it as UTF-8",
              "iconv")


def test_prompts_file_invalid_json_names_the_line(tmp_path):
    path = _write(tmp_path / "p.jsonl", '"fine"\n\n{"prompt": "unterminated\n')
    with pytest.raises(files.FileFormatError) as e:
        read_prompts_file(path)
    _one_line(e, f"Prompts file {path!r}, line 3: not valid JSON", "column", "A prompts file is JSON Lines")


def test_plain_text_prompts_file_says_it_must_be_json_lines(tmp_path):
    path = _write(tmp_path / "prompts.txt", "def add(a, b):\n")
    with pytest.raises(files.FileFormatError) as e:
        read_prompts_file(path)
    _one_line(e, "line 1: not valid JSON", 'each line a JSON string, {"prompt": "..."}')


def test_prompts_object_without_a_prompt_field(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"text": "b", "id": 3}\n')
    with pytest.raises(files.FileFormatError) as e:
        read_prompts_file(path)
    _one_line(e, f"{path!r}, line 2: the object has no 'prompt' or 'messages' field (it has ['id', 'text'])")


@pytest.mark.parametrize("line, want", [
    ("42", "a prompt must be text, got int 42"),
    ('{"prompt": ""}', "the prompt is empty"),
    ('{"messages": []}', "'messages' is empty"),
    ('{"messages": [{"role": "user"}]}', "message 1 must be an object with string 'role' and 'content'"),
])
def test_prompts_with_bad_values(tmp_path, line, want):
    path = _write(tmp_path / "p.jsonl", line + "\n")
    with pytest.raises(files.FileFormatError) as e:
        read_prompts_file(path)
    _one_line(e, f"{path!r}, line 1: {want}")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_prompts_file(tmp_path, content):
    path = _write(tmp_path / "empty.jsonl", content)
    with pytest.raises(files.FileFormatError) as e:
        read_prompts_file(path)
    _one_line(e, f"Prompts file {path!r} is empty", "A prompts file is JSON Lines")


def test_prompts_file_missing_or_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_prompts_file(str(tmp_path / "nope.jsonl"))
    _one_line(e, "does not exist")
    with pytest.raises(IsADirectoryError) as e:
        read_prompts_file(str(tmp_path))
    _one_line(e, f"Prompts file {str(tmp_path)!r} is a directory, not a file")


def test_good_prompts_file_with_bom_and_line_separators(tmp_path):
    """A byte-order mark (Windows editors) is dropped; U+2028 inside a JSON string is not a line break."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    path = _write(tmp_path / "p.jsonl", b"\xef\xbb\xbf" + '"a\u2028b"\n{"prompt": "c"}\n'.encode() +
                  (json.dumps(chat) + "\n").encode())
    assert read_prompts_file(path) == ["a\u2028b", "c", chat["messages"]]


# ---------------------------------------------------------------------- run configs (train.py --config)


def test_config_not_utf8(tmp_path):
    path = _write(tmp_path / "c.toml", '[run]\nout_dir = "r\u00e9sultats"\n'.encode("latin-1"))
    with pytest.raises(files.FileFormatError) as e:
        load_config(path)
    _one_line(e, f"Config {path!r} is not UTF-8 text", "byte 0xe9 at line 2, column 13", "save it as UTF-8")


def test_config_malformed_toml_names_the_line_and_an_example(tmp_path):
    path = _write(tmp_path / "c.toml", "[run]\nsteps = 5\n[train\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    _one_line(e, f"Config {path!r} is not valid TOML", "line 3", "configs/draft_layer_demo.toml")


@pytest.mark.parametrize("content, want", [("", "is empty"), ("\n\n", "is empty"),
                                           ("# just a comment\n", "holds only comments")])
def test_empty_config(tmp_path, content, want):
    """An empty file would otherwise train with every default (hours on the demo backbone)."""
    path = _write(tmp_path / "c.toml", content)
    with pytest.raises(ValueError) as e:
        load_config(path)
    _one_line(e, f"Config {path!r} {want}", "[run]", "configs/draft_layer_demo.toml")


def test_config_missing_or_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_config(str(tmp_path / "missing.toml"))
    _one_line(e, "does not exist", "TOML run config")
    with pytest.raises(IsADirectoryError) as e:
        load_config(str(tmp_path))
    _one_line(e, "is a directory, not a file")


# ---------------------------------------------------------------------- heads checkpoints (--heads, init_from)


@pytest.mark.parametrize("content, want", [
    ("", "is empty"),
    ("{\"heads_config\": ", "is not valid JSON (Expecting value at line 1, column 18)"),
    (b'{"heads_config": {}, "note": "\xff"}', "is not UTF-8 text (byte 0xff at line 1, column 31)"),
    ('{"backbone": {}}', "has no 'heads_config' field (it has ['backbone'])"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"heads_config": 3}', "'heads_config' must be an object"),
    ('{"heads_config": {"hidden_size": 8, "vocab_size": 16, "k": 2, "nonsense": 1}}',
     "'heads_config' is not a valid heads config"),
])
def test_heads_metadata(tmp_path, content, want):
    meta = _write(tmp_path / "heads.json", content)
    with pytest.raises(CheckpointError) as e:
        read_heads_config(str(tmp_path))
    _one_line(e, f"Heads metadata {meta!r} {want}" if not want.startswith("'") else f"{meta!r}: {want}",
              "iconv" if "UTF-8" in want else "heads checkpoint written by train.py")


def test_heads_directory_without_metadata(tmp_path):
    with pytest.raises(CheckpointError) as e:
        read_heads_config(str(tmp_path))
    _one_line(e, f"Heads checkpoint {str(tmp_path)!r} has no heads.json", "--heads zero")


# ---------------------------------------------------------------------- model directories (--model DIR)


@pytest.mark.parametrize("content, want", [
    ("", "is empty"),
    (b'{"model_type": "qwen2\xe9"}', "is not UTF-8 text (byte 0xe9"),
    ('{"model_type": "qwen2", "vocab_size": 8}', "has no 'num_attention_heads' field"),
    ('["qwen2"]', "holds a JSON list, not an object"),
])
def test_model_config_json(tmp_path, content, want):
    config = _write(tmp_path / "config.json", content)
    with pytest.raises(loading.ModelFileError) as e:
        loading.check_source(str(tmp_path))
    _one_line(e, f"Model config {config!r} {want}")


def test_generation_config_json(tmp_path):
    _write(tmp_path / "generation_config.json", '{"eos_token_id": [1, 2]')

    class Tok:
        eos_token_id = 0

        def get_vocab(self):
            return {}

    with pytest.raises(files.FileFormatError) as e:
        loading.eos_token_ids(Tok(), str(tmp_path))
    _one_line(e, "Generation config", "generation_config.json", "is not valid JSON", "Fix or delete it")
    _write(tmp_path / "config.json", json.dumps(dict(model_type="qwen2", vocab_size=8, hidden_size=8,
                                                     intermediate_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2)))
    with pytest.raises(loading.ModelFileError) as e:  # checked with the directory, before the conversion
        loading.check_source(str(tmp_path))
    _one_line(e, "Generation config", "is not valid JSON")


@pytest.mark.parametrize("content, want", [("{}", "has no 'weight_map' field"),
                                           ('{"weight_map": [1]}', "'weight_map' must map tensor names"),
                                           ("{", "is not valid JSON")])
def test_safetensors_index(tmp_path, content, want):
    index = _write(tmp_path / "model.safetensors.index.json", content)
    with pytest.raises(files.FileFormatError) as e:
        convert.index_files(index)
    _one_line(e, "Safetensors index", "model.safetensors.index.json", want)


# ---------------------------------------------------------------------- data sources, caches, run records


def test_jsonl_data_source(tmp_path):
    good = _write(tmp_path / "good.jsonl", '{"text": "one"}\n"two"\n\n{"prompt": "three"}\n')
    assert list(data.read_texts(good)) == ["one", "two", "three"]
    bad = _write(tmp_path / "bad.jsonl", '{"text": "one"}\n{"text": \n')
    with pytest.raises(ValueError) as e:
        list(data.read_texts(bad))
    _one_line(e, f"Data source {bad!r}, line 2: not valid JSON", '{"text": "..."}')
    fieldless = _write(tmp_path / "fieldless.jsonl", '{"content": "x"}\n')
    with pytest.raises(ValueError) as e:
        list(data.read_texts(fieldless))
    _one_line(e, f"Data source {fieldless!r}, line 1: an object with no string 'text' field (it has ['content'])")


def test_unreadable_pass_cost_table_is_said_and_measured_again(tmp_path, caplog):
    path = _write(tmp_path / "table.json", '{"key": ')
    with caplog.at_level(logging.WARNING, logger="clp_jax"):
        assert pass_costs._read(path) is None
    assert f"pass-cost table {path} is unreadable" in caplog.text and "measuring" in caplog.text
    assert pass_costs._read(str(tmp_path / "absent.json")) is None


def test_scores_file_of_early_stopping(tmp_path):
    from clp_jax.train.loop import EarlyStopping

    scores = _write(tmp_path / "scores.jsonl", '{"step": 0, "score": 0.5}\n{"step": 2, "sco')  # a killed write
    with pytest.raises(files.FileFormatError) as e:
        EarlyStopping(lambda t: {}, every=2, patience=1, scores_path=scores, best_dir=str(tmp_path / "best"))
    _one_line(e, f"Scores file {scores!r}, line 2: not valid JSON", "delete the bad line")


def test_position():
    assert files.position(b"ab\ncd", 4) == "line 2, column 2"
    assert files.position("abc", 0) == "line 1, column 1"
