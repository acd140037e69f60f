"""Caption normalisation, identical to the reference's ``pre_caption``."""
from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Lower-case, punctuation ``.!"()*#:;~`` to spaces, runs of spaces collapsed, stripped,
    truncated to ``max_words`` words."""
    caption = _PUNCTUATION.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
