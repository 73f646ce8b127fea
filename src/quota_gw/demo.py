"""An OpenAI-compatible fake model: the upstream of `quota-gw dev`, the tests and load tests.

It answers chat completions (streamed or not), legacy completions and embeddings with
realistic `usage`, always spending the whole completion budget (`max_tokens`, default 64):
the worst case for a quota, and an exact number for tests. Any other path answers a small
JSON echo, so fixed-cost routes have something to forward to.

Per-request control headers (they pass through the gateway like any other header):
`X-Demo-Status: 503` answer that status; `X-Demo-Latency-Ms` wait before answering;
`X-Demo-Token-Delay-Ms` pace streamed tokens; `X-Demo-Drop-After: N` cut the connection
after N streamed tokens; `X-Demo-Hang: 1` never answer (timeouts); `X-Demo-Prompt-Tokens: N`
report N prompt tokens (an upstream whose tokenizer counts more than the gateway's estimate).

It spends the largest budget field it is sent (`max_tokens`, `max_completion_tokens`,
`max_output_tokens`): the worst of the upstreams that read only one of them.

`require_key` (`quota-gw demo-upstream --require-key KEY`, or $QUOTA_GW_DEMO_KEY) answers
every call without `Authorization: Bearer KEY` with OpenAI's 401, like a real provider.
What each call carried (headers included) is kept in `Stats.requests` for tests.
"""

from __future__ import annotations

import asyncio
import hmac
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import metering

WORDS = ("the quick brown fox jumps over a lazy dog while quota gateways count every token "
         "that flows through them with care").split()
DEFAULT_TOKENS = 64
MAX_TOKENS = 16384


@dataclass
class Stats:
    """What the fake saw, for tests and for a curious developer."""

    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))
    count: int = 0
    active_streams: int = 0
    completed_streams: int = 0
    aborted_streams: int = 0
    tokens_sent: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def touch(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait_for(self, cond: Any, timeout: float = 10.0) -> None:
        """Waits until cond(self) holds (re-checked whenever the stats change)."""
        async with asyncio.timeout(timeout):
            while not cond(self):
                await self.changed.wait()


class _Dropped(Exception):
    """Raised inside a stream to cut the connection like a crashed model server would."""


def _completion_words(n: int, offset: int = 0) -> list[str]:
    return [" " + WORDS[(offset + i) % len(WORDS)] for i in range(n)]


class Demo:
    def __init__(self, latency_ms: float = 0, fail_rate: float = 0.0, token_delay_ms: float = 0,
                 seed: int | None = None, require_key: str | None = None) -> None:
        self.latency_ms, self.fail_rate, self.token_delay_ms = latency_ms, fail_rate, token_delay_ms
        self.require_key = require_key or None
        self.rng = random.Random(seed)
        self.stats = Stats()

    # -- plumbing

    async def _record(self, request: Request) -> tuple[dict[str, Any], Response | None]:
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw.decode(errors="replace")
        self.stats.count += 1
        self.stats.requests.append({"method": request.method, "path": request.url.path,
                                    "query": request.url.query, "headers": dict(request.headers),
                                    "body": body, "at": time.monotonic()})
        self.stats.touch()
        h = request.headers
        if self.require_key is not None:
            refused = self._check_key(h.get("authorization"))
            if refused is not None:
                return {}, refused
        delay = float(h.get("x-demo-latency-ms", self.latency_ms))
        if delay:
            await asyncio.sleep(delay / 1000)
        if h.get("x-demo-hang"):  # until the caller gives up
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
        status = h.get("x-demo-status")
        if status is None and self.fail_rate and self.rng.random() < self.fail_rate:
            status = "500"
        if status is not None and int(status) >= 400:
            err = {"error": {"message": f"demo upstream failure ({status})", "type": "server_error", "code": None}}
            return {}, Response(orjson.dumps(err), int(status), media_type="application/json")
        return body if isinstance(body, dict) else {}, None

    def _check_key(self, auth: str | None) -> Response | None:
        """OpenAI's 401 (its error shape and codes) unless the call carries the key."""
        assert self.require_key is not None
        scheme, _, given = (auth or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.require_key.encode()):
            return None
        msg = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
               "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)." if not auth else "Incorrect API key provided.")
        err = {"error": {"message": msg, "type": "invalid_request_error", "param": None,
                         "code": None if not auth else "invalid_api_key"}}
        return Response(orjson.dumps(err), 401, media_type="application/json")

    def _budget(self, body: dict[str, Any]) -> int:
        sent = [v for f in metering.BUDGET_FIELDS
                if isinstance(v := body.get(f), int) and not isinstance(v, bool) and v > 0]
        return min(max(sent) if sent else DEFAULT_TOKENS, MAX_TOKENS)

    # -- endpoints

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "chat/completions")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "completions")

    async def _complete(self, request: Request, kind: str) -> Response:
        body, failed = await self._record(request)
        if failed:
            return failed
        prompt = metering.prompt_tokens(kind, body)
        if request.headers.get("x-demo-prompt-tokens"):
            prompt = int(request.headers["x-demo-prompt-tokens"])
        n = self._budget(body)
        model = body.get("model") or "demo-1"
        cid = ("chatcmpl-" if kind == "chat/completions" else "cmpl-") + uuid.uuid4().hex[:24]
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            gen = self._stream(request, kind, cid, model, n, usage, bool(opts.get("include_usage")))
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = "".join(_completion_words(n))
        self.stats.tokens_sent += n
        if kind == "chat/completions":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
            obj = "text_completion"
        return Response(orjson.dumps({"id": cid, "object": obj, "created": int(time.time()), "model": model,
                                      "choices": [choice], "usage": usage}), media_type="application/json")

    async def _stream(self, request: Request, kind: str, cid: str, model: str, n: int, usage: dict[str, Any],
                      include_usage: bool) -> AsyncIterator[bytes]:
        h = request.headers
        pace = float(h.get("x-demo-token-delay-ms", self.token_delay_ms)) / 1000
        drop_after = int(h.get("x-demo-drop-after", -1))
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat/completions" else "text_completion"

        def event(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> bytes:
            chunk = {"id": cid, "object": obj, "created": created, "model": model, "choices": choices}
            if include_usage:
                chunk["usage"] = None
            chunk.update(extra or {})
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        def piece(word: str | None, finish: str | None = None) -> dict[str, Any]:
            if kind == "chat/completions":
                delta = {} if word is None else {"content": word}
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": word or "", "finish_reason": finish, "logprobs": None}

        self.stats.active_streams += 1
        self.stats.touch()
        finished = False
        try:
            if kind == "chat/completions":
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for i, word in enumerate(_completion_words(n)):
                if i == drop_after:
                    raise _Dropped(f"dropped after {i} tokens")
                if pace:
                    await asyncio.sleep(pace)
                yield event([piece(word)])
                self.stats.tokens_sent += 1
            yield event([piece(None, "length")])
            if include_usage:
                yield event([], {"usage": usage})
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            self.stats.active_streams -= 1
            if finished:
                self.stats.completed_streams += 1
            else:
                self.stats.aborted_streams += 1
            self.stats.touch()

    async def embeddings(self, request: Request) -> Response:
        body, failed = await self._record(request)
        if failed:
            return failed
        src = body.get("input")
        items = src if isinstance(src, list) and src and not isinstance(src[0], int) else [src]
        n = metering.prompt_tokens("embeddings", body)
        data = [{"object": "embedding", "index": i, "embedding": [round(self.rng.uniform(-1, 1), 6) for _ in range(8)]}
                for i in range(len(items))]
        return Response(orjson.dumps({"object": "list", "data": data, "model": body.get("model") or "demo-embed",
                                      "usage": {"prompt_tokens": n, "total_tokens": n}}),
                        media_type="application/json")

    MODELS = ("demo-1", "demo-embed")

    @staticmethod
    def _model(mid: str) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": 1700000000, "owned_by": "quota-gw"}

    async def models(self, request: Request) -> Response:
        """GET /v1/models (and /v1/models/{id}) in OpenAI's shape: what clients list at start."""
        _, failed = await self._record(request)
        if failed:
            return failed
        mid = request.path_params.get("model")
        if mid is None:
            return Response(orjson.dumps({"object": "list", "data": [self._model(m) for m in self.MODELS]}),
                            media_type="application/json")
        if mid not in self.MODELS:
            err = {"error": {"message": f"The model '{mid}' does not exist", "type": "invalid_request_error",
                             "param": "model", "code": "model_not_found"}}
            return Response(orjson.dumps(err), 404, media_type="application/json")
        return Response(orjson.dumps(self._model(mid)), media_type="application/json")

    async def echo(self, request: Request) -> Response:
        body, failed = await self._record(request)
        if failed:
            return failed
        return Response(orjson.dumps({"ok": True, "method": request.method, "path": request.url.path,
                                      "query": request.url.query}), media_type="application/json")


def create_demo_app(latency_ms: float = 0, fail_rate: float = 0.0, token_delay_ms: float = 0,
                    seed: int | None = None, require_key: str | None = None) -> Starlette:
    demo = Demo(latency_ms, fail_rate, token_delay_ms, seed, require_key)
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    app = Starlette(routes=[
        Route("/v1/chat/completions", demo.chat, methods=["POST"]),
        Route("/v1/completions", demo.completions, methods=["POST"]),
        Route("/v1/embeddings", demo.embeddings, methods=["POST"]),
        Route("/v1/models", demo.models, methods=["GET"]),
        Route("/v1/models/{model:path}", demo.models, methods=["GET"]),
        Route("/{path:path}", demo.echo, methods=methods),
    ])
    app.state.demo = demo
    return app
