"""Work before admission: a huge prompt never stalls the other streams of its model.

Rendering and tokenizing run on the worker's preparer threads, not its engine thread, and a
prompt too long in characters to fit the context is refused before it is tokenized. Driven
through the real daemon and worker on the real model with the official SDK.
"""

from __future__ import annotations

import threading

import openai
import pytest

from conftest import Daemon, smol, wait_until

CONTEXT = 65536         # smollm2's longest token is 81 characters: prompts up to ~5.3M characters are tokenized
WORDS = "hello world, this is a test of the tokenizer. "


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with Daemon(tmp_path_factory.mktemp("admission"), [
        smol("smol", engine={"context_length": CONTEXT, "max_batch_size": 4},
             sampling={"temperature": 0.0, "max_tokens": 64}),
    ]) as d:
        yield d


class Stream:
    """A long completion streamed on its own thread, counting the tokens that arrive."""

    def __init__(self, client):
        self.tokens = 0
        self.finished, self.stop = threading.Event(), threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(client,), daemon=True)
        self.thread.start()

    def _run(self, client) -> None:
        try:
            # Closed on leaving the block: the connection closes, so the daemon cancels the request
            # (a bare `break` leaves the SDK's response, and the request, open until it ends).
            with client.completions.create(model="smol", prompt="1, 2, 3, 4, 5,", max_tokens=600,
                                           stream=True) as chunks:
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].text:
                        self.tokens += 1
                    if self.stop.is_set():
                        break
        except Exception as e:     # reported by the test
            self.error = e
        finally:
            self.finished.set()


def refused(client, content: str) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": content}], max_tokens=4)
    return info.value


def test_a_stream_keeps_decoding_while_a_4mb_prompt_is_tokenized(daemon):
    client = daemon.openai()
    stream = Stream(client)
    wait_until(lambda: stream.tokens >= 3 or stream.finished.is_set(), 120, "the stream's first tokens")
    assert not stream.finished.is_set(), stream.error
    before = stream.tokens
    # Fits by its length in characters (4M < 65535 x 81), so it is rendered and tokenized
    # (~1M tokens, seconds of work), then refused by its token count.
    err = refused(client, (WORDS * 90_000)[:4_000_000])
    during = stream.tokens - before
    assert err.body["code"] == "context_length_exceeded" and "tokens" in err.body["message"]
    # On the engine thread, tokenizing stopped the stream for the whole time (measured under load:
    # 1 token in 17 s before the fix, 13-18 in 30-40 s after).
    assert during >= 5, f"only {during} tokens of the other stream arrived while the prompt was tokenized"
    stream.stop.set()
    assert stream.finished.wait(300) and stream.error is None, stream.error
    wait_until(lambda: daemon.model_status("smol")["requests_admitted"] == 0, 60, "the stream cancelled")


def test_a_prompt_longer_than_the_context_can_hold_is_refused_by_its_length(daemon):
    client = daemon.openai()
    err = refused(client, (WORDS * 130_000)[:6_000_000])     # > 65535 x 81 characters
    assert err.body["code"] == "context_length_exceeded"
    assert "characters" in err.body["message"] and err.body["param"] == "messages"
    # The model keeps serving, and a prompt that fits still does.
    out = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert out.choices[0].message.content
    assert daemon.model_status("smol")["state"] == "ready"
