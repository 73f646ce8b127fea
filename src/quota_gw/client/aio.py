"""The asyncio client (httpx.AsyncClient): `AsyncQuotaClient` and `AsyncAdminClient`, the same
calls as sync.py with `await`. What each call sends and how it is retried is in _core.py."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx

from . import _core, models
from ._core import Call, RetryPolicy

F = TypeVar("F", bound=Callable[..., Any])


class _AsyncBase:
    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0, retry: RetryPolicy | None = None,
                 http: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._own = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._headers = {"Authorization": f"Bearer {token}", "User-Agent": _core.USER_AGENT}

    async def _call(self, call: Call) -> Any:
        attempts = _core.Attempts(self.retry, call)
        while True:
            try:
                r = await self._http.request(call.method, self.base_url + call.path, json=call.json,
                                             params=call.params, headers={**self._headers, **call.headers})
            except httpx.TransportError as e:
                await asyncio.sleep(attempts.after_error(e))
                continue
            delay = attempts.after_response(r)
            if delay is None:
                return _core.finish(call, r)
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def __aenter__(self: Any) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class AsyncReservation:
    """A hold from `AsyncQuotaClient.reserve`, used as `async with await client.reserve(...) as r:`
    or `async with client.reserve(...) as r:`; settles as sync.Reservation does."""

    def __init__(self, client: AsyncQuotaClient, hold: _core.Hold, units: int) -> None:
        self._client = client
        self.reservation_id, self.held, self.expires_at = hold.reservation_id, hold.held, hold.expires_at
        self.remaining = hold.remaining
        self.reserved_units = units
        self.units = units
        self.settled: models.Committed | models.Released | None = None

    async def commit(self, units: int | None = None, metadata: dict[str, Any] | None = None) -> models.Committed:
        res = await self._client._call(_core.commit(self.reservation_id, self.units if units is None else units,
                                                    metadata))
        self.settled = res
        return res

    async def release(self) -> models.Released:
        res = await self._client._call(_core.release(self.reservation_id))
        self.settled = res
        return res

    async def __aenter__(self) -> AsyncReservation:
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.settled is not None:
            return
        if exc is None:
            await self.commit()
            return
        try:
            await self.release()
        except Exception as e:  # noqa: BLE001 - the block's exception is the one to see; an unreleased hold expires
            exc.add_note(f"quota-gw: releasing reservation {self.reservation_id} failed: {e!r}")


class _PendingReservation:
    """What `AsyncQuotaClient.reserve()` returns: awaitable (the reservation) and an async context
    manager (reserves on enter), so both spellings work."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._res: AsyncReservation | None = None

    def __await__(self) -> Any:
        return self._make().__await__()

    async def __aenter__(self) -> AsyncReservation:
        self._res = await self._make()
        return self._res

    async def __aexit__(self, *exc: Any) -> None:
        assert self._res is not None
        await self._res.__aexit__(*exc)


class AsyncQuotaClient(_AsyncBase):
    """Decisions and account reads with one API key; see QuotaClient for each call."""

    async def consume(self, feature: str, units: int = 1, *, user_id: str | None = None,
                      metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
                      wait: bool = False) -> models.Consumed:
        return await self._call(_core.consume(feature, units, user_id, metadata, idempotency_key, wait))

    async def check(self, feature: str, units: int = 1, *, user_id: str | None = None) -> models.CheckResult:
        return await self._call(_core.check(feature, units, user_id))

    def reserve(self, feature: str, units: int, *, user_id: str | None = None, ttl_s: int | None = None,
                idempotency_key: str | None = None, wait: bool = False) -> _PendingReservation:
        async def make() -> AsyncReservation:
            hold = await self._call(_core.reserve(feature, units, user_id, ttl_s, idempotency_key, wait))
            return AsyncReservation(self, hold, units)

        return _PendingReservation(make)

    async def commit(self, reservation_id: str, units: int,
                     metadata: dict[str, Any] | None = None) -> models.Committed:
        return await self._call(_core.commit(reservation_id, units, metadata))

    async def release(self, reservation_id: str) -> models.Released:
        return await self._call(_core.release(reservation_id))

    async def refund(self, event_id: str, metadata: dict[str, Any] | None = None) -> models.Refunded:
        return await self._call(_core.refund(event_id, metadata))

    async def balance(self) -> models.Balance:
        return await self._call(_core.balance())

    async def usage_page(self, cursor: str | None = None, *, limit: int = 100, **filters: Any) -> models.Page:
        return await self._call(_core.usage_page(cursor, limit, **filters))

    async def usage(self, *, page_size: int = 100, **filters: Any) -> AsyncIterator[models.UsageEvent]:
        cursor = None
        while True:
            page = await self.usage_page(cursor, limit=page_size, **filters)
            for e in page.items:
                yield e
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def pricing(self) -> dict[str, Any]:
        return await self._call(_core.pricing())

    async def analytics(self, days: int = 30) -> dict[str, Any]:
        return await self._call(_core.analytics(days))

    async def purchases(self) -> list[models.Purchase]:
        return await self._call(_core.purchases())

    async def purchase(self, pack: str) -> models.Purchase:
        return await self._call(_core.purchase(pack))

    def charge(self, feature: str, *, units: Any = 1, user: Any = None, metadata: Any = None,
               refund_on_error: bool | tuple[type[BaseException], ...] = True) -> Callable[[F], F]:
        """Decorator for async functions; see QuotaClient.charge."""
        catch = _core.refund_on(refund_on_error)

        def wrap(fn: F) -> F:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"{fn.__qualname__} is not async: decorate it with QuotaClient.charge")

            @functools.wraps(fn)
            async def charged(*args: Any, **kwargs: Any) -> Any:
                c = await self.consume(feature, _core.resolve(units, args, kwargs),
                                       user_id=_core.resolve(user, args, kwargs),
                                       metadata=_core.resolve(metadata, args, kwargs))
                try:
                    return await fn(*args, **kwargs)
                except catch as e:
                    try:
                        await self.refund(c.event_id)
                    except Exception as re:  # noqa: BLE001 - the function's error is the one to raise
                        e.add_note(f"quota-gw: refunding {c.event_id} failed: {re!r}")
                    raise

            return charged  # type: ignore[return-value]

        return wrap


class AsyncAdminClient(_AsyncBase):
    """The operator API with the admin token; see AdminClient for each call."""

    async def create_org(self, org_id: str, plan: str | None = None, name: str | None = None) -> models.Org:
        return await self._call(_core.create_org(org_id, plan, name))

    async def orgs_page(self, cursor: str | None = None, *, limit: int = 100, low: bool = False) -> models.Page:
        return await self._call(_core.orgs_page(cursor, limit, low))

    async def orgs(self, *, page_size: int = 100, low: bool = False) -> AsyncIterator[models.Org]:
        cursor = None
        while True:
            page = await self.orgs_page(cursor, limit=page_size, low=low)
            for o in page.items:
                yield o
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def set_plan(self, org_id: str, plan: str) -> models.Org:
        return await self._call(_core.set_plan(org_id, plan))

    async def entitlements(self, org_id: str) -> dict[str, Any]:
        """The org's entitlements (its override of the plan's layers) and the layers in effect."""
        return await self._call(_core.entitlements(org_id))

    async def set_entitlements(self, org_id: str, override: dict[str, Any]) -> dict[str, Any]:
        """Replaces the org's override of its plan's layers (`{}` removes it)."""
        return await self._call(_core.set_entitlements(org_id, override))

    async def add_user(self, org_id: str, user_id: str, team: str | None = None) -> models.User:
        return await self._call(_core.add_user(org_id, user_id, team))

    async def create_key(self, org_id: str, scopes: list[str] | None = None,
                         user_id: str | None = None) -> models.NewKey:
        return await self._call(_core.create_key(org_id, scopes, user_id))

    async def keys(self, org_id: str) -> list[models.KeyInfo]:
        return await self._call(_core.list_keys(org_id))

    async def revoke_key(self, key_id: str) -> None:
        await self._call(_core.revoke_key(key_id))

    async def grant(self, org_id: str, meter: str, amount: int, reason: str,
                    idempotency_key: str | None = None) -> models.Grant:
        return await self._call(_core.grant(org_id, meter, amount, reason, idempotency_key))

    async def set_quota(self, org_id: str, meter: str, limit: int | None, *, user_id: str | None = None,
                        team: str | None = None) -> models.SubQuota:
        return await self._call(_core.set_quota(org_id, meter, limit, user_id, team))

    async def balance(self, org_id: str) -> models.Balance:
        return await self._call(_core.org_balance(org_id))

    async def top(self, days: int = 30, limit: int = 20, meter: str | None = None) -> list[models.TopSpender]:
        return await self._call(_core.top(days, limit, meter))

    async def worker(self) -> dict[str, Any]:
        return await self._call(_core.worker())
