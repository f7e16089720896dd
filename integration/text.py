"""Unicode text as leadscore compares and matches it, whatever script, keyboard or export wrote it."""

from __future__ import annotations

import re
import unicodedata

# Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, Japanese kana, CJK; not
# Korean, which spaces its words): a keyword or a phone number sits right against their letters
# ("営業部長", "電話03-1234-5678").
NO_SPACE_SCRIPTS = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
)
# A regex class: one letter, digit or underscore of a script that puts spaces between its words, so
# a match may begin or end where such a script's word does not.
WORD_CHAR = rf"[^\W{NO_SPACE_SCRIPTS}]"
_HYPHENS = {0x2010: "-", 0x2011: "-", 0xFE63: "-"}
_NARROW = str.maketrans({
    **{code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)},  # full-width ASCII: "０３－１２" is "03-12"
    **{code: unicodedata.normalize("NFKC", chr(code)) for code in range(0xFE50, 0xFE6C)  # small: "﹫"
       if unicodedata.normalize("NFKC", chr(code)).isascii()},
    **dict.fromkeys([0x00A0, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000], " "),  # spaces of any width
    **_HYPHENS,
})  # fmt: skip
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def narrow(text: str) -> str:
    """Full-width letters, digits and signs made ASCII, spaces of any width one space, Unicode hyphens
    "-"; nothing else changes (not "10⁶", "½" or "①", which NFKC would make "106", "1⁄2" and "1")."""
    return text.translate(_NARROW)


def folded(text: str) -> str:
    """Text as keywords and config values are compared, never shown: compatibility forms made plain
    (NFKC: "ＣＥＯ", a no-break space), accents composed however they were typed (a Mac's decomposed
    "ä"), hyphens "-", case folded, whitespace one space."""
    return " ".join(unicodedata.normalize("NFKC", text).translate(_HYPHENS).casefold().split())


def whole(text: str) -> str:
    """The text with half an emoji (a lone UTF-16 surrogate, which a cut made in JavaScript or Apex
    leaves) made U+FFFD: no UTF-8 encoder takes one, so one would fail every request that sends it."""
    return _LONE_SURROGATE.sub("\ufffd", text)
