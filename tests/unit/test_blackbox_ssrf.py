"""The SSRF guard refuses internal addresses before any connection, unless an operator allowlists them."""

from __future__ import annotations

import select
import socket

import pytest

from auditor.blackbox import ALLOWED_HOSTS_ENV, ApiConfig, HttpModelAPI, check_url, resolve_and_check
from auditor.errors import AuditError, ErrorCode
from auditor.settings import Settings


@pytest.fixture(autouse=True)
def no_operator_allowlist(monkeypatch):
    """Each test states its own allowlist; a developer's environment must not leak in."""
    monkeypatch.delenv(ALLOWED_HOSTS_ENV, raising=False)


@pytest.fixture
def no_connections(monkeypatch):
    """A guard, not a mock: any outbound TCP connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _refused(url: str, allowed: tuple[str, ...] = ()) -> AuditError:
    with pytest.raises(AuditError) as info:
        check_url(url, allowed)
    assert info.value.code is ErrorCode.URL_NOT_ALLOWED
    return info.value


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://10.0.0.1/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link_local"),
        ("http://[::1]/", "loopback"),
        ("http://localhost/", "blocked_name"),
        ("http://127.0.0.1:8080/v1/models/m:predict", "loopback"),
        ("http://172.16.5.4/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://[fe80::1]/", "link_local"),
        ("http://[fc00::1]/", "private"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://100.64.0.1/", "not_global"),
        ("http://metadata.google.internal/computeMetadata/v1/", "blocked_name"),
        ("http://anything.internal/", "blocked_name"),
        # other spellings of 127.0.0.1 and of the metadata address
        ("http://2130706433/", "loopback"),
        ("http://0x7f000001/", "loopback"),
        ("http://127.1/", "loopback"),
        ("http://[::ffff:a9fe:a9fe]/", "link_local"),
    ],
)
def test_internal_addresses_are_refused_before_any_connection(url, reason, no_connections):
    error = _refused(url)
    assert error.detail["reason"] == reason
    assert error.is_input_error


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://93.184.216.34/", "gopher://93.184.216.34/", "93.184.216.34"])
def test_only_http_and_https_are_allowed(url, no_connections):
    assert _refused(url).detail["reason"] == "scheme"


def test_public_ip_literal_passes_and_is_pinned(no_connections):
    checked = resolve_and_check("https://93.184.216.34:8443/v2/models/m/infer")
    assert checked.addresses == ("93.184.216.34",)
    assert (checked.scheme, checked.port) == ("https", 8443)


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.0/8", "localhost"])
def test_allowlist_admits_loopback_by_ip_cidr_or_name(entry, no_connections):
    url = "http://localhost:9/" if entry == "localhost" else "http://127.0.0.1:9/"
    checked = resolve_and_check(url, [entry])
    assert "127.0.0.1" in checked.addresses or "::1" in checked.addresses


def test_operator_allowlist_from_settings_is_applied_and_narrow(no_connections):
    operator = Settings.from_env({ALLOWED_HOSTS_ENV: " 10.0.0.0/8 , models.corp.example "}).allowed_hosts
    check_url("http://10.1.2.3/", operator)  # the operator's private range
    _refused("http://169.254.169.254/", operator)  # but not the metadata service
    _refused("http://192.168.0.1/", operator)


def test_the_guard_reads_no_environment(monkeypatch, no_connections):
    """Configuration comes only through Settings: a variable set behind the process's back changes nothing."""
    monkeypatch.setenv(ALLOWED_HOSTS_ENV, "10.0.0.0/8")
    _refused("http://10.1.2.3/")


def test_a_public_name_resolving_to_a_private_address_is_refused(monkeypatch, no_connections):
    """DNS answers are controlled here (the resolver, not our code, is replaced) to model rebinding."""

    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.8.7", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    error = _refused("http://models.example.com/")
    assert error.detail["address"] == "10.9.8.7"
    # an allowlisted host name is trusted whatever it resolves to
    assert resolve_and_check("http://models.example.com/", ["models.example.com"]).addresses == (
        "93.184.216.34",
        "10.9.8.7",
    )


def test_unresolvable_names_are_refused(monkeypatch, no_connections):
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    assert _refused("http://no-such-host.example/").detail["reason"] == "unresolvable"


def test_credentials_in_the_url_do_not_reach_the_error():
    error = _refused("http://user:hunter2@10.0.0.1/")
    assert "hunter2" not in str(error.to_dict())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_client_construction_refuses_loopback_without_touching_a_listening_socket(host):
    """A real listener on loopback records that nobody knocked."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        with pytest.raises(AuditError) as info:
            HttpModelAPI(ApiConfig(url=f"http://{host}:{port}", num_classes=4))
        assert info.value.code is ErrorCode.URL_NOT_ALLOWED
        readable, _, _ = select.select([listener], [], [], 0.2)
        assert readable == [], "the client connected before the SSRF check"
    finally:
        listener.close()
