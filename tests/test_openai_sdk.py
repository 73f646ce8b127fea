"""The official `openai` package pointed at the gateway (`base_url=…/v1`, the quota-gw key as
`api_key`), with the shipped example config's routes in front of the demo upstream: chat
(whole and streamed), embeddings and the model list work as the SDK expects, each call is
charged exactly the usage the upstream reported, and a bad key is the SDK's own
AuthenticationError. Clients are what users run, so they are tested as they are."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from conftest import test_config_data
from quota_gw import config as config_mod
from quota_gw.app import create_app
from quota_gw.demo import create_demo_app
from quota_gw.dev import serve

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
async def base_url(redis_url: str, database_url: str, prefix: str) -> AsyncIterator[str]:
    demo = create_demo_app()
    async with serve(demo, lifespan="off") as up:
        example = yaml.safe_load((ROOT / "examples" / "quota-gw.yaml").read_text())
        data = test_config_data()
        data["routes"] = [{**r, "upstream": r["upstream"].replace("127.0.0.1:9100", f"127.0.0.1:{up.port}")}
                          for r in example["routes"]]
        app = create_app(config_mod.parse(data), redis_url, database_url, prefix)
        async with serve(app) as gw:
            yield f"http://127.0.0.1:{gw.port}"


async def tokens(sdk: openai.AsyncOpenAI) -> int:
    """The org's `tokens` balance, through the gateway's own API with the same key."""
    r = await sdk._client.get(f"{str(sdk.base_url).rstrip('/')}/balance",
                              headers={"Authorization": f"Bearer {sdk.api_key}"})
    meter: dict[str, Any] = r.json()["meters"]["tokens"]
    assert meter["held"] == 0, "a hold was left behind"
    return int(meter["balance"])


async def test_the_openai_sdk_through_the_gateway_is_charged_exactly_the_usage(base_url, tenant):
    _, h = await tenant("bulk")
    sdk = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=h["Authorization"][7:], max_retries=0)
    try:
        models = await sdk.models.list()
        assert [m.id for m in models.data], "the model list is forwarded (unmetered)"
        before = await tokens(sdk)
        assert await tokens(sdk) == before  # listing models is not charged

        reply = await sdk.chat.completions.create(
            model="demo-1", max_tokens=20, messages=[{"role": "user", "content": "Say something about quotas."}])
        assert reply.choices[0].message.content and reply.usage is not None
        after_chat = await tokens(sdk)
        assert before - after_chat == reply.usage.total_tokens

        stream = await sdk.chat.completions.create(
            model="demo-1", max_tokens=12, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Count to five."}])
        usage = None
        text = ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert text and usage is not None
        after_stream = await tokens(sdk)
        assert after_chat - after_stream == usage.total_tokens

        emb = await sdk.embeddings.create(model="demo-embed", input="quota gateways")
        assert emb.data[0].embedding and emb.usage.total_tokens > 0
        assert after_stream - await tokens(sdk) == emb.usage.total_tokens
    finally:
        await sdk.close()


async def test_a_stream_without_include_usage_is_charged_and_hides_the_usage_chunk(base_url, tenant):
    """The gateway asks the upstream for usage itself; a caller that did not ask never sees it."""
    _, h = await tenant("bulk")
    sdk = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=h["Authorization"][7:], max_retries=0)
    try:
        before = await tokens(sdk)
        stream = await sdk.chat.completions.create(
            model="demo-1", max_tokens=8, stream=True, messages=[{"role": "user", "content": "Hi"}])
        chunks = [c async for c in stream]
        assert chunks and all(c.usage is None for c in chunks)
        assert before - await tokens(sdk) > 8  # prompt and completion were both charged
    finally:
        await sdk.close()


async def test_a_bad_key_is_the_sdks_authentication_error(base_url):
    sdk = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="qgw_not-a-key", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            await sdk.chat.completions.create(model="demo-1", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()
    finally:
        await sdk.close()
