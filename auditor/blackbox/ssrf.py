"""Server-side request forgery guard for every outbound URL a user can choose.

A model-API URL (and later a webhook URL) is typed by a user but fetched by our
worker, which sits inside a private network next to PostgreSQL, Redis and the
cloud metadata service. So before any connection we resolve the host and refuse
addresses that are not on the public internet, unless an operator allowlisted
them (``REFINE_AUDIT_ALLOWED_HOSTS``, comma-separated host names, IPs or CIDRs).

The check returns the addresses it approved so a caller can connect to exactly
those (pinning) instead of resolving again: a second lookup could answer with a
private address (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

from auditor.errors import AuditError, ErrorCode

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_HOSTS_ENV = "REFINE_AUDIT_ALLOWED_HOSTS"
ALLOWED_SCHEMES = frozenset({"http", "https"})

#: Names of cloud metadata services; refused even before resolution, because offline
#: they may not resolve at all and online they resolve to link-local addresses.
BLOCKED_HOSTNAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.com",
        "instance-data",
        "instance-data.ec2.internal",
        "localhost",
    }
)
#: Suffixes reserved for private use; such names can only point inside a network.
BLOCKED_SUFFIXES = (".internal", ".localhost", ".local")


@dataclass(frozen=True)
class Allowlist:
    """Operator exceptions: exact host names (lower case) and IP networks."""

    hosts: frozenset[str]
    networks: tuple[IPNetwork, ...]

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_ip(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)


@dataclass(frozen=True)
class CheckedURL:
    """A URL that passed the guard, with the addresses to connect to."""

    url: str
    scheme: str
    host: str  # as written in the URL, without brackets, lower case
    port: int
    addresses: tuple[str, ...]  # approved IPs, in resolver order; connect only to these


def parse_allowlist(entries: Iterable[str]) -> Allowlist:
    """Split entries into host names and networks; a bare IP becomes a /32 or /128."""
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip().lower().rstrip(".")
        if not entry:
            continue
        entry = entry.strip("[]")
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            hosts.add(entry)
    return Allowlist(frozenset(hosts), tuple(networks))


def _refuse(url: str, reason: str, message: str, **detail: object) -> AuditError:
    return AuditError(ErrorCode.URL_NOT_ALLOWED, message, {"url": _redact(url), "reason": reason, **detail})


def _redact(url: str) -> str:
    """Drop user:password from the URL before it lands in an error message."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id (fe80::1%eth0)
    except ValueError:
        return None


def refusal_reason(ip: IPAddress) -> str | None:
    """Why an address is not on the public internet, or None when it is.

    IPv4 addresses embedded in IPv6 (``::ffff:10.0.0.1``) are judged as IPv4, so the
    mapping cannot be used to smuggle a private address past the check.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link_local", ip.is_link_local),  # includes 169.254.169.254, the metadata service
        ("private", ip.is_private),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("not_global", not ip.is_global),  # e.g. carrier-grade NAT 100.64/10
    )
    return next((name for name, hit in checks if hit), None)


def _is_blocked_name(host: str) -> bool:
    return host in BLOCKED_HOSTNAMES or host.endswith(BLOCKED_SUFFIXES)


def resolve_addresses(host: str, port: int) -> list[str]:
    """All addresses the system resolver gives for ``host`` (IP literals pass through)."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


def _split_url(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refuse(url, "malformed", f"The URL is malformed: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise _refuse(url, "scheme", f"Only http and https URLs are allowed, not {scheme or 'no scheme'!r}.")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _refuse(url, "no_host", "The URL has no host name.")
    return scheme, host, port or (443 if scheme == "https" else 80)


def resolve_and_check(url: str, allowed_hosts: Iterable[str] = ()) -> CheckedURL:
    """Validate ``url`` and return the approved addresses; raises ``url_not_allowed``.

    ``allowed_hosts`` is the operator's allowlist (``Settings.allowed_hosts``, from
    ``REFINE_AUDIT_ALLOWED_HOSTS``) plus any exception the caller adds (the CLI's
    ``--allow-host``, tests adding loopback). An allowlisted host name approves every address it resolves to;
    otherwise each resolved address must be public or inside an allowlisted network.
    No socket is connected here; only the resolver is asked.
    """
    scheme, host, port = _split_url(url)
    allow = parse_allowlist(allowed_hosts)
    host_allowed = allow.allows_host(host)
    literal = _parse_ip(host)
    if literal is None and not host_allowed and _is_blocked_name(host):
        raise _refuse(url, "blocked_name", f"The host {host!r} is an internal or metadata name.", host=host)
    try:
        addresses = [host] if literal is not None else resolve_addresses(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        raise _refuse(url, "unresolvable", f"The host {host!r} could not be resolved.", host=host) from exc
    if not addresses:
        raise _refuse(url, "unresolvable", f"The host {host!r} resolved to no address.", host=host)
    if not host_allowed:
        for address in addresses:
            ip = _parse_ip(address)
            reason = "unparseable" if ip is None else refusal_reason(ip)
            if reason and not (ip is not None and allow.allows_ip(ip)):
                raise _refuse(
                    url,
                    reason,
                    f"The host {host!r} resolves to {address}, a {reason.replace('_', '-')} address; "
                    f"ask the operator to add it to {ALLOWED_HOSTS_ENV} if it is trusted.",
                    host=host,
                    address=address,
                )
    return CheckedURL(url=url, scheme=scheme, host=host.lower(), port=port, addresses=tuple(addresses))


def check_url(url: str, allowed_hosts: Iterable[str] = ()) -> None:
    """Raise ``AuditError(url_not_allowed)`` unless ``url`` may be fetched; see ``resolve_and_check``."""
    resolve_and_check(url, allowed_hosts)
