"""Resolves `--model` (demo, a .gguf path, a Hugging Face directory or hub id) to a ready backbone.

Converted parameters are cached in the user cache directory, keyed by the source's identity
(absolute path, size and modification time of every weight file) and the parameter dtype, so only
the first load pays for dequantization. The tokenizer and chat template are cached beside them.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time

import gguf
from flax import nnx
from safetensors.flax import load_file, save_file

from clp_jax.model import files as user_files
from clp_jax.model.config import ModelConfig
from clp_jax.model.qwen2 import Qwen2, abstract_model
from clp_jax.weights import assets, convert
from clp_jax.weights.convert import flat_params, model_from_flat
from clp_jax.weights.tokenizer import load_tokenizer, tokenizer_from_gguf

log = logging.getLogger(__name__)

DEMO = "demo"
_CACHE_FORMAT = 2  # 2: kernels stored [out, in] (model/layers.Proj)
_GGUF_MAGIC = b"GGUF"


class ModelFileError(ValueError):
    """A --model file or directory is missing, truncated, corrupt or of another kind."""


@dataclasses.dataclass
class Backbone:
    """A loaded backbone: model, tokenizer and what decoding needs to know about it."""

    cfg: ModelConfig
    model: Qwen2
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    source: str
    eos_token_ids: tuple[int, ...]
    load_seconds: float = 0.0
    from_cache: bool = False


def resolve_source(name: str, progress: bool = True) -> tuple[str, str]:
    """Maps a --model value to (kind, path) with kind in {'gguf', 'hf'}, after `check_source`."""
    if name == DEMO:
        return "gguf", assets.demo_gguf_path(progress=progress)
    kind, path = check_source(name)
    if kind == "hub":
        return "hf", _download_from_hub(name)
    return kind, path


def check_source(name: str, flag: str = "--model") -> tuple[str, str]:
    """Cheap checks of a --model value, reading headers only: (kind, path), kind in {'demo', 'gguf', 'hf',
    'hub'}. A missing, truncated, corrupt or foreign file raises ModelFileError naming it (and `flag`)."""
    if not name or not name.strip():
        raise ModelFileError(f"{flag} is empty: give 'demo', a .gguf file, a Hugging Face directory or hub id.")
    if name == DEMO:
        return "demo", name
    expanded = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(expanded):
        _check_hf_dir(expanded)
        return "hf", expanded
    if os.path.isfile(expanded):
        with open(expanded, "rb") as f:
            magic = f.read(4)
        if magic == _GGUF_MAGIC:
            return "gguf", expanded
        if expanded.endswith(".gguf"):
            raise ModelFileError(f"{expanded} is not a GGUF file (it does not start with b'GGUF'; "
                                 f"it starts with {magic!r}).")
        raise ModelFileError(f"{expanded} is a file but not a GGUF file: give a .gguf file, or the Hugging "
                             "Face directory that holds config.json and *.safetensors.")
    if expanded.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelFileError(f"{flag} {name!r}: file or directory {expanded} does not exist (nor is it "
                             "'demo' or a hub id like 'Qwen/Qwen2.5-0.5B-Instruct').")
    return "hub", name


def _check_hf_dir(path: str) -> None:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ModelFileError(f"{path} has no config.json: is it a Hugging Face model directory?")
    fix = "Give the directory of a Hugging Face Qwen2 / Qwen2.5 checkpoint (config.json and *.safetensors)."
    try:
        hf = user_files.read_json_object(config, "Model config", hint=fix)
    except user_files.FileFormatError as e:
        raise ModelFileError(str(e)) from e
    try:
        ModelConfig.from_hf_config(hf)
    except KeyError as e:
        raise ModelFileError(f"Model config {config!r} has no {e} field, so it is not a Qwen2 config. {fix}") from e
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"Model config {config!r} is not a Qwen2 config ({type(e).__name__}: {e}).") from e
    if os.path.exists(os.path.join(path, "generation_config.json")):
        try:
            _generation_config(path)  # eos_token_ids reads it after the slow conversion: checked now
        except user_files.FileFormatError as e:
            raise ModelFileError(str(e)) from e
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelFileError(f"{path} holds no *.safetensors weights.")
    for f in files:
        _check_safetensors(f)


def _check_safetensors(path: str) -> None:
    """The header of a safetensors file parses and its tensors end within the file."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"its header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelFileError(f"{path} is not a readable safetensors file ({e}).") from e
    if 8 + n + end > size:
        raise ModelFileError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}.")


def _download_from_hub(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download  # only for hub ids

        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        raise RuntimeError(
            f"Could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}).\n"
            "Alternatives: --model demo (the built-in Qwen2.5-Coder-0.5B-Instruct GGUF), a local "
            "Hugging Face directory, or a local .gguf file.") from e


def _weight_files(kind: str, path: str) -> list[str]:
    if kind == "gguf":
        return [path]
    return sorted(glob.glob(os.path.join(path, "*.safetensors")) + [os.path.join(path, "config.json")])


def _cache_key(kind: str, path: str, param_dtype: str) -> str:
    ident = [_CACHE_FORMAT, kind, param_dtype]
    for f in _weight_files(kind, path):
        st = os.stat(f)
        ident.append((os.path.abspath(f), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def _generation_config(hf_dir: str) -> dict:
    return user_files.read_json_object(os.path.join(hf_dir, "generation_config.json"), "Generation config",
                                       hint="Fix or delete it (it only adds end-of-turn tokens).")


def eos_token_ids(tokenizer, hf_dir: str | None = None) -> tuple[int, ...]:
    """Every token that ends a turn: the tokenizer's EOS, generation_config's, and Qwen's end markers."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if hf_dir and os.path.exists(os.path.join(hf_dir, "generation_config.json")):
        eos = _generation_config(hf_dir).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab)
    return tuple(sorted(ids))


def _convert(kind: str, path: str, dtypes: dict, progress: bool):
    """(model, tokenizer) of a source; a GGUF file is opened once for both."""
    try:
        if kind == "gguf":
            reader = gguf.GGUFReader(path)
            return (convert.convert_gguf(path, progress=progress, reader=reader, **dtypes),
                    tokenizer_from_gguf(path, reader=reader))
        return convert.convert_hf_dir(path, **dtypes), load_tokenizer(kind, path)
    except ModelFileError:
        raise
    except Exception as e:  # a truncated or corrupt file: one line naming it, never a traceback
        what = "GGUF file" if kind == "gguf" else "Hugging Face model directory"
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise ModelFileError(f"Could not read the {what} {path}: it may be truncated or corrupt ({detail}).") from e


def _save_cache(entry: str, model: Qwen2, tokenizer, eos_ids, source: str) -> None:
    parent = os.path.dirname(entry)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".partial-")
    try:
        save_file(flat_params(model), os.path.join(tmp, "params.safetensors"))
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"config": model.cfg.to_dict(), "eos_token_ids": list(eos_ids),
                       "source": source}, f, indent=1)
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)  # the entry appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_cache(entry: str, dtype: str):
    from transformers import AutoTokenizer  # heavy (~2 s): only when a cache entry is read

    with open(os.path.join(entry, "meta.json")) as f:
        meta = json.load(f)
    cfg = ModelConfig.from_dict({**meta["config"], "dtype": dtype})
    graphdef, abstract = nnx.split(abstract_model(cfg))
    model = model_from_flat(graphdef, abstract, load_file(os.path.join(entry, "params.safetensors")))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(entry, "tokenizer"))
    return model, tokenizer, tuple(meta["eos_token_ids"])


def load_backbone(name: str = DEMO, *, dtype: str = "float32", param_dtype: str | None = None,
                  use_cache: bool = True, progress: bool = True) -> Backbone:
    """Loads a backbone by --model value.

    Args:
      name: 'demo', a .gguf path, a Hugging Face directory or a hub id.
      dtype: compute dtype; param_dtype defaults to it.
      use_cache: read and write the converted-parameter cache.
    """
    t0 = time.perf_counter()
    param_dtype = param_dtype or dtype
    kind, path = resolve_source(name, progress=progress)
    entry = os.path.join(assets.cache_dir("converted"),
                         f"{os.path.basename(path.rstrip('/'))}-{_cache_key(kind, path, param_dtype)}")
    if use_cache and os.path.exists(os.path.join(entry, "meta.json")):
        try:
            model, tokenizer, eos_ids = _load_cache(entry, dtype)
            return Backbone(model.cfg, model, tokenizer, path, eos_ids,
                            time.perf_counter() - t0, from_cache=True)
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            log.warning("Converted-weights cache %s is unreadable (%s); converting again.", entry, e)
            shutil.rmtree(entry, ignore_errors=True)
    model, tokenizer = _convert(kind, path, dict(dtype=dtype, param_dtype=param_dtype), progress)
    eos_ids = eos_token_ids(tokenizer, path if kind == "hf" else None)
    if use_cache:
        _save_cache(entry, model, tokenizer, eos_ids, path)
    return Backbone(model.cfg, model, tokenizer, path, eos_ids, time.perf_counter() - t0)
