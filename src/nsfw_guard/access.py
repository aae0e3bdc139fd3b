"""Who may use nsfw-guard's HTTP servers (``serve``, ``review``): a key sent as a bearer token,
and, for a server listening on this machine only, the host names a request may give.

A server on 127.0.0.1 is reachable from this machine only, but a web page open here could
reach it through a DNS name of its own that points to 127.0.0.1 (DNS rebinding) and read its
answers as its own. Such requests carry that name in their ``Host`` header: answering only
requests for the loopback names refuses them.
"""

from __future__ import annotations

import hmac
import ipaddress

__all__ = [
    "LOOPBACK_HOSTS",
    "allowed_hosts",
    "bearer_matches",
    "host_name",
    "same_key",
    "wrong_host",
]

LOOPBACK_HOSTS = frozenset(["127.0.0.1", "localhost", "::1"])
"""The names a server listening on this machine only answers to."""


def allowed_hosts(bind: str, names: str | None = None) -> frozenset[str] | None:
    """The host names a server listening on ``bind`` answers to (``None``: any). ``names`` adds
    some, comma-separated (the name a reverse proxy passes on, say); ``*``: any. Without
    ``names``, a server on this machine only (any loopback address) answers to
    :data:`LOOPBACK_HOSTS` and its own address, any other to any name.

    Example:
        >>> sorted(allowed_hosts("127.0.0.1"))
        ['127.0.0.1', '::1', 'localhost']
        >>> allowed_hosts("0.0.0.0") is None, allowed_hosts("127.0.0.1", "*") is None
        (True, True)
        >>> sorted(allowed_hosts("0.0.0.0", "Review.Example.com"))
        ['127.0.0.1', '::1', 'localhost', 'review.example.com']
        >>> sorted(allowed_hosts("127.0.0.2"))  # any loopback address
        ['127.0.0.1', '127.0.0.2', '::1', 'localhost']
    """
    given = frozenset(name.strip().lower() for name in (names or "").split(",") if name.strip())
    local = _is_loopback(bind)
    if "*" in given or (not given and not local):
        return None
    return LOOPBACK_HOSTS | given | ({bind.strip("[]").lower()} if local else set())


def _is_loopback(bind: str) -> bool:
    """Whether ``bind`` is an address (or name) of this machine only: 127.0.0.0/8, ::1,
    localhost."""
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return bind.lower() in LOOPBACK_HOSTS


def host_name(header: str) -> str:
    """The host name of a ``Host`` header, without its port, lower case.

    Example:
        >>> host_name("LocalHost:8001"), host_name("[::1]:8001"), host_name("example.com")
        ('localhost', '::1', 'example.com')
    """
    name = header[1:].partition("]")[0] if header.startswith("[") else header.partition(":")[0]
    return name.lower()


def same_key(given: str, key: str) -> bool:
    """Whether ``given`` is ``key``, compared in constant time (as UTF-8: any text may come).

    Example:
        >>> same_key("s3cret", "s3cret"), same_key("sécret", "s3cret")
        (True, False)
    """
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), key.encode("utf-8", "surrogatepass")
    )


def bearer_matches(authorization: str, key: str) -> bool:
    """Whether an ``Authorization`` header is ``Bearer KEY``.

    Example:
        >>> bearer_matches("Bearer s3cret", "s3cret"), bearer_matches("Basic s3cret", "s3cret")
        (True, False)
    """
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and same_key(token.strip(), key)


def wrong_host(header: str, hosts: frozenset[str] | None) -> str | None:
    """Why a request with this ``Host`` header is refused, or ``None`` if its name is one of
    ``hosts`` (or ``hosts`` is ``None``).

    Example:
        >>> wrong_host("127.0.0.1:8000", LOOPBACK_HOSTS) is None
        True
        >>> wrong_host("rebound.example:8000", LOOPBACK_HOSTS)  # doctest: +NORMALIZE_WHITESPACE
        "Host 'rebound.example:8000': this server answers to 127.0.0.1, ::1, localhost only
        (more: --allowed-hosts)"
    """
    if hosts is None or host_name(header) in hosts:
        return None
    allowed = ", ".join(sorted(hosts))
    return f"Host {header!r}: this server answers to {allowed} only (more: --allowed-hosts)"
