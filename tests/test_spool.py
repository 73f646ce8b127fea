"""The fail-open spool on its own: durable lines, replay once, no rate limits on the past,
torn lines, files still being written, and LLM metering helpers it relies on."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import orjson

from quota_gw import metering
from quota_gw.decisions import Identity
from quota_gw.spool import Spool, entry


async def ident_of(app, h: dict[str, str]) -> Identity:
    return await app.state.ctx.keys.resolve(h["Authorization"].removeprefix("Bearer "))


async def general(client, h) -> int:
    return (await client.get("/v1/balance", headers=h)).json()["meters"]["general"]["balance"]


async def test_replay_ignores_rate_limits_and_lands_each_entry_once(tmp_path: Path, app, client, tenant):
    org, h = await tenant("pro")  # pro: 5 calls a minute per user, general: 50
    ident = await ident_of(app, h)
    spool = Spool(tmp_path)
    for _ in range(8):
        await spool.append(entry("consume", ident, user="alice", feature="generate_insight", units=1))
    assert spool.pending() == 8
    raw = b"".join(f.read_bytes() for f in spool.files())
    decider = app.state.ctx.decider
    assert await spool.replay(decider) == 8 and spool.refused == 0
    assert await general(client, h) == 42
    # a replayer that died before deleting its file: the same lines again change nothing
    (tmp_path / "spool-0-0.jsonl").write_bytes(raw + b'{"v":1,"id":"torn')
    assert await spool.replay(decider) == 8
    assert await general(client, h) == 42 and not spool.files()
    # the live rate limit is untouched by the replay
    r = await client.post("/v1/consume", json={"feature": "generate_insight", "user_id": "alice"}, headers=h)
    assert r.status_code == 200


async def test_a_file_someone_still_writes_is_left_alone(tmp_path: Path, app, tenant):
    org, h = await tenant("pro")
    ident = await ident_of(app, h)
    line = orjson.dumps(entry("consume", ident, user="", feature="generate_insight", units=1)) + b"\n"
    busy = tmp_path / "spool-1-1.jsonl"
    busy.write_bytes(line)
    fd = os.open(busy, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another process's writer holds it
    try:
        assert await Spool(tmp_path).replay(app.state.ctx.decider) == 0
        assert busy.exists()
    finally:
        os.close(fd)
    assert await Spool(tmp_path).replay(app.state.ctx.decider) == 1 and not busy.exists()


async def test_commit_of_a_lost_hold_becomes_a_consume_and_refunds_replay(tmp_path: Path, app, client, tenant):
    org, h = await tenant("pro")
    ident = await ident_of(app, h)
    decider = app.state.ctx.decider
    spool = Spool(tmp_path)
    d = await decider.consume(ident, "generate_insight", 2, "")
    await spool.append(entry("commit", ident, user="", feature="generate_insight", rid="0" * 32, units=5))
    await spool.append(entry("refund", ident, event_id=d.event_id))
    assert await spool.replay(decider) == 2
    assert await general(client, h) == 50 - 5


def test_prompt_estimates_and_budget_fields():
    chat = {"messages": [{"role": "system", "content": "x" * 40}, {"role": "user", "content": [
        {"type": "text", "text": "y" * 9}, {"type": "image_url", "image_url": {"url": "http://i"}}]}]}
    # an image part is held at its bound (metering.IMAGE_TOKENS), not left out
    assert metering.prompt_tokens("chat/completions", chat) == 3 + (4 + 10) + (4 + 3 + metering.IMAGE_TOKENS)
    assert metering.prompt_tokens("completions", {"prompt": ["abcd", "abcde"]}) == 1 + 2
    assert metering.prompt_tokens("embeddings", {"input": [[1, 2, 3], [4]]}) == 4
    assert metering.text_tokens("配额网关 ok!") == 4 + 1  # one per CJK character, ⌈4 / 4⌉ for " ok!"
    assert metering.kind_of("/openai/v1/chat/completions") == "chat/completions"
    assert metering.kind_of("/v1/completions/") == "completions" and metering.kind_of("/v1/models") is None
    assert metering.budget_fields({"max_completion_tokens": 5, "n": 2}) == ["max_completion_tokens"]
    assert metering.requested_max_tokens({"max_completion_tokens": 20, "max_tokens": 4000}) == 20
    assert metering.requested_max_tokens({"max_tokens": True}) is None
    assert metering.usage_total({"prompt_tokens": 3, "completion_tokens": 4}) == 7


def test_sse_meter_splits_events_across_chunks_and_hides_the_usage_only_chunk():
    events = [
        b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\r\n\r\n',
        b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n',
        b': keep-alive comment\n\n',
        b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n',
        b"data: [DONE]\n\n",
    ]
    stream = b"".join(events)
    m = metering.SSEMeter(drop_usage_only=True)
    out = b"".join(m.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)) + m.flush()
    assert out == b"".join(e for i, e in enumerate(events) if i != 4)
    assert m.usage["total_tokens"] == 7 and m.completion_chunks == 2 and m.done
    keep = metering.SSEMeter()
    assert keep.feed(stream) == stream
