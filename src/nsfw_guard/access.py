"""Who may use nsfw-guard's HTTP servers (``serve``, ``review``): a key sent as a bearer token,
and, for a server listening on this machine only, the host names a request may give.

A server on 127.0.0.1 is reachable from this machine only, but a web page open here could
reach it through a DNS name of its own that points to 127.0.0.1 (DNS rebinding) and read its
answers as its own. Such requests carry that name in their ``Host`` header: answering only
requests for the loopback names refuses them.
"""

from __future__ import annotations

import hmac

__all__ = ["LOOPBACK_HOSTS", "bearer_matches", "host_name", "loopback_hosts", "wrong_host"]

LOOPBACK_HOSTS = frozenset(["127.0.0.1", "localhost", "::1"])
"""The names a server listening on this machine only answers to."""


def loopback_hosts(bind: str) -> frozenset[str] | None:
    """The host names a server listening on ``bind`` answers to: :data:`LOOPBACK_HOSTS` when
    that is this machine only, ``None`` (any) otherwise.

    Example:
        >>> sorted(loopback_hosts("127.0.0.1"))
        ['127.0.0.1', '::1', 'localhost']
        >>> loopback_hosts("0.0.0.0") is None
        True
    """
    return LOOPBACK_HOSTS if bind in LOOPBACK_HOSTS else None


def host_name(header: str) -> str:
    """The host name of a ``Host`` header, without its port, lower case.

    Example:
        >>> host_name("LocalHost:8001"), host_name("[::1]:8001"), host_name("example.com")
        ('localhost', '::1', 'example.com')
    """
    name = header[1:].partition("]")[0] if header.startswith("[") else header.partition(":")[0]
    return name.lower()


def bearer_matches(authorization: str, key: str) -> bool:
    """Whether an ``Authorization`` header is ``Bearer KEY`` (compared in constant time).

    Example:
        >>> bearer_matches("Bearer s3cret", "s3cret"), bearer_matches("Basic s3cret", "s3cret")
        (True, False)
    """
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), key)


def wrong_host(header: str, hosts: frozenset[str] | None) -> str | None:
    """Why a request with this ``Host`` header is refused, or ``None`` if its name is one of
    ``hosts`` (or ``hosts`` is ``None``).

    Example:
        >>> wrong_host("127.0.0.1:8000", LOOPBACK_HOSTS) is None
        True
        >>> wrong_host("rebound.example:8000", LOOPBACK_HOSTS)
        "Host 'rebound.example:8000': this server answers to 127.0.0.1, ::1, localhost only"
    """
    if hosts is None or host_name(header) in hosts:
        return None
    return f"Host {header!r}: this server answers to {', '.join(sorted(hosts))} only"
