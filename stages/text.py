"""Caption text checks shared by the stages, so one cause gives one rejection reason wherever it is found."""
from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
BAD_UTF8 = "caption is not valid UTF-8"
# Longer text is refused before any other work (a 5 MB "word" would otherwise be normalised, scanned and
# tokenised). A module constant, not a stage param: a param would change the fingerprint of every shard set
# made before it (pipeline/preprocess/plan.py), and no real caption comes near it (max_caption_words is 60).
MAX_CAPTION_CHARS = 1000


def clean_caption(text) -> tuple[str, str | None]:
    """(cleaned text, None) for usable text, else (the text as far as it reads, reason). Bytes are decoded as
    UTF-8; control characters become spaces; whitespace collapses; NFC. Surrogates or U+FFFD mean the caption
    was decoded from non-UTF-8 bytes upstream. Over MAX_CAPTION_CHARS characters: refused as it came (cut short
    in the returned text)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            return bytes(text).decode("utf-8", "replace"), f"{BAD_UTF8} ({e.reason} at byte {e.start})"
    if not isinstance(text, str):
        return str(text)[:MAX_CAPTION_CHARS], f"caption is a {type(text).__name__}, not text"
    if len(text) > MAX_CAPTION_CHARS:
        return text[:MAX_CAPTION_CHARS], f"caption is {len(text)} characters, over the limit of {MAX_CAPTION_CHARS}"
    if _SURROGATE.search(text) or "\ufffd" in text:
        return text.encode("utf-8", "replace").decode("utf-8"), BAD_UTF8
    clean = " ".join(_CONTROL.sub(" ", unicodedata.normalize("NFC", text)).split())
    clean = "".join(c if c.isprintable() else " " for c in clean).strip()
    if not clean:
        return clean, "empty caption"
    if not any(ch.isalpha() for ch in clean):
        return clean, "caption has no words (punctuation, digits or symbols only)"
    return clean, None
