"""Replace secret values, and their base64 forms, with ``***`` in log text.

Masking is line based: the executor masks each complete line (and splits
over-long lines only where no secret straddles the cut, see
:meth:`Masker.safe_cut`). A secret that contains newlines is masked per line
fragment, because no single line can contain it whole.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

MASK = "***"
# Shorter base64 fragments would mask ordinary text (``YQ`` is base64 of "a").
MIN_DERIVED_LEN = 4


def _b64_forms(raw: bytes) -> set[str]:
    """Base64 of ``raw`` as it can appear in output.

    Besides the plain encodings (standard and urlsafe, with and without
    padding), include the part that does not depend on neighbouring bytes when
    the secret sits at byte offset 1 or 2 inside a larger encoded blob, such as
    ``user:password`` in a basic-auth header.
    """
    forms: set[str] = set()
    n = len(raw)
    for offset in (0, 1, 2):
        enc = base64.b64encode(b"\0" * offset + raw).decode()
        first = -(-8 * offset // 6)  # first char made only of secret bits
        last = 8 * (offset + n) // 6  # chars before this hold only secret bits
        cores = [enc[first:last]]
        if offset == 0:
            cores += [enc, enc.rstrip("=")]
        for core in cores:
            forms.add(core)
            forms.add(core.translate(str.maketrans("+/", "-_")))
    return {f for f in forms if len(f) >= MIN_DERIVED_LEN}


class Masker:
    """Masks a fixed set of secret values in text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        patterns: set[str] = set()
        for value in secrets:
            if not value:
                continue
            patterns.add(value)
            for fragment in value.splitlines():
                if fragment.strip():
                    patterns.add(fragment)
            patterns |= _b64_forms(value.encode("utf-8", "surrogatepass"))
        # Longest first, so a secret wins over any of its own fragments.
        ordered = sorted(patterns, key=lambda p: (-len(p), p))
        self.max_len = len(ordered[0]) if ordered else 0
        self._regex = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def mask(self, text: str) -> str:
        if self._regex is None:
            return text
        return self._regex.sub(MASK, text)

    def safe_cut(self, text: str, limit: int) -> int:
        """An index ``<= limit`` at which ``text`` can be split and masked in parts.

        Keeps back a tail that might be the start of a secret still arriving,
        and never cuts through a secret found in ``text``. May return 0.
        """
        cut = min(limit, len(text))
        if self._regex is None:
            return cut
        cut = min(cut, len(text) - (self.max_len - 1))
        for m in self._regex.finditer(text):
            if m.start() >= cut:
                break
            if m.end() > cut:
                cut = m.start()
                break
        return max(cut, 0)
