"""Proxies as curl reads them from the environment: which variable, which hosts go direct, and
what a proxy gets to see. The proxies here are bare recording servers on 127.0.0.1."""

import base64
import io

import pytest

from polykit_client.proxy import ProxyError, bypasses, proxy_for
from polykit_client.remote import RemoteCache
from sample import Polykit, make_tools, make_workspace
from support import KEY, request, serve_raw, thread_server

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
TOKEN = "cache-token-123"


@pytest.mark.parametrize("host, no_proxy, expected", [
    ("cache.example.com", "example.com", True),
    ("cache.example.com", ".example.com", True),
    ("example.com", ".example.com", True),
    ("deep.cache.example.com", "example.com", True),
    ("notexample.com", "example.com", False),
    ("example.com.org", "example.com", False),
    ("Cache.Example.COM.", "example.com.", True),
    ("cache", "other, cache", True),
    ("cache", "other cache", True),
    ("cache", ",,cache,,", True),
    ("anything.at.all", "*", True),
    ("anything.at.all", " * ", True),
    ("anything.at.all", "other,*", False),  # curl: "*" only alone
    ("127.0.0.1", "127.0.0.0/8", True),
    ("127.0.0.1", "localhost,127.0.0.0/8", True),
    ("128.0.0.1", "127.0.0.0/8", False),
    ("10.20.30.40", "10.0.0.0/8", True),
    ("10.20.30.40", "10.20.30.40", True),
    ("10.20.30.41", "10.20.30.40", False),
    ("192.168.5.5", "192.168.0.0/16", True),
    ("192.169.5.5", "192.168.0.0/16", False),
    ("10.0.0.1", "10.0.0.0/33", False),
    ("10.0.0.1", "10.0.0.0/8x", False),
    ("::1", "::1", True),
    ("::1", "[::1]", True),
    ("::1", "[::1]/128", True),
    ("fd00::5", "fd00::/8", True),
    ("fe80::1", "fd00::/8", False),
    ("2001:db8::1", "2001:db8::/32", True),
    ("::1", "127.0.0.1", False),
    ("127.0.0.1", "::1", False),
    ("127.0.0.1", "localhost", False),  # names are never resolved
    ("localhost", "127.0.0.1", False),
    ("cache.example.com", "cache.example.com:8080", False),  # an entry with a port matches nothing
    ("10.0.0.1", "10.0.0.1:8080", False),
    ("cache", "", False),
    ("", "*", False),
])
def test_no_proxy_matching(host, no_proxy, expected):
    assert bypasses(host, no_proxy) is expected


@pytest.mark.parametrize("url, environ, expected", [
    ("http://cache:8080", {"http_proxy": "proxy:3128"}, ("proxy:3128", "http_proxy")),
    ("http://cache:8080", {"HTTP_PROXY": "proxy:3128"}, None),  # upper case ignored for http, as curl
    ("http://cache:8080", {"HTTP_PROXY": "proxy:3128", "ALL_PROXY": "all:1"}, ("all:1", "ALL_PROXY")),
    ("http://cache:8080", {"https_proxy": "proxy:3128"}, None),
    ("https://cache", {"HTTPS_PROXY": "p:1"}, ("p:1", "HTTPS_PROXY")),
    ("https://cache", {"https_proxy": "a:1", "HTTPS_PROXY": "b:1"}, ("a:1", "https_proxy")),
    ("https://cache", {"http_proxy": "p:1"}, None),
    ("https://cache", {"all_proxy": "a:1", "ALL_PROXY": "b:1"}, ("a:1", "all_proxy")),
    ("https://cache", {"https_proxy": "s:1", "all_proxy": "a:1"}, ("s:1", "https_proxy")),
    ("http://cache", {"http_proxy": "", "all_proxy": "a:1"}, ("a:1", "all_proxy")),  # empty is unset
    ("http://cache", {"http_proxy": "http://proxy"}, ("proxy:1080", "http_proxy")),  # curl's default port
    ("http://cache", {"http_proxy": "http://[fd00::1]:3128/"}, ("[fd00::1]:3128", "http_proxy")),
    ("http://10.1.2.3:8080", {"http_proxy": "p:1", "no_proxy": "10.0.0.0/8"}, None),
    ("http://10.1.2.3:8080", {"http_proxy": "p:1", "NO_PROXY": "10.0.0.0/8"}, None),
    ("http://10.1.2.3:8080", {"http_proxy": "p:1", "no_proxy": "other", "NO_PROXY": "10.0.0.0/8"}, ("p:1", "http_proxy")),
    ("http://[::1]:8080", {"http_proxy": "p:1", "no_proxy": "::1"}, None),
    ("https://cache.corp.example", {"https_proxy": "p:1", "no_proxy": ".corp.example"}, None),
])
def test_which_proxy(url, environ, expected):
    proxy = proxy_for(url, environ)
    assert (None if proxy is None else (proxy.host, proxy.variable)) == expected


def test_proxy_credentials_become_basic_authorization_and_are_never_shown():
    proxy = proxy_for("http://cache", {"http_proxy": "http://me%40corp:p%3Ass@proxy:3128"})
    assert proxy.authorization == "Basic " + base64.b64encode(b"me@corp:p:ss").decode()
    assert "p%3Ass" not in repr(proxy) and "p:ss" not in repr(proxy) and "p:ss" not in str(proxy)
    remote = RemoteCache("http://cache", environ={"http_proxy": "http://me:hunter2@proxy:3128"})
    assert "hunter2" not in repr(remote) and "proxy:3128" in repr(remote)


@pytest.mark.parametrize("value", ["socks5://proxy:1080", "socks5h://u:hunter2@proxy", "https://proxy:443",
                                   "http://proxy:99999", "http://:3128"])
def test_a_proxy_that_cannot_be_used_is_refused_by_its_variable(value):
    with pytest.raises(ProxyError) as err:
        proxy_for("https://cache", {"ALL_PROXY": value})
    assert "ALL_PROXY" in str(err.value) and "hunter2" not in str(err.value)
    assert isinstance(err.value, ValueError)  # what the command turns into a warning


# --- what a proxy receives ----------------------------------------------------------------------


def headers_of(head: bytes) -> dict:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


def test_an_http_cache_is_asked_through_the_proxy_in_absolute_form():
    with serve_raw(NOT_FOUND) as proxy:
        warnings: list = []
        remote = RemoteCache("http://cache.example:8080/team", token=TOKEN, warn=warnings.append,
                             environ={"http_proxy": f"http://me:p%40ss@127.0.0.1:{proxy.port}"})
        assert remote.exists(KEY) is False and remote.fetch(KEY, io.BytesIO()) is False
    assert warnings == []
    first = proxy.heads[0]
    assert first.startswith(f"HEAD http://cache.example:8080/team/v1/artifacts/{KEY} HTTP/1.1\r\n".encode())
    sent = headers_of(first)
    assert sent["host"] == "cache.example:8080"
    assert sent["proxy-authorization"] == "Basic " + base64.b64encode(b"me:p@ss").decode()
    assert sent["authorization"] == f"Bearer {TOKEN}"  # plain http through a proxy: as curl does
    assert proxy.heads[1].startswith(f"GET http://cache.example:8080/team/v1/artifacts/{KEY} ".encode())


def test_an_https_cache_is_tunnelled_and_the_proxy_never_sees_the_token():
    refused = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
    with serve_raw(refused) as proxy:
        warnings: list = []
        remote = RemoteCache("https://cache.example:8443", token=TOKEN, retries=0, warn=warnings.append,
                             environ={"HTTPS_PROXY": f"me:pw@127.0.0.1:{proxy.port}"})
        assert remote.fetch(KEY, io.BytesIO()) is False
    assert len(proxy.heads) == 1 and proxy.heads[0].startswith(b"CONNECT cache.example:8443 HTTP/1.")
    sent = headers_of(proxy.heads[0])
    assert sent["proxy-authorization"] == "Basic " + base64.b64encode(b"me:pw").decode()
    assert "authorization" not in sent and TOKEN.encode() not in proxy.heads[0]
    assert len(warnings) == 1 and "403" in warnings[0] and "built locally" in warnings[0]


@pytest.mark.parametrize("environ", [
    {"no_proxy": "127.0.0.0/8"}, {"NO_PROXY": "10.0.0.0/8, 127.0.0.1"}, {"no_proxy": "*"},
    {"no_proxy": "::1,127.0.0.1/32"}, {"HTTP_PROXY": "set below instead of http_proxy"},
], ids=["cidr", "upper-case list", "star", "address", "upper-case HTTP_PROXY"])
def test_a_bypassed_cache_is_asked_directly_and_the_proxy_gets_nothing(environ):
    with serve_raw(NOT_FOUND) as proxy, serve_raw(NOT_FOUND) as cache:
        env = dict(environ)
        variable = "HTTP_PROXY" if "HTTP_PROXY" in env else "http_proxy"
        env[variable] = f"http://127.0.0.1:{proxy.port}"
        warnings: list = []
        remote = RemoteCache(f"http://127.0.0.1:{cache.port}", token=TOKEN, warn=warnings.append, environ=env)
        assert remote.proxy is None
        assert remote.exists(KEY) is False
    assert proxy.heads == [] and warnings == []
    assert cache.heads[0].startswith(f"HEAD /v1/artifacts/{KEY} HTTP/1.1".encode())
    assert headers_of(cache.heads[0])["authorization"] == f"Bearer {TOKEN}"


def test_a_build_with_no_proxy_reaches_the_cache_directly(tmp_path):
    pk = Polykit(make_workspace(tmp_path / "ws"), make_tools(tmp_path / "tools"), tmp_path / "marker")
    with serve_raw(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n") as proxy, \
            thread_server(tmp_path / "store") as (port, _):
        out = pk.run("build", "--remote-cache-url", f"http://127.0.0.1:{port}",
                     http_proxy=f"http://127.0.0.1:{proxy.port}", no_proxy="localhost,127.0.0.0/8")
        stats = request(port, "GET", "/v1/stats")[2]
    assert proxy.heads == [] and out.stderr == ""
    assert b'"uploads": 3' in stats


def test_a_proxy_that_cannot_be_used_is_one_warning_and_a_build_without_the_remote_cache(tmp_path):
    pk = Polykit(make_workspace(tmp_path / "ws"), make_tools(tmp_path / "tools"), tmp_path / "marker")
    with thread_server(tmp_path / "store") as (port, app):
        out = pk.run("build", "--remote-cache-url", f"http://127.0.0.1:{port}",
                     all_proxy="socks5://u:hunter2@127.0.0.1:1")
        assert sum(app.metrics.requests.values()) == 0
    assert pk.ran() == ["api-server:build", "shared-utils:build", "web:build"]
    warnings = out.stderr.splitlines()
    assert len(warnings) == 1 and "all_proxy" in warnings[0] and "only http:// proxies" in warnings[0]
    assert "building without the remote cache" in warnings[0] and "hunter2" not in out.stderr
