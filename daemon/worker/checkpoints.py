"""Where a prompt's prefill keeps extra cache snapshots, for models whose cache cannot be trimmed.

A plain KV cache serves every prefix of itself, so one entry per request is enough. A sliding
window that has wrapped, or recurrent state, is usable only at exactly the length it was
taken at, so the engine keeps snapshots where the conversation's next request will still
agree with this one:
- the end of the system prompt and tools (a second session with the same set-up shares it);
- the end of the last message before the generation prompt, or just before the thinking
  opener when the template puts one there (thinking templates drop past reasoning from the
  history, so the next prompt agrees up to the opener and never past it);
- every `every` tokens (absolute positions, so two prompts sharing a long prefix name the same
  snapshot), so a divergence deep in a long prompt costs at most that many tokens.
The first two are found as mlx_lm.server finds its segments: by rendering the system messages
with an empty user turn (and the whole conversation without the generation prompt) and
comparing tokens with the prompt.
"""

from __future__ import annotations

from typing import Optional, Sequence

THINK_WINDOW = 11     # the opener is looked for among the prompt's last tokens (mlx_lm.server's window)


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def find_last(tokens: Sequence[int], needle: Sequence[int], start: int) -> Optional[int]:
    """The position of the last occurrence of `needle` in tokens[start:], or None."""
    k = len(needle)
    if not k:
        return None
    for i in range(len(tokens) - k, max(start, 0) - 1, -1):
        if list(tokens[i:i + k]) == list(needle):
            return i
    return None


def positions(n_tokens: int, *, system_end: Optional[int] = None, last_end: Optional[int] = None,
              think_start: Optional[int] = None, every: Optional[int] = None) -> tuple[int, ...]:
    """The checkpoint positions of an `n_tokens` prompt, sorted; each leaves at least the last
    prompt token to compute (BatchGenerator always feeds it on its own).

    `last_end` is where the last message ends; a thinking opener after it (`think_start`)
    moves that checkpoint up to just before the opener, which the next request still shares."""
    out = set()
    if system_end:
        out.add(system_end)
    tail = think_start if think_start is not None and (last_end is None or think_start >= last_end) else last_end
    if tail:
        out.add(tail)
    if every:
        out.update(range(every, n_tokens - 1, every))
    return tuple(sorted(p for p in out if 0 < p < n_tokens - 1))
