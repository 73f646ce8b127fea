"""Realistic traffic for quota-gw: many orgs and users, the seed's feature mix, a few heavy
spenders who run into 402 and 429, and streaming LLM calls through the proxy.

The decision-API users call through quota_gw.client (QuotaClient: sync httpx, which Locust's gevent
patching makes cooperative), or with QGW_VIA=http through Locust's own HTTP client; the LLM users
stream through the proxy with Locust's own HTTP client.

Run it with `loadtests/run.py` (starts everything, then checks the invariants); on its own it
needs QGW_TENANTS (a JSON file of {org_id, key, plan}) written by run.py.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid

from locust import FastHttpUser, User, between, constant_throughput, events, task

from quota_gw.client import QuotaClient, QuotaError

TENANTS = json.loads(open(os.environ["QGW_TENANTS"]).read()) if os.environ.get("QGW_TENANTS") else []
PROXY = os.environ.get("QGW_PROXY", "1") == "1"
# Decision-API users: through quota_gw.client (default), or Locust's C HTTP client ("http"). The client
# (httpx, pure Python) costs the load generator ~8x the CPU per call, so on a small machine Locust
# itself caps the request rate; "http" measures the gateway alone.
VIA = os.environ.get("QGW_VIA", "client")

# The seed catalogue, weighted as the origin systems' usage reports suggest.
FEATURES = [("generate_insight", 10), ("analyze_strategy", 5), ("generate_goal", 4), ("generate_leads", 3),
            ("forecast_revenue", 2)]
NAMES = [f for f, _ in FEATURES]
WEIGHTS = [w for _, w in FEATURES]

OUTCOMES: dict[str, int] = {}
# Soak runs (run.py --faults): Redis is restarted on purpose, and a decision asked meanwhile is
# a 503 `unavailable`, which is the contract, not a failure.
FAULTS = os.environ.get("QGW_FAULTS") == "1"
OK_DOWN = (503,) if FAULTS else ()


def count(name: str, status: int) -> None:
    key = f"{name}:{status}"
    OUTCOMES[key] = OUTCOMES.get(key, 0) + 1


@events.quitting.add_listener
def _dump(environment, **_kw) -> None:
    out = os.environ.get("QGW_OUTCOMES")
    if out:
        with open(out, "w") as f:
            json.dump(OUTCOMES, f)


def pick_tenant(kind: str) -> dict:
    return random.choice([t for t in TENANTS if t["kind"] == kind] or TENANTS)


class _ClientTenant(User):
    """Decision-API traffic through quota_gw.client's QuotaClient (sync httpx, under Locust's gevent),
    so the load run exercises the client's retries and idempotency keys too. Each logical call is
    one Locust request, its retries included."""

    abstract = True

    def on_start(self) -> None:
        t = pick_tenant(self.kind)
        self.org = t["org_id"]
        self.quota = QuotaClient(self.host, t["key"], timeout=30)
        self.users = [f"{self.kind}-{i}" for i in range(t.get("users", 200))]

    def on_stop(self) -> None:
        self.quota.close()

    def timed(self, name: str, ok_status: int, fn, expected=(402, 403, 429)):
        """Runs one client call as a Locust request named `name`; counts its status. A refusal in
        `expected` is an outcome, not a failure; anything else raised is a failure."""
        t0 = time.perf_counter()
        exc, result, status = None, None, ok_status
        try:
            result = fn()
        except QuotaError as e:
            status = e.status or 0
            if status not in expected:
                exc = e
        count(name, status)
        self.environment.events.request.fire(request_type="CLIENT", name=name, response_length=0,
                                             response_time=(time.perf_counter() - t0) * 1000, exception=exc,
                                             context={})
        return result

    def decide(self, feature: str, user: str, idem: bool = False) -> None:
        key = uuid.uuid4().hex if idem else None
        first = self.timed("consume", 200, lambda: self.quota.consume(feature, user_id=user, idempotency_key=key))
        if idem and first is not None:
            # The same key again must give the same answer and charge nothing more.
            def again():
                r = self.quota.consume(feature, user_id=user, idempotency_key=key)
                if not r.replayed or r.event_id != first.event_id:
                    raise QuotaError(200, "not_idempotent", detail="idempotent retry gave a different answer")
                return r

            self.timed("consume-retry", 200, again, expected=())


class TypicalUser(_ClientTenant):
    """Most traffic: users of pro and enterprise orgs calling the catalogue's features."""

    abstract = VIA != "client"
    kind = "typical"
    weight = 8
    wait_time = between(0.0, 0.05)

    @task(10)
    def feature(self) -> None:
        self.decide(random.choices(NAMES, WEIGHTS)[0], random.choice(self.users), idem=random.random() < 0.1)

    @task(2)
    def check_then_reserve(self) -> None:
        user = random.choice(self.users)
        r = self.timed("reserve", 201, lambda: self.quota.reserve("generate_insight", 3, user_id=user))
        if r is None:
            return
        if random.random() < 0.7:
            self.timed("commit", 200, lambda: r.commit(random.randint(0, 3)), expected=())
        else:
            self.timed("release", 200, r.release, expected=())

    @task(1)
    def balance(self) -> None:
        self.timed("balance", 200, self.quota.balance, expected=())


class HeavySpender(_ClientTenant):
    """A few users who hammer one feature: they run into 429 first, then 402."""

    abstract = VIA != "client"
    kind = "heavy"
    weight = 1
    wait_time = between(0.0, 0.01)

    @task
    def hammer(self) -> None:
        self.decide("generate_leads", random.choice(self.users[:2]))


class _Tenant(FastHttpUser):
    abstract = True

    def on_start(self) -> None:
        t = pick_tenant(self.kind)
        self.org = t["org_id"]
        self.auth = {"Authorization": f"Bearer {t['key']}", "Content-Type": "application/json"}
        self.users = [f"{self.kind}-{i}" for i in range(t.get("users", 200))]

    def decide(self, feature: str, user: str, idem: bool = False) -> None:
        headers = dict(self.auth)
        if idem:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        body = json.dumps({"feature": feature, "user_id": user})
        with self.client.post("/v1/consume", data=body, headers=headers, name="consume",
                               catch_response=True) as r:
            count("consume", r.status_code)
            if r.status_code in (200, 402, 403, 429, *OK_DOWN):
                r.success()
            if idem and r.status_code == 200:
                # A retry with the same key must give the same answer and charge nothing more.
                with self.client.post("/v1/consume", data=body, headers=headers, name="consume-retry",
                                      catch_response=True) as again:
                    count("consume-retry", again.status_code)
                    if again.status_code in OK_DOWN:
                        again.success()
                    elif again.status_code != 200 or again.json()["event_id"] != r.json()["event_id"]:
                        again.failure("idempotent retry gave a different answer")


class TypicalUserHTTP(_Tenant):
    """TypicalUser over Locust's own HTTP client (QGW_VIA=http): the gateway's numbers alone."""

    abstract = VIA != "http"
    kind = "typical"
    weight = 8
    wait_time = between(0.0, 0.05)

    @task(10)
    def feature(self) -> None:
        self.decide(random.choices(NAMES, WEIGHTS)[0], random.choice(self.users), idem=random.random() < 0.1)

    @task(2)
    def check_then_reserve(self) -> None:
        user = random.choice(self.users)
        with self.client.post("/v1/reservations", name="reserve", headers=self.auth, catch_response=True,
                              data=json.dumps({"feature": "generate_insight", "units": 3, "user_id": user})) as r:
            count("reserve", r.status_code)
            if r.status_code in (201, 402, 403, 429, *OK_DOWN):
                r.success()
        if r.status_code == 201:
            rid = r.json()["reservation_id"]
            if random.random() < 0.7:
                with self.client.post(f"/v1/reservations/{rid}/commit", name="commit", headers=self.auth,
                                      data=json.dumps({"units": random.randint(0, 3)}), catch_response=True) as c:
                    count("commit", c.status_code)
                    if c.status_code in OK_DOWN:
                        c.success()
            else:
                with self.client.delete(f"/v1/reservations/{rid}", name="release", headers=self.auth,
                                        catch_response=True) as c:
                    count("release", c.status_code)
                    if c.status_code in OK_DOWN:
                        c.success()

    @task(1)
    def balance(self) -> None:
        with self.client.get("/v1/balance", headers=self.auth, name="balance", catch_response=True) as r:
            if r.status_code in OK_DOWN:
                r.success()


class HeavySpenderHTTP(_Tenant):
    """HeavySpender over Locust's own HTTP client (QGW_VIA=http)."""

    abstract = VIA != "http"
    kind = "heavy"
    weight = 1
    wait_time = between(0.0, 0.01)

    @task
    def hammer(self) -> None:
        self.decide("generate_leads", random.choice(self.users[:2]))


class StreamingChat(_Tenant):
    """LLM calls through the proxy (OpenAI-compatible route, streamed), metered by usage."""

    kind = "llm"
    weight = 2 if PROXY else 0
    wait_time = between(0.0, 0.05)

    @task
    def chat(self) -> None:
        body = {"model": "demo", "stream": True, "max_tokens": random.choice([16, 64, 128]),
                "messages": [{"role": "user", "content": "Summarise our pipeline " * random.randint(1, 20)}]}
        headers = {**self.auth, "X-Quota-User": random.choice(self.users)}
        with self.client.post("/v1/chat/completions", data=json.dumps(body), headers=headers, name="chat-stream",
                              catch_response=True, stream=True) as r:
            for _ in r.iter_content(chunk_size=4096) if hasattr(r, "iter_content") else []:
                pass
            count("chat", r.status_code)
            if r.status_code in (200, 402, 429, *OK_DOWN):
                r.success()


# Paced runs (run.py --rate-fraction; the soak uses --via http): every user runs at most this many tasks a second.
if os.environ.get("QGW_TASKS_PER_USER_S"):
    for _cls in (TypicalUser, HeavySpender, TypicalUserHTTP, HeavySpenderHTTP, StreamingChat):
        _cls.wait_time = constant_throughput(float(os.environ["QGW_TASKS_PER_USER_S"]))
    del _cls  # a module-level User class name would be taken for one more user class
