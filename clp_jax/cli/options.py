"""What the command lines (decode.py, `python -m clp_jax.bench`) check before anything heavy starts.

Every user-given value is checked here for type and range, and `--heads` / `--model` are resolved with
cheap file checks (the heads' small heads.json is read for their k), so that a wrong value fails in
about a second with one line, never after the 10 s backbone load.
"""

from __future__ import annotations

import logging
import os

from flax import nnx

from clp_jax.drafting.checkpoint import CheckpointError, load_heads, read_heads_config, shipped_heads_path
from clp_jax.drafting.heads import Heads, HeadsConfig
from clp_jax.model.config import ModelConfig
from clp_jax.model.qwen2 import unpadded_k

log = logging.getLogger(__name__)

ZERO = "zero"  # --heads zero: untrained zero-initialised heads


def setup_logging(level: int = logging.INFO) -> None:
    """For the command lines: the library's progress lines (logger 'clp_jax') on stderr, as plain lines.

    Only the package's own logger is configured, so third-party INFO chatter (absl, Orbax) stays quiet.
    """
    logger = logging.getLogger("clp_jax")
    if not any(getattr(h, "_clp_jax", False) for h in logger.handlers):
        handler = logging.StreamHandler()  # sys.stderr
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._clp_jax = True
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class UsageError(ValueError):
    """A command-line value is out of range or inconsistent (exit status 2)."""


def check_range(flag: str, value, *, low=None, high=None, low_open=False, hint: str = "") -> None:
    """Raises UsageError unless low <= value <= high (low < value with low_open)."""
    if value is None:
        return
    bad = (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high)
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        want = " and ".join(x for x in (lo, hi) if x)
        raise UsageError(f"{flag} {value} is out of range: expected a value {want}.{(' ' + hint) if hint else ''}")


def check_decode_args(args) -> None:
    """Range checks of decode.py's (and the bench's) sampling and budget flags."""
    check_range("--k", getattr(args, "k", None), low=1, hint="Omit --k to use all the heads provide.")
    check_range("--max-new-tokens", args.max_new_tokens, low=1)
    check_range("--max-cache-len", getattr(args, "max_cache_len", None), low=2)
    check_range("--temperature", getattr(args, "temperature", None), low=0, hint="0 is greedy.")
    check_range("--top-p", getattr(args, "top_p", None), low=0, low_open=True, high=1)
    check_range("--top-k", getattr(args, "top_k", None), low=0, hint="0 turns top-k off.")
    check_range("--tau", getattr(args, "tau", None), low=0, high=1, hint="It is a probability (default 0.9).")
    check_range("--clp-confidence", getattr(args, "clp_confidence", None), low=0, low_open=True, high=1)
    check_range("--batch-size", getattr(args, "batch_size", None), low=1)
    check_range("--repeats", getattr(args, "repeats", None), low=1)
    check_range("--limit", getattr(args, "limit", None), low=1, hint="Omit --limit to run every prompt.")
    check_range("--tree", getattr(args, "tree", None), low=0, hint="0 drafts a chain; N adds up to N siblings.")
    if getattr(args, "tree", 0) and getattr(args, "mode", "verify") != "verify":
        raise UsageError(f"--tree {args.tree} is for --mode verify (draft trees are verified), not {args.mode}.")
    top_p, top_k = getattr(args, "top_p", 1.0), getattr(args, "top_k", 0)
    if getattr(args, "temperature", None) == 0 and (top_p < 1.0 or top_k > 0):  # greedy ignores the filters
        flag = f"--top-p {top_p}" if top_p < 1.0 else f"--top-k {top_k}"
        raise UsageError(f"{flag} filters sampling, but --temperature is 0 (greedy decoding, which ignores it): "
                         "add --temperature, e.g. --temperature 0.7.")
    for i, prompt in enumerate(getattr(args, "prompt", None) or []):
        if not prompt.strip():
            raise UsageError(f"--prompt number {i + 1} is empty: give some text to continue.")


def heads_source(heads_arg: str | None, model_name: str, mode: str, k: int | None = None) -> str | None:
    """Where heads come from: 'zero', a checkpoint path, or None (`ar` needs none).

    Cheap checks only (heads.json is read, nothing restored), so that a wrong --heads or a --k above
    the heads' own k fails before the backbone is loaded.
    """
    if mode == "ar" and heads_arg is None:
        return None
    if heads_arg == ZERO:
        return heads_arg
    if heads_arg is None:
        heads_arg = shipped_heads_path(model_name)
        if heads_arg is None:
            raise CheckpointError(
                f"Mode {mode!r} needs MTP heads and none are shipped for --model {model_name!r}: pass "
                "--heads PATH (a checkpoint written by train.py), --heads zero (untrained), or --mode ar.")
    path = os.path.abspath(os.path.expanduser(heads_arg))
    if not os.path.isdir(path):
        raise CheckpointError(f"Heads checkpoint {path!r} does not exist. Train heads with train.py, "
                              "or pass --heads zero for untrained heads.")
    cfg = read_heads_config(path)
    if k is not None and k > cfg.k:
        raise UsageError(f"--k {k} is more than the {cfg.k} heads in {path}: pass --k between 1 and {cfg.k}, "
                         "or omit --k to use them all.")
    return path


def build_heads(source: str | None, backbone_cfg: ModelConfig, k: int | None = None) -> Heads | None:
    """Heads from `heads_source`'s answer, checked against the backbone."""
    if source is None:
        return None
    if source == ZERO:
        log.warning("Using untrained zero-initialised heads: every draft repeats the next token, so expect "
                    "few accepted drafts and a speedup below 1.")
        return Heads(HeadsConfig(hidden_size=backbone_cfg.hidden_size, vocab_size=backbone_cfg.vocab_size,
                                 k=k or 4), rngs=nnx.Rngs(0))
    return load_heads(source, backbone_cfg)


def default_k(heads: Heads | None, backbone_cfg: ModelConfig, batch: int = 1) -> int:
    """decode.py's k when --k is not given: all the heads provide, less any head whose slot would pad
    the pass to a costlier width (on CPU under cols: 3 of 4; on accelerators: all). The draft budget
    would rarely feed that slot, and each width is one more branch to compile."""
    if heads is None:
        return 1
    return unpadded_k(backbone_cfg, batch, heads.cfg.k)
