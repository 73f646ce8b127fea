"""The OpenAI metering on its own (quota_gw.metering): pure functions, no servers.

The sidecar's tests (test_proxy.py) show the same rules end to end; these pin them where they
are written, so a change to the estimate, the budget or the SSE splitting fails here first.
"""

from __future__ import annotations

import itertools
import random

import orjson
import pytest

from quota_gw import metering
from quota_gw.metering import IMAGE_TOKENS, OPENAI, PER_MESSAGE, PER_REPLY, Refused, StreamMeter


def test_a_chat_prompt_counts_every_message_part_and_schema():
    text = "x" * 40  # 10 tokens at ~4 characters a token
    assert metering.text_tokens(text) == 10
    bare = {"messages": [{"role": "user", "content": text}]}
    assert OPENAI.prompt_tokens("chat/completions", bare) == PER_REPLY + PER_MESSAGE + 10
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                        {"type": "image_url", "image_url": {"url": "u"}}]}]}
    assert OPENAI.prompt_tokens("chat/completions", parts) == PER_REPLY + PER_MESSAGE + 10 + IMAGE_TOKENS
    assert OPENAI.prompt_tokens("chat/completions", parts, image_tokens=7) == PER_REPLY + PER_MESSAGE + 10 + 7
    tools = {**bare, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": text}}}]}
    assert OPENAI.prompt_tokens("chat/completions", tools) > OPENAI.prompt_tokens("chat/completions", bare)



def test_every_message_field_beside_role_and_content_is_prompt_however_few_the_fields():
    """A message of role and content alone skips the walk of its other fields; any other field
    (a name, tool calls), with or without a role, is still counted."""
    text, name = "x" * 40, "n" * 8
    chat = "chat/completions"
    base = OPENAI.prompt_tokens(chat, {"messages": [{"role": "user", "content": text}]})
    assert OPENAI.prompt_tokens(chat, {"messages": [{"role": "user", "content": text, "name": name}]}) == base + 2
    assert OPENAI.prompt_tokens(chat, {"messages": [{"content": text, "name": name}]}) == base + 2
    assert OPENAI.prompt_tokens(chat, {"messages": [{"role": "user", "name": name}]}) == base - 10 + 2
    calls = [{"type": "function", "function": {"name": "f", "arguments": text}}]
    assert OPENAI.prompt_tokens(chat, {"messages": [{"role": "assistant", "content": None, "tool_calls": calls}]}) \
        == PER_REPLY + PER_MESSAGE + metering._strings(calls)


def test_an_endpoint_is_found_the_same_when_remembered():
    for _ in range(2):
        assert OPENAI.endpoint("/v1/chat/completions") == "chat/completions"
        assert OPENAI.endpoint("/v1/chat/completions/") == "chat/completions"
        assert OPENAI.endpoint("/v1/embeddings") == "embeddings"
        assert OPENAI.endpoint("/v1/models") is None
        assert OPENAI.endpoint("/v1/xchat/completions") == "completions"  # the legacy endpoint
        assert OPENAI.endpoint("/v1/chatcompletions") is None

def test_completions_and_embeddings_prompts_count_strings_and_token_ids():
    assert OPENAI.prompt_tokens("completions", {"prompt": "y" * 8}) == 2
    assert OPENAI.prompt_tokens("completions", {"prompt": [1, 2, 3]}) == 3  # token ids
    assert OPENAI.prompt_tokens("embeddings", {"input": [[1, 2], [3, 4, 5]]}) == 5
    assert OPENAI.prompt_tokens("embeddings", {"input": None}) == 1  # never below 1


def test_the_budget_is_the_least_valid_field_and_every_sent_field_is_set():
    body = {"max_tokens": 50, "max_completion_tokens": 20, "max_output_tokens": True}
    assert OPENAI.requested_budget(body) == 20  # a bool is not a budget
    OPENAI.set_budget(body, 16, "max_tokens")
    assert body == {"max_tokens": 16, "max_completion_tokens": 16, "max_output_tokens": 16}
    empty: dict = {}
    OPENAI.set_budget(empty, 9, "max_completion_tokens")
    assert empty == {"max_completion_tokens": 9}  # explicit: the upstream's default could exceed the hold


def test_every_completion_of_every_prompt_may_spend_the_budget():
    assert OPENAI.completions("chat/completions", {"n": 3}) == 3
    assert OPENAI.completions("completions", {"prompt": ["a", "b"], "best_of": 4}) == 8
    with pytest.raises(Refused) as refused:
        OPENAI.completions("chat/completions", {"n": metering.MAX_CHOICES + 1})
    assert refused.value.field == "n"
    assert not OPENAI.budgeted("embeddings") and OPENAI.budgeted("chat/completions")


def test_usage_total_is_total_tokens_or_the_sum_of_its_parts():
    assert OPENAI.usage_total({"total_tokens": 12, "prompt_tokens": 1, "completion_tokens": 1}) == 12
    assert OPENAI.usage_total({"prompt_tokens": 5, "completion_tokens": 7}) == 12
    assert OPENAI.usage_total({"total_tokens": -1}) is None
    assert OPENAI.usage_total(None) is None


def test_a_streamed_call_asks_for_usage_and_hides_only_the_event_it_added():
    body = {"stream": True}
    assert OPENAI.ask_for_usage(body) is True and body["stream_options"] == {"include_usage": True}
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    assert OPENAI.ask_for_usage(asked) is False  # the caller wants it: nothing hidden
    assert OPENAI.ask_for_usage({"stream": False}) is False


def _sse(events: list[dict], crlf: bool) -> bytes:
    sep = b"\r\n\r\n" if crlf else b"\n\n"
    return b"".join(b"data: " + orjson.dumps(e) + sep for e in events) + b"data: [DONE]" + sep


EVENTS = [{"choices": [{"delta": {"content": "he"}}]}, {"choices": [{"delta": {"content": "llo"}}]},
          {"choices": [{"delta": {}}]}, {"choices": [], "usage": {"total_tokens": 21}}]


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("hide", [False, True])
def test_the_stream_meter_gives_the_same_answer_for_every_chunking(crlf: bool, hide: bool):
    """However the bytes arrive, the meter forwards whole events, reads the usage once, counts
    the chunks that carried output, and hides the usage-only event only when asked to."""
    stream = _sse(EVENTS, crlf)
    rng = random.Random(7)
    cuts_seen = []
    for _ in range(60):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 12)))
        meter = StreamMeter(drop_usage_only=hide)
        out = b"".join(meter.feed(stream[a:b]) for a, b in itertools.pairwise([0, *cuts, len(stream)]))
        out += meter.flush()
        assert meter.total() == 21 and meter.completion_chunks == 2 and meter.done
        cuts_seen.append(out)
    assert len(set(cuts_seen)) == 1  # one output whatever the chunking
    kept = cuts_seen[0]
    assert (b'"usage"' in kept) is not hide
    assert kept.count(b"data: ") == len(EVENTS) + 1 - hide
