"""Cutting streamed text at stop strings, holding back what may be the beginning of one.

Each stop string gets a Knuth-Morris-Pratt automaton, so every character of the text costs
constant amortized work per stop string, however long the stop strings are.
"""

from typing import List, Optional, Sequence


class _Matcher:
    """How much of one stop string the text's end currently matches."""

    def __init__(self, stop: str):
        self.stop = stop
        self.matched = 0  # length of the longest prefix of ``stop`` that ends the text
        self._fallback = [0] * len(stop)  # KMP failure function
        length = 0
        for index in range(1, len(stop)):
            while length and stop[index] != stop[length]:
                length = self._fallback[length - 1]
            if stop[index] == stop[length]:
                length += 1
            self._fallback[index] = length

    def feed(self, char: str) -> bool:
        """Advances by one character; True when the whole stop string has just appeared."""
        while self.matched and char != self.stop[self.matched]:
            self.matched = self._fallback[self.matched - 1]
        if char == self.stop[self.matched]:
            self.matched += 1
        return self.matched == len(self.stop)


class StopStringFilter:
    """Passes generated text through until the first stop string, which it cuts with all after it.

    Text that could be the beginning of a stop string is held back until it turns out not to be.
    """

    def __init__(self, stops: Sequence[str]):
        self._matchers: List[_Matcher] = [_Matcher(stop) for stop in dict.fromkeys(stops) if stop]
        self._pending = ""  # text received and not yet passed on
        self.matched_stop: Optional[str] = None  # the stop string that ended the text

    @property
    def matched(self) -> bool:
        """Whether a stop string has appeared."""
        return self.matched_stop is not None

    def push(self, text: str) -> str:
        """Adds generated text; returns the part that is safe to pass on."""
        if self.matched:
            return ""
        if not self._matchers:
            return text
        for offset, char in enumerate(text):
            # Of the stop strings ending here, the longest began first.
            found = [matcher.stop for matcher in self._matchers if matcher.feed(char)]
            if found:
                self.matched_stop = max(found, key=len)
                end = len(self._pending) + offset + 1
                safe = (self._pending + text[:offset + 1])[: end - len(self.matched_stop)]
                self._pending = ""
                return safe
        self._pending += text
        hold = max(matcher.matched for matcher in self._matchers)
        cut = len(self._pending) - hold
        safe, self._pending = self._pending[:cut], self._pending[cut:]
        return safe

    def flush(self) -> str:
        """At the end: the held-back text that turned out not to be a stop string."""
        safe, self._pending = ("" if self.matched else self._pending), ""
        return safe
