"""What a display name or a group name may hold: printable text. Refused (``bad_field``, 400):
control and format characters and the rest of Unicode's categories Cc, Cf, Co, Cs, Zl, Zp (NUL, the
bidi overrides and isolates, zero-width spaces and marks, private-use characters, line and
paragraph separators), except U+200D ZERO WIDTH JOINER between two symbols (emoji ZWJ sequences,
e.g. a family); U+FE0F (the emoji presentation selector) is a mark, not a format character, and
passes. A name of only spaces is refused too.
"""

from __future__ import annotations

import unicodedata

from ..errors import ChatError

REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Zl", "Zp"})
ZWJ = "\u200d"
_JOINABLE = frozenset({"So", "Sk", "Mn"})  # a symbol, a skin-tone modifier, U+FE0F (after an emoji)


def _emoji_zwj(value: str, i: int) -> bool:
    return 0 < i < len(value) - 1 and unicodedata.category(value[i - 1]) in _JOINABLE \
        and unicodedata.category(value[i + 1]) == "So"


def check_name(field: str, value: str) -> str:
    """``value`` if it is an acceptable name, else raise ``bad_field`` naming ``field``."""
    for i, ch in enumerate(value):
        cat = unicodedata.category(ch)
        if cat in REFUSED_CATEGORIES and not (ch == ZWJ and _emoji_zwj(value, i)):
            raise ChatError("bad_field", f"field {field!r}: character U+{ord(ch):04X} at position {i} is not "
                                         f"allowed in a name (control, format or invisible characters)")
    if value and not value.strip():
        raise ChatError("bad_field", f"field {field!r}: a name cannot be only spaces")
    return value
