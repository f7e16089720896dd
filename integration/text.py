"""Unicode text as leadscore compares and matches it, whatever script, keyboard or export wrote it."""

from __future__ import annotations

import re
import unicodedata

# Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, Japanese kana, CJK, Hangul):
# a keyword or a phone number sits right against their letters ("営業部長", "電話03-1234-5678").
NO_SPACE_SCRIPTS = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
)
# A regex class: one letter, digit or underscore of a script that puts spaces between its words, so
# a match may begin or end where such a script's word does not.
WORD_CHAR = rf"[^\W{NO_SPACE_SCRIPTS}]"
_HYPHENS = str.maketrans({"\u2010": "-", "\u2011": "-"})
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def plain(text: str) -> str:
    """Compatibility forms made plain ("ＣＥＯ", a no-break space, "－"), accents composed however
    they were typed (a Mac's decomposed "ä"), and Unicode hyphens made "-"."""
    return unicodedata.normalize("NFKC", text).translate(_HYPHENS)


def folded(text: str) -> str:
    """Text as keywords and config values are compared: plain, case-folded, whitespace one space."""
    return " ".join(plain(text).casefold().split())


def whole(text: str) -> str:
    """The text with half an emoji (a lone UTF-16 surrogate, which a cut made in JavaScript or Apex
    leaves) made U+FFFD: no UTF-8 encoder takes one, so one would fail every request that sends it."""
    return _LONE_SURROGATE.sub("\ufffd", text)
