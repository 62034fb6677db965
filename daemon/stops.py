"""Stop strings found in streamed text: a KMP automaton per stop string, O(new characters x stops) per piece."""

from __future__ import annotations


class StopScanner:
    """Finds stop sequences in a text fed piece by piece: one KMP automaton per stop string, so feeding costs
    O(characters fed x stop strings) whatever the text before and the stops' lengths (their tables are built
    once, O(total stop length)).

    Args:
        stops: the stop strings (non-empty).
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.tables = [self._table(s) for s in self.stops]
        self.matched = [0] * len(self.stops)     # per stop: the longest prefix of it that ends the text fed

    @staticmethod
    def _table(s: str) -> list[int]:
        fail, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail[i] = k
        return fail

    def feed(self, piece: str) -> int | None:
        """Feed ``piece``. Returns None, or, when a stop sequence completed in it, how many characters to cut
        from the end of the text fed so far (``piece`` included) so that it ends where that stop begins (the
        first stop to complete; of those completing at once, the longest). The scanner is spent after a match."""
        if not self.stops:
            return None
        stops, tables, matched = self.stops, self.tables, self.matched
        for j, c in enumerate(piece, 1):
            best = 0
            for i, s in enumerate(stops):
                q = matched[i]
                while q and s[q] != c:
                    q = tables[i][q - 1]
                if s[q] == c:
                    q += 1
                if q == len(s):
                    best = max(best, q)
                    q = tables[i][q - 1]
                matched[i] = q
            if best:
                return len(piece) - j + best
        return None

    def held(self) -> int:
        """Characters at the end of the text fed so far that could begin a stop sequence."""
        return max(self.matched, default=0)
