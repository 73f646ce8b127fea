"""LLM usage metering for OpenAI-compatible bodies: estimate before, measure after.

The gateway holds, before the call, everything the upstream may bill — every part of every
message, tool and function schemas, images, and the completion budget times the number of
completions — and charges what the upstream reports after it, beyond the hold too as far as
the balance allows (lua/commit.lua). The estimate is an estimate (1 token ≈ 4 characters plus
OpenAI's per-message framing; an image at a fixed bound); the upstream's usage decides the
charge, so a prompt hidden where the estimate is low is still paid for. Both sides live here
so the proxy and the demo upstream count tokens the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
                n += PER_MESSAGE + _content(m.get("content"), image_tokens)
                n += _strings({k: v for k, v in m.items() if k not in ("role", "content")})
        for f in ("tools", "functions", "response_format"):
            n += _schema(body.get(f))
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
    asking for more than MAX_CHOICES is refused before anything is held (proxy.py)."""
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
    """total_tokens of a `usage` object (or prompt + completion when total is missing)."""
    if not isinstance(usage, dict):
        return None
    t = usage.get("total_tokens")
    if isinstance(t, int) and t >= 0:
        return t
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(p, int) and isinstance(c, int):
        return p + c
    return None


@dataclass
class SSEMeter:
    """Splits an SSE byte stream into events and watches them for usage, without buffering
    more than one incomplete event. `drop_usage_only` hides the usage-only chunk the gateway
    asked for on the caller's behalf (a caller that did not ask may index choices[0])."""

    drop_usage_only: bool = False
    usage: dict[str, Any] | None = None
    completion_chunks: int = 0
    done: bool = False
    _buf: bytes = b""
    _events: list[bytes] = field(default_factory=list)

    def feed(self, chunk: bytes) -> bytes:
        """Returns the bytes to forward now (whole events only)."""
        self._buf += chunk
        out = []
        while True:
            i = self._find_end(self._buf)
            if i < 0:
                break
            end = i + (4 if self._buf[i:i + 4] == b"\r\n\r\n" else 2)
            event, self._buf = self._buf[:end], self._buf[end:]
            if self._keep(event):
                out.append(event)
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        if rest and self._keep(rest):
            return rest
        return b""

    @staticmethod
    def _find_end(buf: bytes) -> int:
        a, b = buf.find(b"\n\n"), buf.find(b"\r\n\r\n")
        if a < 0:
            return b
        if b < 0:
            return a
        return min(a, b)

    def _keep(self, event: bytes) -> bool:
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
        choices = obj.get("choices")
        if isinstance(choices, list):
            for ch in choices:
                if isinstance(ch, dict) and self._has_output(ch):
                    self.completion_chunks += 1
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            if self.drop_usage_only and not choices:
                return False
        return True

    @staticmethod
    def _has_output(choice: dict[str, Any]) -> bool:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            return bool(delta.get("content") or delta.get("tool_calls") or delta.get("refusal"))
        return bool(choice.get("text"))
