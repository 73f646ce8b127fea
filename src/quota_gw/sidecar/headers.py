"""Which headers cross the gateway, in each direction.

A request header is compared as an upstream may read it (case-insensitive, `_` as `-`: WSGI
reads both as HTTP_X_QUOTA_ORG), and dropped when the gateway strips or sets that name
(hop-by-hop, Host, Authorization — the caller's quota-gw key —, X-Forwarded-*, the identity
headers, the route's own `headers`). The route's headers (upstream credentials, ${ENV} read at
start) come last, so a caller cannot override them. Answers carry the gateway's Date and
Server, not the upstream's as well.
"""

from __future__ import annotations

from starlette.requests import Request

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


class Headers:
    """The header rules of one gateway (its identity header names come from `behaviour`)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.drop = REQUEST_DROP | {header_key(behaviour.org_header), header_key(behaviour.user_header)}
        self.user_key = header_key(behaviour.user_header)

    def claimed_user(self, request: Request) -> dict[str, str]:
        """The user the caller names in the user header, however spelled (`X_Quota_User` is
        X-Quota-User to a CGI upstream, so it is to the gateway too: a user-bound key naming
        another user is 403 either way). Two spellings that disagree are refused."""
        return self.claimed(request.scope["headers"])

    def claimed(self, raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
        """`claimed_user` from the ASGI scope's headers."""
        keys, user_key = _KEYS, self.user_key  # (header_key's memory read inline: every authorize call asks)
        values = {v.decode("latin-1") for k, v in raw if (keys.get(k) or header_key(k)) == user_key}
        if len(values) > 1:
            name = self.behaviour.user_header
            raise invalid(f"{name}: sent more than once with different values", status=400, field=name)
        return {"user_id": values.pop()} if values else {}

    def who(self, ident: Identity, user: str) -> dict[str, str]:
        """The identity headers an allowed call carries upstream (authorize's answer)."""
        b = self.behaviour
        h = {b.org_header.lower(): ident.org_id}
        if user:
            h[b.user_header.lower()] = user
        return h

    def upstream(self, request: Request, ident: Identity, user: str, route_headers: list[tuple[str, str]],
                 metered: bool = False) -> list[tuple[str, str]]:
        """The caller's headers, less every one the gateway strips or sets (compared as
        header_key: case and `_`/`-` do not matter), then the gateway's: forwarding, identity,
        and the route's own (its upstream credentials), so a caller can override none of them."""
        # From the raw ASGI headers (lowercase names; the first of a repeated one counts, as
        # Starlette's request.headers would say): building request.headers and request.url
        # for three values cost more than the rest of this function.
        b = self.behaviour
        scope = request.scope
        raw = scope["headers"]
        conn = prior = host = None
        for k, v in raw:
            if k == b"connection" and conn is None:
                conn = v.decode("latin-1")
            elif k == b"x-forwarded-for" and prior is None:
                prior = v.decode("latin-1")
            elif k == b"host" and host is None:
                host = v.decode("latin-1")
        drop = self.drop
        if route_headers:
            drop = drop | {header_key(k) for k, _ in route_headers}
        if metered:  # the gateway reads usage from the answer: it asks for it uncompressed
            drop = drop | {"accept-encoding"}
        if conn:
            drop = drop | {header_key(t.strip()) for t in conn.split(",")}
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if header_key(k) not in drop]
        client = scope["client"][0] if scope.get("client") else ""
        if prior and prior.rsplit(",", 1)[-1].strip() == client:
            # uvicorn trusted a local proxy's header and made its last hop the client already
            out.append(("X-Forwarded-For", prior))
        else:
            out.append(("X-Forwarded-For", f"{prior}, {client}" if prior else client))
        out.append(("X-Forwarded-Proto", scope.get("scheme", "http")))
        out.append(("X-Forwarded-Host", host or ""))
        out.append((b.org_header, ident.org_id))
        if user:
            out.append((b.user_header, user))
        if metered:
            out.append(("Accept-Encoding", "identity"))
        out.extend(route_headers)
        return out
