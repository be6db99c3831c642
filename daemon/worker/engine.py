"""Continuous batching for one model: mlx-lm's BatchGenerator plus the prefix cache.

Requests join the running batch at every step and leave it when they finish; each carries
its own sampler, max_tokens and stop strings, so nothing forces the batch to drain. A new
request starts from the longest cached prefix of its prompt and prefills only the rest;
a finished one gives its KV cache (prompt + completion) back to the prefix cache, so the
next turn of the same conversation hits.

Chat requests are rendered with the model's chat template, tools included (`tools.py`: the
template's own tool support, or the fallback format); each request's output goes through
`output.py`, which turns tokens into typed events (text, reasoning, tool-call deltas).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler
from mlx_lm.tool_parsers import json_tools

from ..events import Done, Error, Logprob, Progress, Started
from . import checkpoints as ckpt
from . import tools as toolfmt
from .batch import Batch, Waiting
from .grammar import Compiler, GrammarError, GrammarProcessor, reasoning_end, request_grammar, tool_call_grammar
from .output import THINK, Markers, Output, initial_state, state_machine
from .prepare import Prepared, char_limit
from .sampling import make_sampler
from .speculative import SpecBatch

log = logging.getLogger("mlxd.worker")


class RequestError(Exception):
    """A request the worker refuses; `code` becomes the OpenAI error code."""

    def __init__(self, message: str, code: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


def internal_error(rid: Optional[str], e: BaseException) -> dict:
    """The `error` frame for a failure of ours inside one request: a 500 the client can report."""
    return Error(rid, f"internal error while serving this request ({type(e).__name__}: {e}); the model keeps serving",
                 code="internal_error", status=500).wire()


@dataclass
class Active:
    id: str
    uid: Optional[int]          # None until it joins the batch
    prompt_tokens: int
    cached_tokens: int
    max_tokens: int
    out: Output
    t_submit: float
    t_first: Optional[float] = None
    t_prefill_start: Optional[float] = None
    t_last: Optional[float] = None
    generated: int = 0
    cache_tier: Optional[str] = None
    cache_key: Optional[str] = None
    cache: Optional[dict] = None            # the prefix cache's Outcome, on the wire
    cache_ns: str = ""                      # the prefix cache namespace the daemon named (key, cache_salt)
    itl: list = field(default_factory=list)
    top_logprobs: Optional[int] = None      # None: no logprobs asked for
    grammar: Optional[GrammarProcessor] = None
    sampler: Any = None                     # set for a request that decodes speculatively


@dataclass
class SpecToken:
    """One token of a speculative row, shaped like BatchGenerator's responses for `_advance`."""
    uid: int
    token: int
    logprobs: Any
    finish_reason: Optional[str]
    keep: int       # its place among the tokens its step emitted (1-based)


class Engine:
    def __init__(self, model, tokenizer, *, max_batch_size: int, prefill_batch_size: int,
                 prefill_step_size: int, context_length: int, default_max_tokens: int,
                 prefix_cache: Any = None, reasoning_parser: Optional[str] = None,
                 speculative: Optional[dict] = None, stream: Any = None, record: bool = False,
                 checkpoint_every: Optional[int] = 2048):
        self.model = model
        self.stream = stream        # a group's ranks must run every collective on one stream
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.default_max_tokens = default_max_tokens
        self.prefix_cache = prefix_cache
        self.eos = set(tokenizer.eos_token_ids)
        self.char_limit = char_limit(tokenizer, context_length)    # longer prompts cannot fit
        self.max_batch_size, self.prefill_batch_size, self.prefill_step_size = \
            max_batch_size, prefill_batch_size, prefill_step_size
        self.batch = Batch(model, max_tokens=default_max_tokens, stop_tokens=[[t] for t in sorted(self.eos)],
                           completion_batch_size=max_batch_size, prefill_batch_size=prefill_batch_size,
                           prefill_step_size=prefill_step_size, stream=stream, record=record)
        # Prompt-lookup speculation: only on plain KV caches, since rejected draft tokens must
        # leave the cache (rotating windows and recurrent state cannot be trimmed back).
        fresh = make_prompt_cache(model)
        plain = can_trim_prompt_cache(fresh) and all(type(c) is KVCache for c in fresh)
        self.speculative = speculative if speculative and plain else None
        if speculative and not plain:
            log.warning("speculative decoding is off for this model: its KV cache cannot be trimmed")
        self.spec: Optional[SpecBatch] = self._new_spec()
        # A cache that cannot be trimmed is usable only at the length it was taken at: such a
        # model keeps snapshots at the places the next request will share (checkpoints.py).
        self.checkpointing = prefix_cache is not None and not plain
        self.checkpoint_every = checkpoint_every
        self.held: deque[Waiting] = deque()    # beyond max_batch_size while speculative rows decode apart
        self.active: dict[int, Active] = {}
        self.uid_of: dict[str, int] = {}
        self.decoding: set[int] = set()
        self.parked: dict[str, Waiting] = {}   # waiting for their grammar or their cached prefix
        self.wake = lambda: None               # called (from another thread) when a parked request can start
        self.compiler: Optional[Compiler] = None
        self.internal_errors = 0
        self.batch_resets = 0
        # Output formats: the tokenizer's (mlx-lm infers them from the template and vocabulary,
        # the model's `tool_parser` config overrides), else the fallback tool format.
        self.native_tools = toolfmt.template_knows_tools(tokenizer)
        if tokenizer.has_tool_calling:
            self.tool_markers = (tokenizer.tool_call_start, tokenizer.tool_call_end)
            self.parser, self.parser_name = tokenizer.tool_parser, toolfmt.parser_name(tokenizer)
        else:
            self.tool_markers = (json_tools.tool_call_start, json_tools.tool_call_end)
            self.parser, self.parser_name = json_tools.parse_tool_call, toolfmt.FALLBACK_PARSER
        self.think = (tokenizer.think_start, tokenizer.think_end) if tokenizer.has_thinking else None
        if reasoning_parser == "think":
            self.think = THINK
        elif reasoning_parser == "none":
            self.think = None
        self._machines: dict[Markers, Any] = {}
        self.think_tokens = list(tokenizer.encode(self.think[0], add_special_tokens=False)) if self.think else []
        # reasoning_effort changes something only on a model that reasons or a template that reads it
        self.takes_effort = self.think is not None or toolfmt.template_reads(tokenizer, "reasoning_effort", True)

    def _new_spec(self) -> Optional[SpecBatch]:
        if self.speculative is None:
            return None
        spec = SpecBatch(self.model, max_draft=self.speculative["max_draft"], ngram=self.speculative["ngram"],
                         max_sequences=self.speculative["max_sequences"])
        if getattr(self, "spec", None) is not None:    # counters survive a reset
            spec.draft_tokens, spec.accepted_tokens = self.spec.draft_tokens, self.spec.accepted_tokens
        return spec

    # -- requests ---------------------------------------------------------------------

    def render(self, msg: dict, messages: Optional[list] = None, generation_prompt: bool = True) -> str:
        """The chat template's prompt text, with tools, history calls and template kwargs (of
        `messages` in place of the request's, or without the generation prompt: checkpoints)."""
        tools = msg.get("tools") or None
        messages = msg["messages"] if messages is None else messages
        try:
            if self.native_tools:
                messages = toolfmt.native_messages(messages)
            else:
                messages = toolfmt.fallback_messages(messages, tools)
        except toolfmt.BadArguments as e:
            raise RequestError(str(e), param=e.param) from None
        kwargs = dict(msg.get("chat_template_kwargs") or {})
        kwargs.setdefault("enable_thinking", self.think is not None)   # mlx-lm's default, on our markers
        if msg.get("reasoning_effort") is not None:
            kwargs.setdefault("reasoning_effort", msg["reasoning_effort"])
        if tools and self.native_tools:
            kwargs["tools"] = tools
        try:
            try:
                return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                          tokenize=False, **kwargs)
            except Exception:
                merged = toolfmt.merge_system(messages)
                if merged == messages:
                    raise
                # A template that insists on one leading system message gets them all, in order.
                return self.tokenizer.apply_chat_template(merged, add_generation_prompt=generation_prompt,
                                                          tokenize=False, **kwargs)
        except Exception as e:  # jinja raises for roles/contents a template rejects
            raise RequestError(f"chat template rejected the messages: {e}", param="messages") from None

    def tokenize(self, msg: dict, max_chars: Optional[int] = None) -> tuple[list[int], str]:
        """The prompt's tokens, and its text for chat requests ("" otherwise). A text longer
        than `max_chars` is refused before it is tokenized (see `prepare.char_limit`)."""
        if "messages" in msg:
            text = self.render(msg)
            if not isinstance(text, str):
                raise RequestError("chat_template_kwargs made the template return no text", param="chat_template_kwargs")
            self._check_chars(text, max_chars, "messages")
            return list(self.tokenizer.encode(text, add_special_tokens=False)), text
        prompt = msg.get("prompt", "")
        if isinstance(prompt, str):
            self._check_chars(prompt, max_chars, "prompt")
        if isinstance(prompt, list):
            vocab = getattr(getattr(self.model, "args", None), "vocab_size", None) or len(self.tokenizer)
            bad = next((t for t in prompt if not 0 <= int(t) < vocab), None)
            if bad is not None:
                raise RequestError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
            return [int(t) for t in prompt], ""
        return list(self.tokenizer.encode(prompt)), ""

    def checkpoint_positions(self, msg: dict, tokens: list[int]) -> tuple[int, ...]:
        """Where this prompt's prefill keeps snapshots (`checkpoints.py`); none for a model whose
        cache trims, since one entry serves every prefix of itself. Part of `prepare`, off the
        engine's thread: it reads only the template, tokenizer and settings."""
        if not self.checkpointing:
            return ()
        system_end = last_end = think_start = None
        if "messages" in msg:
            msgs = msg["messages"]
            n_sys = next((i for i, m in enumerate(msgs) if m.get("role") not in ("system", "developer")), len(msgs))
            encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)   # noqa: E731
            with contextlib.suppress(Exception):     # best effort: a template that cannot say has none
                if n_sys or msg.get("tools"):
                    head = encode(self.render(msg, msgs[:n_sys] + [{"role": "user", "content": ""}], False))
                    n = ckpt.common_length(head, tokens)
                    system_end = n if n < len(head) else None
                last_end = ckpt.common_length(encode(self.render(msg, generation_prompt=False)), tokens)
            if self.think_tokens:
                think_start = ckpt.find_last(tokens, self.think_tokens, len(tokens) - ckpt.THINK_WINDOW)
        return ckpt.positions(len(tokens), system_end=system_end, last_end=last_end, think_start=think_start,
                              every=self.checkpoint_every)

    def output(self, msg: dict, prompt_text: str) -> Output:
        """How this request's tokens become events: plain text, or chat with reasoning and tools."""
        stop = list(msg.get("stop") or [])
        detok = self.tokenizer.detokenizer
        if "messages" not in msg:
            return Output(msg["id"], detok, stop)
        tools = msg.get("tools") or None
        choice = msg.get("tool_choice") or "auto"
        if tools and choice == "none":
            stop.append(self.tool_markers[0])    # no calls: the answer ends where a call would start
        markers = Markers(self.think, self.tool_markers if tools and choice != "none" else None)
        if markers == Markers() and not (self.tokenizer.response_transitions or self.tokenizer.structural_markers):
            return Output(msg["id"], detok, stop)     # nothing to segment: plain text
        if markers not in self._machines:
            self._machines[markers] = state_machine(self.tokenizer, markers)
        return Output(msg["id"], detok, stop, self._machines[markers],
                      initial_state(self.tokenizer, markers, prompt_text), toolfmt.call_class(self.parser_name),
                      self.parser, tools, parallel=msg.get("parallel_tool_calls") is not False)

    def constraint(self, msg: dict) -> Optional[dict]:
        """What grammar-constrained decoding must enforce for this request, or None.

        `tool_choice` "required" or a named function, and `response_format` json_object or
        json_schema, arrive here unchanged; the tool format says what a call looks like.
        """
        choice, fmt = msg.get("tool_choice"), msg.get("response_format")
        forced = msg.get("tools") and (choice == "required" or isinstance(choice, dict))
        structured = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
        if not (forced or structured):
            return None
        return {"tool_choice": choice if forced else None, "response_format": fmt if structured else None,
                "tools": msg.get("tools"), "tool_markers": self.tool_markers, "tool_parser": self.parser_name,
                "think": self.think}

    def grammar(self, msg: dict) -> Optional[tuple[str, str]]:
        """The grammar a request's output must follow, and the field that asks for it, or None.

        A forced tool call is a call in this model's tool format; formats whose call is not one
        JSON object between markers cannot be enforced, which is a 400, never a silent `auto`.
        """
        c = self.constraint(msg)
        if c is None:
            return None
        if c["tool_choice"] is None:
            return request_grammar(msg)
        if c["tool_parser"] != toolfmt.FALLBACK_PARSER:
            raise GrammarError(f"tool_choice {json.dumps(c['tool_choice'])} cannot be enforced for this model's "
                               f"tool format ({c['tool_parser']}); use 'auto'", param="tool_choice")
        start, end = c["tool_markers"]
        added = getattr(self.tokenizer, "get_added_vocab", dict)()
        named = isinstance(c["tool_choice"], dict)      # "call this function": one call of it
        return tool_call_grammar(c["tools"], c["tool_choice"], start, end,
                                 parallel=not named and msg.get("parallel_tool_calls") is not False,
                                 special=[m for m in (start, end) if m in added]), "tool_choice"

    def _vocab_size(self) -> int:
        return getattr(getattr(self.model, "args", None), "vocab_size", None) or len(self.tokenizer)

    def _check_chars(self, text: str, max_chars: Optional[int], param: str) -> None:
        if max_chars is not None and len(text) > max_chars:
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens. However, your "
                f"prompt has {len(text)} characters, more than that many tokens can hold. Please reduce the prompt.",
                code="context_length_exceeded", param=param)

    def prepare(self, msg: dict) -> Prepared:
        """A request's prompt rendered, tokenized and checked against the context. Touches no
        engine state, so the worker runs it off the engine's thread (`prepare.py`)."""
        if "embed" in msg:
            raise RequestError("this model is a language model, not an embedding model: it serves chat and "
                               "completions; embeddings need a model entry with kind: embedding (or a "
                               "sentence-transformers directory)", code="model_not_supported", param="model")
        if msg.get("require_thinking") and self.think is None:
            raise RequestError("this model does not support thinking: its chat template has no thinking markers; "
                               "leave think out or set it to false", code="model_not_supported", param="think")
        if msg.get("reasoning_effort") not in (None, "none") and not self.takes_effort:
            raise RequestError("this model does not reason: it has no thinking markers and its chat template does not "
                               "read reasoning_effort, so the effort would change nothing; leave it out",
                               code="unsupported_parameter", param="reasoning_effort")
        tokens, prompt_text = self.tokenize(msg, max_chars=self.char_limit)
        if not tokens:
            raise RequestError("the prompt is empty", param="prompt")
        room = self.context_length - len(tokens)
        if room < 1:
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens. However, your "
                f"prompt has {len(tokens)} tokens, which leaves no room for a completion. Please reduce the prompt.",
                code="context_length_exceeded", param="messages" if "messages" in msg else "prompt")
        # Agents ask for more than any local context holds (opencode: 32000); the answer is
        # cut at the context's end with finish_reason "length", as if they had asked for that.
        return Prepared(tokens, prompt_text, min(int(msg.get("max_tokens") or self.default_max_tokens), room),
                        self.checkpoint_positions(msg, tokens))

    def submit(self, msg: dict, prepared: Optional[Prepared] = None) -> Optional[dict]:
        """Queue a request (prepared here unless `prepared` is given); returns its `started`
        event (usage known up front), or None while it is parked (it starts at a later step,
        see `step`)."""
        rid = msg["id"]
        tokens, prompt_text, max_tokens, checkpoints = prepared if prepared is not None else self.prepare(msg)
        out = self.output(msg, prompt_text)
        try:
            wanted = self.grammar(msg)
        except GrammarError as e:
            raise RequestError(str(e), param=e.param) from None
        spec = self.sampling(msg)
        a = Active(id=rid, uid=None, prompt_tokens=len(tokens), cached_tokens=0, max_tokens=max_tokens,
                   out=out, t_submit=time.perf_counter(), cache_ns=str(msg.get("cache_ns") or ""),
                   top_logprobs=int(msg.get("top_logprobs") or 0) if msg.get("logprobs") else None)
        p = Waiting(a, tokens, make_sampler(*spec), spec=spec, wanted=wanted, checkpoints=checkpoints)
        if wanted is not None:
            if self.compiler is None:
                self.compiler = Compiler(self.tokenizer, self._vocab_size())
            p.grammar = self.compiler.compile(*wanted)
        try:
            return self._start(p)
        except GrammarError as e:       # it compiled (and failed) before `_start` looked: still a 400
            raise RequestError(str(e), param=e.param) from None

    def sampling(self, msg: dict) -> tuple:
        """make_sampler's arguments for a request."""
        return (float(msg.get("temperature", 0.0)), float(msg.get("top_p", 1.0)), msg.get("seed"),
                int(msg.get("top_k") or 0))

    def _start(self, p: Waiting) -> Optional[dict]:
        """Insert a request into the batch on top of its cached prefix; park it (None) while
        its grammar compiles or that prefix is read from disk, so the engine keeps stepping
        everyone else. A grammar that does not compile raises GrammarError."""
        if p.grammar is not None:
            if not p.grammar.done():
                self.parked[p.active.id] = p
                p.grammar.add_done_callback(lambda _: self.wake())
                return None
            matcher, p.grammar = p.grammar.result(), None
            p.active.grammar = GrammarProcessor(matcher, self._vocab_size(), self.tokenizer.eos_token_id,
                                                reasoning_end(self.tokenizer, p.tokens) if self.think else None)
        if self.spec is not None and len(self.active) >= self.max_batch_size:
            self.held.append(p)     # speculative rows leave the BatchGenerator, which would admit more
            return None
        cache, n_cached, tier = None, 0, None
        if self.prefix_cache is not None:
            got = self.prefix_cache.fetch_nowait(p.tokens, ns=p.active.cache_ns)
            if isinstance(got, Future):
                p.read = got
                self.parked[p.active.id] = p
                got.add_done_callback(lambda _: self.wake())
                return None
            cache, n_cached, tier = got
            outcome = self.prefix_cache.last_outcome
            if tier and not self.shared(self.prefix_cache.last_key, n_cached):
                cache, n_cached, tier = None, 0, None
                outcome = replace(outcome, tokens=0, tier=None, entry=None, reason="unshared",
                                  detail=f"entry {outcome.entry} is missing on a rank of the group")
            p.active.cache = outcome.wire()
            log.debug("request %s: prefix cache %s", p.active.id, p.active.cache)
        a, tokens = p.active, p.tokens
        a.cache_key = self.prefix_cache.last_key if tier else None
        if self.spec is not None and a.grammar is None:
            a.sampler = p.sampler       # decoded speculatively once prefilled (see `_insert`)
        try:
            uid = self._insert(p, cache, n_cached)
        except Exception:
            if a.cache_key:
                self.prefix_cache.discard(a.cache_key)     # not trusted again
            raise
        a.uid, a.cached_tokens, a.cache_tier = uid, n_cached, tier
        self.active[uid] = a
        self.uid_of[a.id] = uid
        return Started(a.id, len(tokens), n_cached, a.max_tokens).wire()

    def shared(self, key: str, n_tokens: int) -> bool:
        """Whether a cache hit can be used (a group's every rank must serve its shard of that length)."""
        return True

    def _insert(self, p: Waiting, cache, n_cached: int) -> int:
        # A request decoded speculatively leaves the BatchGenerator when its prompt ends, and
        # the one token the BatchGenerator samples there is dropped: it draws greedily.
        sampler = greedy_sampler if p.active.sampler is not None else p.sampler
        return self.batch.insert(p.tokens, n_cached=n_cached, cache=cache, max_tokens=p.active.max_tokens,
                                 sampler=sampler, processor=p.active.grammar, checkpoints=p.checkpoints,
                                 key=p.active.cache_key if cache is not None else None, spec=p.spec, wanted=p.wanted)

    def _remove(self, uid: int, caches: bool = False):
        """Take a sequence out of the batch; its (cache, tokens) when asked for."""
        return self.batch.remove(uid, caches)

    def clear_cache(self) -> int:
        n = self.prefix_cache.clear() if self.prefix_cache is not None else 0
        self.batch.log("clear")
        return n

    def cancel(self, rid: str) -> Optional[dict]:
        if (p := self.parked.pop(rid, None)) is not None:
            if p.grammar is not None:
                p.grammar.cancel()
            self._abandon(p.read)
            return self._done(p.active, "cancelled")
        if (p := next((h for h in self.held if h.active.id == rid), None)) is not None:
            self.held.remove(p)
            return self._done(p.active, "cancelled")
        uid = self.uid_of.get(rid)
        if uid is None:
            return None
        if self.spec is not None and uid in self.spec:
            cache = self.spec.remove(uid)
        else:
            cache = self._remove(uid, caches=True)
        a = self._forget(uid)
        self._store(uid, cache, a.cache_ns)
        return self._done(a, "cancelled")

    @property
    def busy(self) -> bool:
        """Work to do now: sequences in the batch, or parked ones whose grammar or disk read is done."""
        return bool(self.active) or bool(self.held) or any(p.waiting_on.done() for p in self.parked.values())

    @property
    def running(self) -> int:
        return len(self.decoding)

    @property
    def waiting(self) -> int:
        return len(self.active) - len(self.decoding) + len(self.parked) + len(self.held)

    # -- the step loop ------------------------------------------------------------------

    def step(self) -> list[dict]:
        """One engine step: parked requests whose prefix is read join the batch, then a prefill
        chunk and/or one decoded token for every sequence. A failure fails only the requests it
        touched (the whole batch when the batch itself fails) and the engine goes on."""
        events = self._unpark()
        while self.held and len(self.active) < self.max_batch_size:
            events += self._admit(self.held.popleft())
        if not self.active:
            return events
        if self.spec is None or len(self.active) > len(self.spec):
            events += self._gen_step()
        if self.spec:
            events += self._spec_step()
        if self.prefix_cache is not None:
            self.prefix_cache.fit_running(self.running_bytes())
        return events

    def running_bytes(self) -> int:
        """KV bytes the requests in the batch hold now (BatchGenerator's public count, as
        mlx_lm.server uses it for its prompt cache budget, and the speculative rows')."""
        spec = sum(c.nbytes for c in self.spec.cache) if self.spec is not None and self.spec.cache else 0
        return self.batch.gen.prompt_cache_nbytes + spec

    def _gen_step(self) -> list[dict]:
        """The BatchGenerator's step: a prefill chunk and/or one token for each of its sequences."""
        events = []
        t0 = time.perf_counter()
        try:
            prompt_resps, gen_resps, checkpoints = self.batch.step()
        except Exception as e:
            return events + self.reset(e)
        now = time.perf_counter()
        for c in checkpoints:
            self._checkpoint(c)
        for p in prompt_resps:
            a = self.active.get(p.uid)
            if a is None:
                continue
            if a.t_prefill_start is None:
                a.t_prefill_start = t0
            if p.end_of_prompt:
                self.decoding.add(p.uid)
                if a.sampler is not None:
                    try:
                        self._to_spec(a, p.uid)
                    except Exception as e:
                        return events + self.reset(e)
            else:
                events.append(Progress(a.id, p.progress[0], p.progress[1]).wire())
        for r in gen_resps:
            a = self.active.get(r.uid)
            if a is None:
                continue
            if a.grammar is not None and a.grammar.error:     # the matcher failed: this request only
                if r.finish_reason is None:
                    with contextlib.suppress(Exception):
                        self._remove(r.uid)
                self._forget(r.uid)
                events.append(Error(a.id, a.grammar.error, code="grammar_error", status=500).wire())
                continue
            try:
                events.extend(self._advance(a, r, now))
            except Exception as e:    # a bug reading one request's output fails that request, not the worker
                log.exception("request %s failed while handling its token", a.id)
                if r.uid in self.active:
                    self._forget(r.uid)
                with contextlib.suppress(Exception):
                    self._remove(r.uid)      # it may have left the batch already (finished)
                events.append(self._internal_error(a.id, e))
        return events

    def _to_spec(self, a: Active, uid: int) -> None:
        """A prefilled prompt leaves the BatchGenerator for the speculative batch. Its cache holds
        the whole prompt; the last token comes off and is fed again with the first draft."""
        cache, tokens = self._remove(uid, caches=True)
        for c in cache:
            c.trim(1)
        self.spec.add(uid, cache, list(tokens), sampler=None if a.sampler is greedy_sampler else a.sampler,
                      max_tokens=a.max_tokens, logprobs=a.top_logprobs is not None)

    def _spec_step(self) -> list[dict]:
        """One verify pass for the speculative rows; each accepted token goes through `_advance`
        on its own, so stop strings, EOS and max_tokens cut exactly where they would have."""
        events = []
        try:
            emitted = self.spec.step()
        except Exception as e:
            return self.reset(e)
        now = time.perf_counter()
        for uid, tokens in emitted.items():
            a = self.active.get(uid)
            for j, t in enumerate(tokens):
                if a is None or uid not in self.active:
                    break
                reason = "stop" if t.token in self.eos else "length" if a.generated + 1 >= a.max_tokens else None
                try:
                    events.extend(self._advance(a, SpecToken(uid, t.token, t.logprobs, reason, j + 1), now))
                except Exception as e:
                    log.exception("request %s failed while handling its token", a.id)
                    if uid in self.active:
                        self._forget(uid)
                    if uid in self.spec:
                        with contextlib.suppress(Exception):
                            self.spec.remove(uid)
                    events.append(self._internal_error(a.id, e))
        return events

    def _advance(self, a: Active, r, now: float) -> list[dict]:
        """One generated token of one request: its events, and its end if it ended."""
        a.generated += 1
        if a.t_first is None:
            a.t_first = now
        else:
            a.itl.append(round(now - a.t_last, 5))
        a.t_last = now
        reason = r.finish_reason
        eos = reason == "stop" and r.token in self.eos
        events = [self._logprob(a, r).wire()] if a.top_logprobs is not None and not eos else []
        out = [] if eos else a.out.add(r.token)
        cache = None
        if reason is None and a.out.stopped:
            reason = "stop"
        if reason is not None:
            cache = self._release(r)
            tail, reason = a.out.finish(reason)
            out += tail
        events.extend(e.wire() for e in out)
        if reason is not None:
            self._forget(r.uid)
            self._store(r.uid, cache, a.cache_ns)
            events.append(self._done(a, reason))
        return events

    def _release(self, r) -> Optional[tuple]:
        """A finished sequence's cache and tokens, up to and including its last token."""
        if isinstance(r, SpecToken):
            return self.spec.remove(r.uid, keep=r.keep)
        if r.finish_reason:
            return r.prompt_cache, r.all_tokens
        return self._remove(r.uid, caches=True)

    def _admit(self, p: Waiting) -> list[dict]:
        try:
            return [ev] if (ev := self._start(p)) is not None else []
        except Exception as e:
            log.exception("request %s failed to start", p.active.id)
            return [self._internal_error(p.active.id, e)]

    def _unpark(self) -> list[dict]:
        events = []
        for rid, p in list(self.parked.items()):
            if not p.waiting_on.done():
                continue
            del self.parked[rid]
            read = p.read
            try:
                if (ev := self._start(p)) is not None:
                    events.append(ev)
            except GrammarError as e:
                events.append(Error(rid, str(e), code="invalid_request_error", param=e.param, status=400).wire())
            except Exception as e:
                log.exception("request %s failed to start", rid)
                events.append(self._internal_error(rid, e))
            self._abandon(read)       # a no-op when used; else (another entry won meanwhile) frees what it read
        return events

    def _abandon(self, read) -> None:
        if read is not None and self.prefix_cache is not None and not any(o.read is read for o in self.parked.values()):
            self.prefix_cache.abandon(read)

    def reset(self, e: Exception) -> list[dict]:
        """The batch failed as a whole: fail its requests, start a fresh generator, and drop the
        cache entries they started from (one of them may be what broke it)."""
        log.error("engine step failed (%s: %s); failing the %d requests in the batch and resetting it",
                  type(e).__name__, e, len(self.active), exc_info=e)
        self.batch_resets += 1
        events = []
        for uid in list(self.active):
            a = self._forget(uid)
            if a.cache_key and self.prefix_cache is not None:
                try:
                    self.prefix_cache.discard(a.cache_key)
                except Exception:
                    log.exception("dropping prefix cache entry %s failed", a.cache_key)
            events.append(self._internal_error(a.id, e))
        self.batch.reset()
        self.spec = self._new_spec()
        return events

    def _internal_error(self, rid: str, e: Exception) -> dict:
        self.internal_errors += 1
        return internal_error(rid, e)

    # -- helpers --------------------------------------------------------------------------

    def _forget(self, uid: int) -> Active:
        a = self.active.pop(uid)
        self.uid_of.pop(a.id, None)
        self.decoding.discard(uid)
        return a

    def _store(self, uid: int, cache_and_tokens, ns: str = "") -> Optional[str]:
        """Best effort: the request's answer is complete, so a failure here costs only reuse.
        The entry's key (in namespace `ns`) when it was stored."""
        if self.prefix_cache is None or not cache_and_tokens:
            return None
        cache, tokens = cache_and_tokens
        if cache and tokens:
            try:
                key = self.prefix_cache.store(list(tokens), cache, ns)
            except Exception:
                self.prefix_cache.counters["store_errors"] += 1
                log.exception("storing a finished request's cache failed; serving goes on")
                return None
            if key is not None:
                self.batch.log("store", uid, ns)     # a group's other ranks keep what rank 0 keeps
            return key
        return None

    def _checkpoint(self, c) -> None:
        """Keep a prompt's cache at a checkpoint it just passed (best effort, like `_store`)."""
        if self.prefix_cache is None:
            return
        a = self.active.get(c.uid)
        ns = a.cache_ns if a is not None else ""
        try:
            key = self.prefix_cache.store(c.tokens, c.cache, ns)
        except Exception:
            self.prefix_cache.counters["store_errors"] += 1
            log.exception("storing a checkpoint failed; serving goes on")
            return
        if key is not None:
            self.batch.log("checkpoint", c.uid, len(c.tokens), ns)

    def _logprob(self, a: Active, r) -> Logprob:
        lp, top = r.logprobs, []
        if a.top_logprobs:
            ids = mx.argpartition(-lp, a.top_logprobs - 1)[: a.top_logprobs]
            top = sorted(zip(ids.tolist(), lp[ids].tolist()), key=lambda x: -x[1])
        piece = self.tokenizer.decode
        return Logprob(a.id, piece([r.token]), lp[r.token].item(), [[piece([t]), v] for t, v in top])

    def _done(self, a: Active, reason: str) -> dict:
        now = time.perf_counter()
        start = a.t_prefill_start or now
        return Done(
            a.id, reason, cache_tier=a.cache_tier, cache=a.cache, itl=a.itl, stop_sequence=a.out.text.matched,
            usage={"prompt_tokens": a.prompt_tokens, "completion_tokens": a.generated,
                   "cached_tokens": a.cached_tokens},
            timings={"queue": start - a.t_submit,
                     "prefill": (a.t_first or now) - start,
                     "ttft": (a.t_first or now) - a.t_submit,
                     "total": now - a.t_submit}).wire()
