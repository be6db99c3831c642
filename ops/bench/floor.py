"""The one floor every bench divides by: raw mlx-lm prefilling a request's new tokens.

Definition (the way mlxd prefills, through mlx-lm's BatchGenerator): onto a KV cache that
already holds the reusable prefix (built untimed), the new tokens but the last go through the
model in chunks of `PREFILL_STEP` (mlxd's default `engine.prefill_step_size`) with only the
cache evaluated, so no logits are computed for them; then the last token alone, whose logits
give the greedy first token. The time of that is the floor. Each timed run starts from a copy
of the held cache, materialised before the clock starts, so rotating (sliding-window) and
recurrent caches, which cannot be trimmed back, are measured the same way as plain ones.

Runs in a child process re-executed with OpenBLAS preloaded (`common.InProc`), interleaved
with the servers' requests so that it shares their noise.
"""

from __future__ import annotations

import copy
import time

from common import median, serve_inproc

PREFILL_STEP = 512     # daemon/config.py: EngineConfig.prefill_step_size


def common_len(a: list, b: list) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class Floor:
    """Raw mlx-lm on one model; `time(tokens, reuse)` is the floor of prefilling tokens[reuse:].

    One held cache per series (a chat, a session): a request whose reusable prefix extends the
    held tokens only extends it; one that does not (another branch) rebuilds it, untimed."""

    def __init__(self, model_dir: str, step: int = PREFILL_STEP):
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.models.cache import make_prompt_cache

        self.mx, self.make_cache, self.step = mx, make_prompt_cache, step
        self.model, self.tokenizer = load(model_dir)
        self.held: dict[str, tuple[list, list]] = {}
        self.first_token(list(range(100, 164)), self.make_cache(self.model))     # warm-up

    def prefill(self, tokens: list, cache) -> None:
        """Into the cache, chunk by chunk, without logits (only the cache state is evaluated)."""
        for s in range(0, len(tokens), self.step):
            self.model(self.mx.array(tokens[s:s + self.step])[None], cache=cache)
            self.mx.eval([c.state for c in cache])

    def first_token(self, tokens: list, cache) -> int:
        self.prefill(tokens[:-1], cache)
        y = self.mx.argmax(self.model(self.mx.array(tokens[-1:])[None], cache=cache)[:, -1, :], axis=-1)
        self.mx.eval(y, [c.state for c in cache])
        return int(y.item())

    def time(self, tokens: list, reuse: int, reps: int = 1, series: str = "") -> dict:
        reuse = max(0, min(reuse, len(tokens) - 1))
        held, cache = self.held.get(series, ([], None))
        if cache is None or held != tokens[:len(held)] or len(held) > reuse:
            held, cache = [], self.make_cache(self.model)
        self.prefill(tokens[len(held):reuse], cache)
        self.held[series] = (tokens[:reuse], cache)
        times = []
        for _ in range(reps):
            run = copy.deepcopy(cache)
            self.mx.eval([c.state for c in run])
            t0 = time.perf_counter()
            self.first_token(tokens[reuse:], run)
            times.append(time.perf_counter() - t0)
        return {"prompt_tokens": len(tokens), "reused": reuse, "new": len(tokens) - reuse,
                "ttft": median(times), "runs": times}


def serve(payload: dict, tokens_of=None) -> None:
    """The child side: requests {tokens, reuse, reps, series} (or whatever `tokens_of(floor, req)`
    turns into (tokens, reuse)) answered with Floor.time's dict."""
    floor = Floor(payload["model_dir"])

    def handle(req):
        tokens, reuse = tokens_of(floor, req) if tokens_of else (req["tokens"], req["reuse"])
        return floor.time(tokens, reuse, req.get("reps", 1), str(req.get("series", "")))

    serve_inproc(handle, {"ok": True})
