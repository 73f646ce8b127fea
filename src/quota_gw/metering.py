"""LLM usage metering: estimate before, measure after; one class per upstream API.

The gateway holds, before the call, everything the upstream may bill — every part of every
message, tool and function schemas, images, and the completion budget times the number of
completions — and charges what the upstream reports after it, beyond the hold too as far as
the balance allows (lua/commit.lua). The estimate is an estimate (1 token ≈ 4 characters plus
OpenAI's per-message framing; an image at a fixed bound); the upstream's usage decides the
charge, so a prompt hidden where the estimate is low is still paid for. Both sides live here
so the proxy and the demo upstream count tokens the same way.

An API is a `Metering` subclass: which paths it meters, the prompt estimate, the completion
budget fields, how to ask for usage, and where the usage is in an answer (JSON or SSE). A
route's `metering:` names one (`METERINGS`); the sidecar knows no API by name. Adding one is
a class here plus its name in `config.Route.metering` (see `Anthropic`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

PER_MESSAGE = 4  # chat framing tokens per message (role, separators)
PER_REPLY = 3  # tokens that prime the assistant's reply

KINDS = ("chat/completions", "completions", "embeddings")
# Every field an OpenAI-compatible server may read as the completion budget: chat's current
# and legacy names, and the Responses API's (some compatible servers accept it on chat too).
BUDGET_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
MAX_CHOICES = 128  # OpenAI's own limit for `n`
# An image part is held at the most one image costs under OpenAI's documented tile method for
# GPT-4o/4.1-class models at detail high (scaled into 2048x2048, shortest side 768: at most
# 2x4 tiles of 512 px, 170 tokens each, plus 85). The route's `image_tokens` overrides it.
IMAGE_TOKENS = 85 + 170 * 8
IMAGE_PARTS = ("image_url", "input_image", "image")


def kind_of(path: str) -> str | None:
    """Which OpenAI endpoint a path is ('chat/completions', 'completions', 'embeddings')."""
    p = path.rstrip("/")
    for k in KINDS:
        if p == k or p.endswith("/" + k):
            return k
    return None


def text_tokens(text: str) -> int:
    """⌈ASCII characters / 4⌉ plus one per other character: tokenizers spend about a token per
    CJK character, so chars/4 alone would under-hold non-English prompts several times over."""
    if text.isascii():
        return -(-len(text) // 4)
    ascii_n = len(text.encode("ascii", "ignore"))
    return -(-ascii_n // 4) + (len(text) - ascii_n)


def _strings(value: Any, keys: bool = False) -> int:
    """Tokens of every string inside a JSON value, keys too when `keys`. Walked with a stack,
    not recursion: a body may nest as deep as the JSON parser allows (1,024 levels)."""
    n, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            n += text_tokens(v)
        elif isinstance(v, dict):
            if keys:
                n += sum(text_tokens(k) for k in v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return n


def _schema(value: Any) -> int:
    """Tokens of a schema the upstream renders into the prompt (tools, functions, a JSON
    response format): every key and string in it (parameter names are prompt text), plus
    one token per value for the punctuation around it."""
    if value is None:
        return 0
    n, stack = 0, [value]
    while stack:  # the same walk as _strings, counting structure too
        v = stack.pop()
        n += 1
        if isinstance(v, str):
            n += text_tokens(v)
        elif isinstance(v, dict):
            n += sum(text_tokens(k) for k in v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return n


def _part(part: Any, image_tokens: int) -> int:
    """One content part: text by its characters, an image at `image_tokens`, anything else
    (audio, files) by every string in it, data included — more than the upstream bills."""
    if isinstance(part, str):
        return text_tokens(part)
    if not isinstance(part, dict):
        return 0
    if part.get("type") in IMAGE_PARTS or "image_url" in part:
        return image_tokens
    if isinstance(part.get("text"), str):
        return text_tokens(part["text"])
    return _strings({k: v for k, v in part.items() if k != "type"})


def _content(content: Any, image_tokens: int) -> int:
    if isinstance(content, list):  # multi-part content
        return sum(_part(p, image_tokens) for p in content)
    return _part(content, image_tokens)


def prompt_tokens(kind: str, body: dict[str, Any], image_tokens: int = IMAGE_TOKENS) -> int:
    """Estimated prompt tokens of a request body (an integer, never below 1): everything the
    upstream bills as input — messages (every part, tool calls and names), tool and function
    schemas, a JSON-schema response format, predicted output; an image at `image_tokens`."""
    if kind == "chat/completions":
        n = PER_REPLY
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                content = m.get("content")
                n += PER_MESSAGE + (text_tokens(content) if isinstance(content, str) else _content(content, image_tokens))
                if len(m) > ("role" in m) + ("content" in m):  # more than role and content: tool calls, names
                    n += _strings({k: v for k, v in m.items() if k not in ("role", "content")})
        for f in ("tools", "functions", "response_format"):
            schema = body.get(f)
            if schema is not None:
                n += _schema(schema)
        prediction = body.get("prediction")
        if isinstance(prediction, dict):  # rejected predicted tokens are billed too
            n += _content(prediction.get("content"), image_tokens)
        return n
    src = body.get("prompt") if kind == "completions" else body.get("input")
    n = 0
    if isinstance(src, str):
        n = text_tokens(src)
    elif isinstance(src, list):
        for item in src:
            if isinstance(item, str):
                n += text_tokens(item)
            elif isinstance(item, int):  # a list of token ids
                n += 1
            elif isinstance(item, list):
                n += len(item)
    if kind == "completions" and isinstance(body.get("suffix"), str):
        n += text_tokens(body["suffix"])
    return max(1, n)


def budget_fields(body: dict[str, Any]) -> list[str]:
    """The completion-budget fields the caller sent (any value): every one is set to the hold."""
    return [f for f in BUDGET_FIELDS if f in body]


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    """The least budget the caller asked for in any of the fields (None: no valid one)."""
    asked = [v for f in BUDGET_FIELDS if isinstance(v := body.get(f), int) and not isinstance(v, bool) and v > 0]
    return min(asked) if asked else None


def choices(body: dict[str, Any]) -> int:
    """How many completions one call asks for (`n`, or `best_of` for legacy completions):
    each may spend the whole max_tokens, so the hold scales with it. Not capped: a caller
    asking for more than MAX_CHOICES is refused before anything is held (OpenAI.completions)."""
    out = 1
    for f in ("n", "best_of"):
        v = body.get(f)
        if isinstance(v, int) and not isinstance(v, bool) and v > out:
            out = v
    return out


def prompts(kind: str, body: dict[str, Any]) -> int:
    """How many prompts one call sends: legacy completions take a batch (a list of strings or
    of token lists), and each prompt gets its own `n` completions of up to max_tokens."""
    src = body.get("prompt")
    if kind == "completions" and isinstance(src, list) and src and not isinstance(src[0], int):
        return len(src)
    return 1


def usage_total(usage: Any) -> int | None:
    """total_tokens of an OpenAI `usage` object (or prompt + completion when total is missing)."""
    if not isinstance(usage, dict):
        return None
    t = usage.get("total_tokens")
    if isinstance(t, int) and t >= 0:
        return t
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(p, int) and isinstance(c, int):
        return p + c
    return None


class Refused(ValueError):
    """A body the metering cannot hold for (the sidecar answers 400 naming `field`)."""

    def __init__(self, detail: str, field: str) -> None:
        super().__init__(detail)
        self.field = field


class Metering:
    """How one upstream API is metered. The sidecar holds `prompt_tokens + budget × completions`
    before the call, writes the budget into the body, and charges the usage read after it."""

    name: ClassVar[str]
    endpoints: ClassVar[tuple[str, ...]]  # path suffixes metered; others are forwarded unmetered (reads)
    budget_fields: ClassVar[tuple[str, ...]]  # every field the upstream may read as the completion budget

    def __init__(self) -> None:
        self._endpoints: dict[str, str] = {}  # path -> endpoint(path), "" for none

    def endpoint(self, path: str) -> str | None:
        """Which metered endpoint a path is (None: not one). Remembered: a route's calls go to a
        few paths (bounded: paths are the caller's to choose)."""
        known = self._endpoints.get(path)
        if known is not None:
            return known or None
        p = path.rstrip("/")
        found = next((k for k in self.endpoints if p == k or p.endswith("/" + k)), "")
        if len(self._endpoints) >= 1024:
            self._endpoints.clear()
        self._endpoints[path] = found
        return found or None

    def budgeted(self, endpoint: str) -> bool:
        """Whether the endpoint produces completion tokens (embeddings do not)."""
        return True

    def prompt_tokens(self, endpoint: str, body: dict[str, Any], image_tokens: int) -> int:
        raise NotImplementedError

    def completions(self, endpoint: str, body: dict[str, Any]) -> int:
        """How many times one call may spend the whole budget; raises Refused when too many."""
        return 1

    def requested_budget(self, body: dict[str, Any]) -> int | None:
        """The least budget the caller asked for in any budget field (None: no valid one)."""
        least = None
        for f in self.budget_fields:
            v = body.get(f)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0 and (least is None or v < least):
                least = v
        return least

    def set_budget(self, body: dict[str, Any], budget: int, default_field: str) -> None:
        """Every budget field the caller sent is set to the hold (an upstream may read any one
        of them); with none sent, `default_field`. Always explicit: the upstream's own default
        could exceed the hold."""
        sent = False
        for f in self.budget_fields:
            if f in body:
                body[f] = budget
                sent = True
        if not sent:
            body[default_field] = budget

    def ask_for_usage(self, body: dict[str, Any]) -> bool:
        """Makes the answer carry usage; True when that adds an event the caller did not ask
        for (StreamMeter hides it)."""
        return False

    def usage_total(self, usage: Any) -> int | None:
        raise NotImplementedError

    def answer_total(self, answer: dict[str, Any]) -> int | None:
        """Tokens a JSON answer reports (None: no usage in it)."""
        return self.usage_total(answer.get("usage"))

    def answer_text(self, answer: dict[str, Any]) -> str:
        """The generated text of a JSON answer, for an estimate when it reports no usage."""
        return ""

    def event(self, obj: dict[str, Any], meter: StreamMeter) -> bool:
        """Reads one SSE event's JSON into `meter` (usage, output chunks); False drops it."""
        return True


class OpenAI(Metering):
    """OpenAI-compatible chat/completions, completions and embeddings."""

    name = "openai"
    endpoints = KINDS
    budget_fields = BUDGET_FIELDS

    def budgeted(self, endpoint: str) -> bool:
        return endpoint != "embeddings"

    def prompt_tokens(self, endpoint: str, body: dict[str, Any], image_tokens: int = IMAGE_TOKENS) -> int:
        return prompt_tokens(endpoint, body, image_tokens)

    def completions(self, endpoint: str, body: dict[str, Any]) -> int:
        per = choices(body)  # n completions may each spend the whole budget
        if per > MAX_CHOICES:
            raise Refused(f"n: at most {MAX_CHOICES} completions per call", "n")
        return per * prompts(endpoint, body)  # a batch of prompts: n completions each

    def ask_for_usage(self, body: dict[str, Any]) -> bool:
        if not body.get("stream"):
            return False  # a JSON answer always carries usage
        opts = body.get("stream_options")
        opts = dict(opts) if isinstance(opts, dict) else {}
        hide = not opts.get("include_usage")
        opts["include_usage"] = True
        body["stream_options"] = opts
        return hide

    def usage_total(self, usage: Any) -> int | None:
        return usage_total(usage)

    def answer_text(self, answer: dict[str, Any]) -> str:
        text = ""
        for ch in answer.get("choices") or []:
            if isinstance(ch, dict):
                msg = ch.get("message")
                text += (msg.get("content") or "") if isinstance(msg, dict) else (ch.get("text") or "")
        return text

    def event(self, obj: dict[str, Any], meter: StreamMeter) -> bool:
        chs = obj.get("choices")
        if isinstance(chs, list):
            for ch in chs:
                if isinstance(ch, dict) and self._has_output(ch):
                    meter.completion_chunks += 1
        usage = obj.get("usage")
        if isinstance(usage, dict):
            meter.usage = usage
            if meter.drop_usage_only and not chs:
                return False
        return True

    @staticmethod
    def _has_output(choice: dict[str, Any]) -> bool:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            return bool(delta.get("content") or delta.get("tool_calls") or delta.get("refusal"))
        return bool(choice.get("text"))


class Anthropic(Metering):
    """Anthropic's Messages API (`/v1/messages`): `max_tokens`, a `system` prompt, content
    blocks; usage as input + output tokens (cache reads and writes are input too), in the
    answer or split over `message_start` (input) and `message_delta` (output so far)."""

    name = "anthropic"
    endpoints = ("messages",)
    budget_fields = ("max_tokens",)
    USAGE_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")

    def prompt_tokens(self, endpoint: str, body: dict[str, Any], image_tokens: int = IMAGE_TOKENS) -> int:
        n = PER_REPLY + _content(body.get("system"), image_tokens)
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                n += PER_MESSAGE + _content(m.get("content"), image_tokens)
        return n + _schema(body.get("tools"))

    def set_budget(self, body: dict[str, Any], budget: int, default_field: str) -> None:
        body["max_tokens"] = budget  # the API's one budget field (and required)

    def usage_total(self, usage: Any) -> int | None:
        if not isinstance(usage, dict) or not isinstance(usage.get("output_tokens"), int):
            return None
        return sum(v for f in self.USAGE_FIELDS if isinstance(v := usage.get(f), int) and v >= 0)

    def answer_text(self, answer: dict[str, Any]) -> str:
        return "".join(b.get("text") or "" for b in answer.get("content") or [] if isinstance(b, dict))

    def event(self, obj: dict[str, Any], meter: StreamMeter) -> bool:
        kind = obj.get("type")
        if kind == "message_start" and isinstance(obj.get("message"), dict):
            usage = obj["message"].get("usage")
            if isinstance(usage, dict):
                meter.usage = {**(meter.usage or {}), **usage}
        elif kind == "message_delta" and isinstance(obj.get("usage"), dict):
            meter.usage = {**(meter.usage or {}), **obj["usage"]}  # output_tokens: the total so far
        elif kind == "content_block_delta" and isinstance(obj.get("delta"), dict):
            d = obj["delta"]
            if d.get("text") or d.get("partial_json") or d.get("thinking"):
                meter.completion_chunks += 1
        return True


OPENAI = OpenAI()
METERINGS: dict[str, Metering] = {m.name: m for m in (OPENAI, Anthropic())}


@dataclass
class StreamMeter:
    """Splits an SSE byte stream into events and lets the API's Metering read each one for
    usage, without buffering more than one incomplete event. `drop_usage_only` hides the
    usage-only event the gateway asked for on the caller's behalf (a caller that did not ask
    may index choices[0])."""

    drop_usage_only: bool = False
    api: Metering = OPENAI
    usage: dict[str, Any] | None = None
    completion_chunks: int = 0
    done: bool = False
    _buf: bytes = b""

    def feed(self, chunk: bytes) -> bytes:
        """Returns the bytes to forward now (whole events only)."""
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            return self._feed_crlf(buf)
        # LF only (what servers send): one split finds every event boundary. (Looking for
        # either boundary from each event on scanned the whole rest of the buffer per event.)
        events = buf.split(b"\n\n")
        self._buf = events.pop()  # after the last boundary: incomplete (b"" when none)
        if not events:
            return b""
        kept = [e for e in events if self._keep(e)]
        if len(kept) == len(events):  # nothing hidden: the bytes as they came, uncopied
            return buf[:len(buf) - len(self._buf)] if self._buf else buf
        return b"".join(e + b"\n\n" for e in kept)

    def _feed_crlf(self, buf: bytes) -> bytes:
        """feed() for a buffer with CR in it: an event ends at the first blank line, LF or CRLF."""
        out = []
        while True:
            a, b = buf.find(b"\n\n"), buf.find(b"\r\n\r\n")
            i = b if a < 0 else a if b < 0 else min(a, b)
            if i < 0:
                break
            end = i + (4 if i == b else 2)
            event, buf = buf[:end], buf[end:]
            if self._keep(event):
                out.append(event)
        self._buf = buf
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        if rest and self._keep(rest):
            return rest
        return b""

    def total(self) -> int | None:
        return self.api.usage_total(self.usage)

    def _keep(self, event: bytes) -> bool:
        if event.startswith(b"data:") and b"\n" not in event.rstrip(b"\r\n"):  # one data line: most events
            data = event[5:].strip()
        else:
            data = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
        if not data:
            return True
        if data == b"[DONE]":
            self.done = True
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict):
            return True
        return self.api.event(obj, self)


SSEMeter = StreamMeter  # the name the OpenAI-only meter had
