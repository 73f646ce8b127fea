"""The blocking client (httpx.Client): `QuotaClient` for applications, `AdminClient` for operators.
What each call sends and how it is retried is in _core.py; this module only sends and sleeps."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx

from . import _core, models
from ._core import Call, RetryPolicy

F = TypeVar("F", bound=Callable[..., Any])


class _Base:
    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0, retry: RetryPolicy | None = None,
                 http: httpx.Client | None = None) -> None:
        """base_url: the gateway (http://127.0.0.1:8080); token: an API key, or the admin token for
        AdminClient; http: an httpx.Client of your own (hooks, proxies, TLS); you close it then."""
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._own = http is None
        self._http = http or httpx.Client(timeout=timeout)
        self._headers = {"Authorization": f"Bearer {token}", "User-Agent": _core.USER_AGENT}

    def _call(self, call: Call) -> Any:
        attempts = _core.Attempts(self.retry, call)
        while True:
            try:
                r = self._http.request(call.method, self.base_url + call.path, json=call.json, params=call.params,
                                       headers={**self._headers, **call.headers})
            except httpx.TransportError as e:
                time.sleep(attempts.after_error(e))
                continue
            delay = attempts.after_response(r)
            if delay is None:
                return _core.finish(call, r)
            time.sleep(delay)

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Reservation:
    """A hold from `QuotaClient.reserve`. In a `with` block: settle it yourself with `commit(units)` or
    `release()`, or set `units` (it starts at what was reserved) and leave the block: a normal exit
    commits `units`, an exception releases the whole hold and propagates."""

    def __init__(self, client: QuotaClient, hold: _core.Hold, units: int) -> None:
        self._client = client
        self.reservation_id, self.held, self.expires_at = hold.reservation_id, hold.held, hold.expires_at
        self.remaining = hold.remaining
        self.reserved_units = units
        self.units = units
        self.settled: models.Committed | models.Released | None = None

    def commit(self, units: int | None = None, metadata: dict[str, Any] | None = None) -> models.Committed:
        """Charge `units` (default: `self.units`) and give back the rest of the hold."""
        res = self._client._call(_core.commit(self.reservation_id, self.units if units is None else units, metadata))
        self.settled = res
        return res

    def release(self) -> models.Released:
        """Give back the whole hold; nothing is charged."""
        res = self._client._call(_core.release(self.reservation_id))
        self.settled = res
        return res

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.settled is not None:
            return
        if exc is None:
            self.commit()
            return
        try:
            self.release()
        except Exception as e:  # noqa: BLE001 - the block's exception is the one to see; an unreleased hold expires
            exc.add_note(f"quota-gw: releasing reservation {self.reservation_id} failed: {e!r}")


class QuotaClient(_Base):
    """Decisions and account reads with one API key (scopes `consume` and/or `read`)."""

    def consume(self, feature: str, units: int = 1, *, user_id: str | None = None,
                metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
                wait: bool = False) -> models.Consumed:
        """Charge `feature` x `units`. Raises InsufficientBalance, PlanForbids, RateLimited, ... and
        charges nothing then. Retries reuse one idempotency key (yours, or one made for this call)."""
        return self._call(_core.consume(feature, units, user_id, metadata, idempotency_key, wait))

    def check(self, feature: str, units: int = 1, *, user_id: str | None = None) -> models.CheckResult:
        """Would the call be allowed now? Changes nothing; a refusal is `allowed=False` with its `code`."""
        return self._call(_core.check(feature, units, user_id))

    def reserve(self, feature: str, units: int, *, user_id: str | None = None, ttl_s: int | None = None,
                idempotency_key: str | None = None, wait: bool = False) -> Reservation:
        """Hold the cost of `units` now, settle later (see Reservation). The hold is made here, so
        refusals (402, 403, 429) raise before the block runs."""
        hold = self._call(_core.reserve(feature, units, user_id, ttl_s, idempotency_key, wait))
        return Reservation(self, hold, units)

    def commit(self, reservation_id: str, units: int, metadata: dict[str, Any] | None = None) -> models.Committed:
        return self._call(_core.commit(reservation_id, units, metadata))

    def release(self, reservation_id: str) -> models.Released:
        return self._call(_core.release(reservation_id))

    def refund(self, event_id: str, metadata: dict[str, Any] | None = None) -> models.Refunded:
        """Put back what one consume or commit took; once per event (a repeat returns the first answer)."""
        return self._call(_core.refund(event_id, metadata))

    def balance(self) -> models.Balance:
        return self._call(_core.balance())

    def usage_page(self, cursor: str | None = None, *, limit: int = 100, **filters: Any) -> models.Page:
        """One page of GET /v1/usage. filters: since, until, feature, meter, kind, user_id."""
        return self._call(_core.usage_page(cursor, limit, **filters))

    def usage(self, *, page_size: int = 100, **filters: Any) -> Iterator[models.UsageEvent]:
        """Every event matching `filters`, newest first, following next_cursor page by page."""
        cursor = None
        while True:
            page = self.usage_page(cursor, limit=page_size, **filters)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def pricing(self) -> dict[str, Any]:
        return self._call(_core.pricing())

    def analytics(self, days: int = 30) -> dict[str, Any]:
        return self._call(_core.analytics(days))

    def purchases(self) -> list[models.Purchase]:
        """GET /v1/purchases: the org's purchases, newest first."""
        return self._call(_core.purchases())

    def purchase(self, pack: str) -> models.Purchase:
        """POST /v1/purchases {pack}: a Stripe checkout for a credit pack (Unavailable without Stripe)."""
        return self._call(_core.purchase(pack))

    def charge(self, feature: str, *, units: Any = 1, user: Any = None, metadata: Any = None,
               refund_on_error: bool | tuple[type[BaseException], ...] = True) -> Callable[[F], F]:
        """Decorator: consume `feature` before each call of the function; `units`, `user` and
        `metadata` are values or callables given the function's arguments. If the function raises
        (an Exception, or one of the given types), the charge is refunded and the exception
        propagates; a refused charge raises before the function runs."""
        catch = _core.refund_on(refund_on_error)

        def wrap(fn: F) -> F:
            if inspect.iscoroutinefunction(fn):
                raise TypeError(f"{fn.__qualname__} is async: decorate it with AsyncQuotaClient.charge")

            @functools.wraps(fn)
            def charged(*args: Any, **kwargs: Any) -> Any:
                c = self.consume(feature, _core.resolve(units, args, kwargs),
                                 user_id=_core.resolve(user, args, kwargs),
                                 metadata=_core.resolve(metadata, args, kwargs))
                try:
                    return fn(*args, **kwargs)
                except catch as e:
                    try:
                        self.refund(c.event_id)
                    except Exception as re:  # noqa: BLE001 - the function's error is the one to raise
                        e.add_note(f"quota-gw: refunding {c.event_id} failed: {re!r}")
                    raise

            return charged  # type: ignore[return-value]

        return wrap


class AdminClient(_Base):
    """The operator API (/v1/admin/*) with the admin token."""

    def create_org(self, org_id: str, plan: str | None = None, name: str | None = None) -> models.Org:
        return self._call(_core.create_org(org_id, plan, name))

    def orgs_page(self, cursor: str | None = None, *, limit: int = 100, low: bool = False) -> models.Page:
        return self._call(_core.orgs_page(cursor, limit, low))

    def orgs(self, *, page_size: int = 100, low: bool = False) -> Iterator[models.Org]:
        """Every org (only those low on a meter with low=True), page by page."""
        cursor = None
        while True:
            page = self.orgs_page(cursor, limit=page_size, low=low)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def set_plan(self, org_id: str, plan: str) -> models.Org:
        return self._call(_core.set_plan(org_id, plan))

    def entitlements(self, org_id: str) -> dict[str, Any]:
        """The org's entitlements (its override of the plan's layers) and the layers in effect."""
        return self._call(_core.entitlements(org_id))

    def set_entitlements(self, org_id: str, override: dict[str, Any]) -> dict[str, Any]:
        """Replaces the org's override of its plan's layers (`{}` removes it)."""
        return self._call(_core.set_entitlements(org_id, override))

    def add_user(self, org_id: str, user_id: str, team: str | None = None) -> models.User:
        return self._call(_core.add_user(org_id, user_id, team))

    def create_key(self, org_id: str, scopes: list[str] | None = None, user_id: str | None = None) -> models.NewKey:
        return self._call(_core.create_key(org_id, scopes, user_id))

    def keys(self, org_id: str) -> list[models.KeyInfo]:
        return self._call(_core.list_keys(org_id))

    def revoke_key(self, key_id: str) -> None:
        self._call(_core.revoke_key(key_id))

    def grant(self, org_id: str, meter: str, amount: int, reason: str,
              idempotency_key: str | None = None) -> models.Grant:
        return self._call(_core.grant(org_id, meter, amount, reason, idempotency_key))

    def set_quota(self, org_id: str, meter: str, limit: int | None, *, user_id: str | None = None,
                  team: str | None = None) -> models.SubQuota:
        """Cap a user or a team per meter per period; limit=None removes the cap."""
        return self._call(_core.set_quota(org_id, meter, limit, user_id, team))

    def balance(self, org_id: str) -> models.Balance:
        return self._call(_core.org_balance(org_id))

    def top(self, days: int = 30, limit: int = 20, meter: str | None = None) -> list[models.TopSpender]:
        return self._call(_core.top(days, limit, meter))

    def worker(self) -> dict[str, Any]:
        """GET /v1/admin/worker: the sync worker's state (served by newer gateways)."""
        return self._call(_core.worker())
