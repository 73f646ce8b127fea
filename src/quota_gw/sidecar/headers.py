"""Which headers cross the gateway, in each direction.

A request header is compared as an upstream may read it (case-insensitive, `_` as `-`: WSGI
reads both as HTTP_X_QUOTA_ORG), and dropped when the gateway strips or sets that name
(hop-by-hop, Host, Authorization — the caller's quota-gw key —, X-Forwarded-*, the identity
headers, the route's own `headers`). The route's headers (upstream credentials, ${ENV} read at
start) come last, so a caller cannot override them. Answers carry the gateway's Date and
Server, not the upstream's as well.
"""

from __future__ import annotations

from starlette.types import Scope

from ..config import Behaviour
from ..decisions import Identity
from ..problems import invalid

# Never forwarded in either direction (RFC 9110 §7.6.1), plus what the gateway owns.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "authorization", "x-forwarded-for",
                             "x-forwarded-proto", "x-forwarded-host"}
# The gateway's own server sets these on every answer; the upstream's copies would repeat them.
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}


def header_key(name: bytes | str) -> str:
    """How an upstream may read a header name: case-insensitively, and `_` as `-` (CGI/WSGI
    servers turn both into HTTP_X_QUOTA_ORG). Filtering compares these, so `X_Quota_Org`
    is the gateway's X-Quota-Org and is dropped with it. Remembered: every call carries
    the same dozen names, each looked at twice."""
    key = _KEYS.get(name)
    if key is None:
        key = (name.decode("latin-1") if isinstance(name, bytes) else name).lower().replace("_", "-")
        if len(_KEYS) >= 4096:  # names are the caller's to choose: bounded
            _KEYS.clear()
        _KEYS[name] = key
    return key


_KEYS: dict[bytes | str, str] = {}


class Incoming:
    """What the proxy reads of a caller's headers, in one pass over the ASGI scope's list (names
    in lower case; the first of a repeated one counts, as Starlette's Headers.get): the bearer
    key, the user header as named and as any spelling (`claimed`), the three that forwarding
    reads, whether a body is announced, and every name's header_key for the filter. A Starlette
    Request and its Headers, built for the same values, cost more than the rest of the call's
    header work."""

    __slots__ = ("raw", "keys", "authorization", "user", "claimed", "connection", "forwarded_for", "host",
                 "framed")

    def __init__(self, raw: list[tuple[bytes, bytes]], names: Names) -> None:
        self.raw = raw
        keys: list[str] = []
        claimed: set[bytes] = set()  # the user header's values, in every spelling
        found: list[bytes | None] = [None, None, None, None, None, None, None]
        for k, v in raw:
            key, slot = names[k]
            keys.append(key)
            if slot is not None:
                if slot >= _USER:  # the user header, as named (_USER) or spelled otherwise
                    claimed.add(v)
                    if slot != _USER:
                        continue
                if found[slot] is None:
                    found[slot] = v
        self.keys, self.claimed = keys, claimed
        auth, conn, forwarded, host, length, chunked, user = found
        self.authorization = None if auth is None else auth.decode("latin-1")
        self.user = None if user is None else user.decode("latin-1")
        self.connection = None if conn is None else conn.decode("latin-1")
        self.forwarded_for = None if forwarded is None else forwarded.decode("latin-1")
        self.host = None if host is None else host.decode("latin-1")
        self.framed = length is not None or chunked is not None  # Content-Length or Transfer-Encoding


# What Incoming reads, by slot: the first value of each raw name (ASGI names are lower case),
# the user header as the configuration names it (_USER), which also counts, with every other
# spelling of it (_SPELLED_USER), as a claimed user (a user header named like one of the others
# is read as the user only).
_READ = {b"authorization": 0, b"connection": 1, b"x-forwarded-for": 2, b"host": 3, b"content-length": 4,
         b"transfer-encoding": 5}
_USER, _SPELLED_USER = 6, 7


class Names(dict[bytes, tuple[str, int | None]]):
    """Raw header name -> (header_key, Incoming's slot for it), learnt as names arrive (a hit
    is one lookup in C). Bounded: names are the caller's to choose."""

    def __init__(self, user_raw: bytes, user_key: str) -> None:
        super().__init__()
        self.user_raw, self.user_key = user_raw, user_key

    def __missing__(self, name: bytes) -> tuple[str, int | None]:
        key = header_key(name)
        slot = _USER if name == self.user_raw else _SPELLED_USER if key == self.user_key else _READ.get(name)
        if len(self) >= 4096:
            self.clear()
        self[name] = found = (key, slot)
        return found


def route_keys(route_headers: list[tuple[str, str]]) -> frozenset[str]:
    """The header_keys of a route's own headers: no caller's header of those names crosses."""
    return frozenset(header_key(k) for k, _ in route_headers)


class Headers:
    """The header rules of one gateway (its identity header names come from `behaviour`)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.drop = REQUEST_DROP | {header_key(behaviour.org_header), header_key(behaviour.user_header)}
        self.user_key = header_key(behaviour.user_header)
        self.user_raw = behaviour.user_header.lower().encode("latin-1")  # as it arrives in a scope
        self._drops: dict[tuple[frozenset[str], bool], frozenset[str]] = {}
        self.names = Names(self.user_raw, self.user_key)

    def incoming(self, scope: Scope) -> Incoming:
        return Incoming(scope["headers"], self.names)

    def claimed(self, raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
        """The user the caller names in the user header, however spelled (`X_Quota_User` is
        X-Quota-User to a CGI upstream, so it is to the gateway too: a user-bound key naming
        another user is 403 either way). Two spellings that disagree are refused."""
        keys, user_key = _KEYS, self.user_key  # (header_key's memory read inline: every authorize call asks)
        return self.claimed_of({v for k, v in raw if (keys.get(k) or header_key(k)) == user_key})

    def claimed_of(self, values: set[bytes]) -> dict[str, str]:
        """`claimed` from the user header's values (Incoming.claimed)."""
        if len(values) > 1:
            name = self.behaviour.user_header
            raise invalid(f"{name}: sent more than once with different values", status=400, field=name)
        return {"user_id": values.pop().decode("latin-1")} if values else {}

    def who(self, ident: Identity, user: str) -> dict[str, str]:
        """The identity headers an allowed call carries upstream (authorize's answer)."""
        b = self.behaviour
        h = {b.org_header.lower(): ident.org_id}
        if user:
            h[b.user_header.lower()] = user
        return h

    def upstream(self, scope: Scope, seen: Incoming, ident: Identity, user: str,
                 route_headers: list[tuple[str, str]], route_keys: frozenset[str],
                 metered: bool = False) -> list[tuple[str, str]]:
        """The caller's headers, less every one the gateway strips or sets (compared as
        header_key: case and `_`/`-` do not matter), then the gateway's: forwarding, identity,
        and the route's own (its upstream credentials; `route_keys`: route_keys(route_headers),
        made once per route), so a caller can override none of them."""
        b = self.behaviour
        drop = self._drops.get((route_keys, metered))
        if drop is None:
            drop = self.drop | route_keys
            if metered:  # the gateway reads usage from the answer: it asks for it uncompressed
                drop |= {"accept-encoding"}
            if len(self._drops) < 1024:  # one per route and metering: few
                self._drops[(route_keys, metered)] = drop
        conn = seen.connection
        if conn:
            drop = drop | {header_key(t.strip()) for t in conn.split(",")}
        out = [(k.decode("latin-1"), v.decode("latin-1")) for (k, v), key in zip(seen.raw, seen.keys)
               if key not in drop]
        client = scope["client"][0] if scope.get("client") else ""
        prior = seen.forwarded_for
        if prior and prior.rsplit(",", 1)[-1].strip() == client:
            # uvicorn trusted a local proxy's header and made its last hop the client already
            out.append(("X-Forwarded-For", prior))
        else:
            out.append(("X-Forwarded-For", f"{prior}, {client}" if prior else client))
        out.append(("X-Forwarded-Proto", scope.get("scheme", "http")))
        out.append(("X-Forwarded-Host", seen.host or ""))
        out.append((b.org_header, ident.org_id))
        if user:
            out.append((b.user_header, user))
        if metered:
            out.append(("Accept-Encoding", "identity"))
        out.extend(route_headers)
        return out
