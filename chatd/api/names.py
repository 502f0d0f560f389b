"""What a display name or a group name may hold: printable text. Refused (``bad_field``, 400):
control and format characters and the rest of Unicode's categories Cc, Cf, Co, Cs, Zl, Zp (NUL, the
bidi overrides and isolates, zero-width spaces and marks, private-use characters, line and
paragraph separators), except U+200D ZERO WIDTH JOINER between two symbols (emoji ZWJ sequences,
e.g. a family); U+FE0F (the emoji presentation selector) is a mark, not a format character, and
passes. ``/openapi.json`` states the rule as a ``pattern`` on those fields (:func:`schema_pattern`:
the refused characters but the joiner, whose rule needs context, and the surrogates, which no
decoded string holds).
"""

from __future__ import annotations

import functools
import sys
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
    return value


@functools.lru_cache(maxsize=1)
def schema_pattern() -> str:
    """A regular expression (Python and ECMA-262 alike) of the names :func:`check_name` accepts,
    but for the joiner's context rule."""
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        refused = cp <= sys.maxunicode and cp != 0x200D and not 0xD800 <= cp <= 0xDFFF \
            and unicodedata.category(chr(cp)) in REFUSED_CATEGORIES
        if refused and start is None:
            start = cp
        elif not refused and start is not None:
            ranges.append((start, cp - 1))
            start = None

    def esc(cp: int) -> str:
        return f"\\x{cp:02x}" if cp < 0x100 else chr(cp) if cp > 0xFFFF else f"\\u{cp:04x}"
    body = "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)
    return f"^[^{body}]*$"
