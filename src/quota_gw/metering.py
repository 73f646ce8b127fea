"""LLM usage metering for OpenAI-compatible bodies: estimate before, measure after.

The gateway must hold enough before the call to never overspend, and charge what the
upstream reports after it. Both sides live here so the proxy and the demo upstream count
tokens the same way (1 token ≈ 4 characters, plus OpenAI's per-message framing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

PER_MESSAGE = 4  # chat framing tokens per message (role, separators)
PER_REPLY = 3  # tokens that prime the assistant's reply

KINDS = ("chat/completions", "completions", "embeddings")


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


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: count the text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_tokens(kind: str, body: dict[str, Any]) -> int:
    """Estimated prompt tokens of a request body (an integer, never below 1)."""
    if kind == "chat/completions":
        n = PER_REPLY
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                n += PER_MESSAGE + text_tokens(_content_text(m.get("content"))) + text_tokens(str(m.get("name") or ""))
        return n
    src = body.get("prompt") if kind == "completions" else body.get("input")
    if isinstance(src, str):
        return max(1, text_tokens(src))
    if isinstance(src, list):
        n = 0
        for item in src:
            if isinstance(item, str):
                n += text_tokens(item)
            elif isinstance(item, int):  # a list of token ids
                n += 1
            elif isinstance(item, list):
                n += len(item)
        return max(1, n)
    return 1


def max_tokens_field(body: dict[str, Any]) -> str:
    """The field the caller used for its completion budget (newer clients: max_completion_tokens)."""
    return "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    v = body.get(max_tokens_field(body))
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def choices(body: dict[str, Any]) -> int:
    """How many completions one call asks for (`n`, or `best_of` for legacy completions):
    each may spend the whole max_tokens, so the hold scales with it."""
    out = 1
    for f in ("n", "best_of"):
        v = body.get(f)
        if isinstance(v, int) and not isinstance(v, bool) and v > out:
            out = v
    return min(out, 128)


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
