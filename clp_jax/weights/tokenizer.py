"""Tokenizers: from a Hugging Face directory, or rebuilt from a GGUF file's vocabulary without torch.

transformers' own GGUF loader reads the file through torch; here the gguf package reads the
vocabulary, merges and special tokens, and transformers' GGUF tokenizer builder (tokenizers-based,
torch-free) assembles the same fast tokenizer, with the file's chat template.
"""

from __future__ import annotations

import gguf

# GGUF key (after 'tokenizer.') -> the field name transformers' GGUF tokenizer builder expects
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
    "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
    "ggml.bos_token_id": "bos_token_id", "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id", "ggml.padding_token_id": "pad_token_id",
    "ggml.add_space_prefix": "add_prefix_space",
}
_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unk_token_id",
            "pad_token": "pad_token_id"}


def _field_value(field):
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        return list(field.contents())
    return field.contents()


def tokenizer_from_gguf(path: str, reader=None):
    """A `PreTrainedTokenizerFast` equivalent to transformers' GGUF tokenizer, built without torch."""
    # transformers is heavy (~2 s to import): only when a tokenizer is built
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    reader = reader or gguf.GGUFReader(path)
    fields = reader.fields
    arch = fields["general.architecture"].contents()
    tok_dict = {name: _field_value(fields[f"tokenizer.{key}"])
                for key, name in _TOKENIZER_KEYS.items() if f"tokenizer.{key}" in fields}
    if "tokens" not in tok_dict:
        raise ValueError(f"{path!r} carries no tokenizer vocabulary; pass a Hugging Face directory instead.")
    backend, _ = convert_gguf_tokenizer(arch, tok_dict)
    special = {name: tok_dict["tokens"][tok_dict[key]] for name, key in _SPECIAL.items()
               if tok_dict.get(key) is not None}
    chat = fields.get("tokenizer.chat_template")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=chat.contents() if chat is not None else None,
        clean_up_tokenization_spaces=False, **special)


def load_tokenizer(kind: str, path: str):
    """The tokenizer of a 'gguf' file or an 'hf' directory."""
    if kind == "gguf":
        return tokenizer_from_gguf(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
