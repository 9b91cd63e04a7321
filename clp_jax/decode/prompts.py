"""Prompts from the command line or jsonl files, encoded raw or through the chat template."""

from __future__ import annotations

import json
import os


def read_prompts_file(path: str) -> list:
    """Reads a jsonl file: each line a string, {"prompt": str} or {"messages": [{role, content}, ...]}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Prompts file {path!r} does not exist.")
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e}).") from e
            if isinstance(item, dict):
                item = item.get("messages") or item.get("prompt")
            if not isinstance(item, (str, list)) or not item:
                raise ValueError(f"{path}:{n} needs a string, a 'prompt' or a 'messages' field.")
            prompts.append(item)
    if not prompts:
        raise ValueError(f"Prompts file {path!r} holds no prompts.")
    return prompts


def encode(tokenizer, prompt, chat: bool) -> list[int]:
    """Token ids of a prompt: raw text, or the chat template with a generation prompt appended.

    A list of messages always goes through the chat template.
    """
    if isinstance(prompt, list) or chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if tokenizer.chat_template is None:
            raise ValueError("This tokenizer has no chat template; pass raw prompts without --chat-template.")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


# The benchmark's chat/prose set: everyday requests, sent through the chat template.
CHAT_PROMPTS = (
    "Explain in a short paragraph why the sky is blue.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three tips for staying focused while working from home?",
    "Summarise the causes of the French Revolution in a few sentences.",
    "Describe how a hash map works to someone new to programming.",
    "Write a polite email asking a colleague to review a pull request by Friday.",
    "What is the difference between a list and a tuple in Python?",
    "Give a recipe for a simple tomato soup.",
)
