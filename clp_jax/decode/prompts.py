"""Room: prompts as text and token ids (jsonl files, the chat template); no decoding.

Prompts from the command line or jsonl files, encoded raw or through the chat template (decode.py and train/
both read them)."""

from __future__ import annotations

from clp_jax.model import files


PROMPTS_FORMAT = ('each line a JSON string, {"prompt": "..."} or {"messages": [{"role": "user", "content": '
                  '"..."}]}')


def read_prompts_file(path: str) -> list:
    """Reads a jsonl file: each line a string, {"prompt": str} or {"messages": [{role, content}, ...]}.

    Every error names the file (and the line) and says what a line should hold: one line for decode.py."""
    what, fix = "Prompts file", f"A prompts file is JSON Lines: {PROMPTS_FORMAT}."
    prompts = []
    for n, item in files.json_lines(path, what, hint=fix, empty_hint=fix):
        where = f"{what} {path!r}, line {n}"
        if isinstance(item, dict):
            if "messages" not in item and "prompt" not in item:
                raise files.FileFormatError(f"{where}: the object has no 'prompt' or 'messages' field (it has "
                                            f"{sorted(item)}). {fix}")
            item = item["messages"] if "messages" in item else item["prompt"]
        if isinstance(item, list):
            _check_messages(item, where, fix)
        elif not isinstance(item, str):
            raise files.FileFormatError(f"{where}: a prompt must be text, got {type(item).__name__} {item!r:.60}. "
                                        f"{fix}")
        elif not item.strip():
            raise files.FileFormatError(f"{where}: the prompt is empty. {fix}")
        prompts.append(item)
    if not prompts:
        raise files.FileFormatError(f"{what} {path!r} holds no prompts (only blank lines). {fix}")
    return prompts


def _check_messages(messages: list, where: str, fix: str) -> None:
    """A chat: a non-empty list of {"role": str, "content": str}."""
    if not messages:
        raise files.FileFormatError(f"{where}: 'messages' is empty. {fix}")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise files.FileFormatError(f"{where}: message {i} must be an object with string 'role' and 'content' "
                                        f"fields, got {m!r:.80}. {fix}")


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


# decode.py's prompts when none is given: a code completion (raw), and with --compare also a chat request (through
# the chat template). Neither is a bench prompt nor a training prompt (tests/test_data.py checks the overlap).
DEFAULT_PROMPTS = (
    'def merge_intervals(intervals):\n    """Merge overlapping [start, end] intervals; return them sorted."""\n',
    "Write a Python function that checks whether a string is a valid IPv4 address, and explain it briefly.",
)

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
