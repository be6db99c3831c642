"""A multi-turn chat through a running mlxd, measuring how much of each prompt the cache served.

reuse = cached tokens / tokens the prompt shares with the previous turn's prompt: 1.0 means
everything a cache could have known was served; a trimmable cache can exceed it (the previous
answer, kept in its entry, counts too). The prompts' tokens are rendered here with the model's
own tokenizer and template, and each turn checks that its count is the daemon's
`prompt_tokens`, so a rendering that differed from the worker's would fail, not mislead.
The client sends each answer back as a client does: its `content` only, reasoning dropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

WORDS = (
    "cache window layer state prompt answer token model turn reason memory disk batch step entry "
    "system user value list string file path request response thread worker tensor array shape "
    "the of and to in is that for it as with on be by this are from at or an have not which but "
    "why how when where what does would should could explain compare describe list show"
).split()


def user_message(seed: str, n_words: int = 110) -> str:
    """A deterministic question of about n_words words (~1 token each on the tiny tokenizer)."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "?"


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass
class Turn:
    prompt: list[int]       # the prompt's tokens, as rendered here
    cached: int             # usage.prompt_tokens_details.cached_tokens
    shared: int             # tokens in common with the previous turn's prompt (0 on the first)
    text: str               # the answer's content
    reasoning: str          # its reasoning, if any

    @property
    def reuse(self) -> Optional[float]:
        return self.cached / self.shared if self.shared else None


class Renderer:
    """The model's tokenizer with the template the daemon uses for it."""

    def __init__(self, model_dir: Path, chat_template: Optional[Path] = None):
        from mlx_lm.utils import load_tokenizer

        extra = {"chat_template": Path(chat_template).read_text()} if chat_template else {}
        self.tok = load_tokenizer(Path(model_dir), extra)

    def tokens(self, messages: list[dict], tools: Optional[list] = None) -> list[int]:
        from daemon.worker import tools as toolfmt       # where tools go when the template ignores them

        kwargs = {}
        if toolfmt.template_knows_tools(self.tok):
            messages = toolfmt.native_messages(messages)
            if tools:
                kwargs["tools"] = tools
        else:
            messages = toolfmt.fallback_messages(messages, tools)
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                            enable_thinking=self.tok.has_thinking, **kwargs)
        return list(self.tok.encode(text, add_special_tokens=False))


@dataclass
class Chat:
    """One conversation: a system prompt, then a user message and the model's answer per turn."""

    client: object                     # an openai.OpenAI on the daemon
    model: str
    renderer: Renderer
    system: str
    max_tokens: int = 128
    tools: Optional[list] = None
    seed: str = ""
    messages: list[dict] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self):
        if not self.messages:
            self.messages = [{"role": "system", "content": self.system}]

    def next_messages(self, user_words: int = 110) -> list[dict]:
        return self.messages + [{"role": "user", "content": user_message(f"{self.seed}/{len(self.turns)}", user_words)}]

    def send(self, messages: list[dict]) -> Turn:
        """One request of these messages; not part of the conversation (see `turn`)."""
        prompt = self.renderer.tokens(messages, self.tools)
        kwargs = {"tools": self.tools} if self.tools else {}
        r = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=self.max_tokens,
                                                temperature=0, **kwargs)
        assert r.usage.prompt_tokens == len(prompt), (
            f"{self.model}: the daemon rendered {r.usage.prompt_tokens} prompt tokens, this helper {len(prompt)}")
        msg = r.choices[0].message
        shared = shared_prefix(self.turns[-1].prompt, prompt) if self.turns else 0
        details = r.usage.prompt_tokens_details
        return Turn(prompt, details.cached_tokens if details else 0, shared, msg.content or "",
                    getattr(msg, "reasoning_content", None) or "")

    def turn(self, user_words: int = 110) -> Turn:
        """The next user message, its answer appended to the history as a client would."""
        messages = self.next_messages(user_words)
        t = self.send(messages)
        self.messages = messages + [{"role": "assistant", "content": t.text}]
        self.turns.append(t)
        return t

    def reuse(self) -> list[Optional[float]]:
        return [t.reuse for t in self.turns]
