"""Replace secret values, and their base64 forms, with ``***`` in log text.

Masking is line based: the executor masks each complete line (and splits
over-long lines only where no secret straddles the cut, see
:meth:`Masker.safe_cut`). A secret that contains newlines is masked per line
fragment, because no single line can contain it whole. For the same reason the
base64 of a long secret is also masked per line as ``base64`` and ``openssl`` wrap it.
Where secrets overlap, the whole overlapping stretch is masked.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

MASK = "***"
# Shorter base64 fragments would mask ordinary text (``YQ`` is base64 of "a").
MIN_DERIVED_LEN = 4
# Columns at which tools wrap base64: openssl (and PEM) at 64, coreutils base64 at 76.
WRAP_WIDTHS = (64, 76)
# A wrapped encoding's last, shorter line is masked from this length. A shorter one
# shows at most 5 bytes of a secret over 48 bytes, and could be a word ("data", "test").
MIN_WRAPPED_TAIL_LEN = 8


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
            # Only the secret's own encoding is cut into lines: inside a larger wrapped
            # blob, the line ends fall anywhere in it.
            cores += [enc, enc.rstrip("=")]
            cores += [line for core in cores for line in _wrapped_lines(core)]
        for core in cores:
            forms.add(core)
            forms.add(core.translate(str.maketrans("+/", "-_")))
    return {f for f in forms if len(f) >= MIN_DERIVED_LEN}


def _wrapped_lines(encoded: str) -> list[str]:
    """The lines of ``encoded`` as wrapped at each of :data:`WRAP_WIDTHS`."""
    lines = []
    for width in WRAP_WIDTHS:
        if len(encoded) > width:
            lines += [encoded[i:i + width] for i in range(0, len(encoded), width)]
    return [line for line in lines if len(line) >= MIN_WRAPPED_TAIL_LEN]


def _any_of(literals: Iterable[str]) -> str:
    """A regex for any of ``literals`` that matches the longest one at a position.

    Grouped by first character, so the engine tries one group at each position of a
    line rather than every literal: about a third less time per line.
    """
    tails: dict[str, list[str]] = {}
    # Longest first within a group: a match is the longest literal at its position.
    for literal in sorted(literals, key=lambda p: (-len(p), p)):
        tails.setdefault(literal[0], []).append(re.escape(literal[1:]))
    return "|".join(
        re.escape(first) + (group[0] if len(group) == 1 else f"(?:{'|'.join(group)})")
        for first, group in tails.items()
    )


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
        self.max_len = max(map(len, patterns), default=0)
        self._regex = re.compile(_any_of(patterns)) if patterns else None

    def mask(self, text: str) -> str:
        spans = self._spans(text)
        if not spans:
            return text
        parts: list[str] = []
        end = 0
        for start, stop in spans:
            parts += (text[end:start], MASK)
            end = stop
        parts.append(text[end:])
        return "".join(parts)

    def _spans(self, text: str) -> list[tuple[int, int]]:
        """Where ``text`` holds secrets: every match, overlapping ones merged.

        The regex yields the longest match at each position, but then resumes after
        it; searching again from the next position finds matches that overlap it.
        """
        if self._regex is None:
            return []
        search = self._regex.search
        m = search(text)
        spans: list[tuple[int, int]] = []
        while m is not None:
            start, stop = m.span()
            if spans and start < spans[-1][1]:
                if stop > spans[-1][1]:
                    spans[-1] = (spans[-1][0], stop)
            else:
                spans.append((start, stop))
            m = search(text, start + 1)
        return spans

    def safe_cut(self, text: str, limit: int) -> int:
        """An index ``<= limit`` at which ``text`` can be split and masked in parts.

        Keeps back a tail that might be the start of a secret still arriving,
        and never cuts through a secret found in ``text``. May return 0.
        """
        cut = min(limit, len(text))
        if self._regex is None:
            return cut
        cut = min(cut, len(text) - (self.max_len - 1))
        for start, stop in self._spans(text):
            if start >= cut:
                break
            if stop > cut:
                cut = start
                break
        return max(cut, 0)
