"""Caption normalisation, identical to the reference's ``pre_caption``."""
from __future__ import annotations

import codecs
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


def decode_caption_file(data: bytes) -> str:
    """A caption file's text as editors save it: UTF-8 with or without a byte-order mark, or UTF-16 with one
    (Windows' "Unicode"); raises UnicodeDecodeError for anything else. Line ends are left to splitlines."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    return data.decode("utf-8-sig")
