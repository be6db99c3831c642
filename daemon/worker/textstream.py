"""Incremental detokenization with OpenAI `stop` strings.

Text is held back by the length of the longest stop string minus one, so a client never
receives the start of a stop string that is then cut.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, detokenizer, stop: list[str]):
        self._detok = detokenizer
        self._stop = [s for s in stop if s]
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._sent = 0
        self._searched = 0
        self.stopped = False
        self.matched: str | None = None     # the stop string that ended the text

    def _emit(self, final: bool) -> str:
        text = self._detok.text
        if self._stop:
            start = max(0, self._searched - self._holdback)
            hits = [(i, s) for i, s in ((text.find(s, start), s) for s in self._stop) if i >= 0]
            self._searched = len(text)
            if hits:
                self.stopped = True
                end, self.matched = min(hits)
                out, self._sent = text[self._sent:end], end
                return out
        end = len(text) if final else max(self._sent, len(text) - self._holdback)
        out, self._sent = text[self._sent:end], end
        return out

    def add(self, token: int) -> str:
        """The text that became safe to send after this token."""
        self._detok.add_token(token)
        return self._emit(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._detok.finalize()
        return self._emit(final=True)
