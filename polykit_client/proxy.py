"""Which proxy a request to the remote cache goes through: the environment, read as curl reads it.

Build agents are configured for curl, so the client follows curl's rules (libcurl-env(3) and
CURLOPT_NOPROXY(3)) rather than Python's own ``urllib.request.getproxies``, which also reads
``HTTP_PROXY`` and knows no address ranges in ``no_proxy``:

- an ``http://`` cache uses ``http_proxy``, in lower case only: ``HTTP_PROXY`` is ignored because a
  CGI-style server exports a request's ``Proxy:`` header under that name ("httpoxy",
  CVE-2016-5385), so a peer could otherwise choose our proxy;
- an ``https://`` cache uses ``https_proxy``, else ``HTTPS_PROXY``;
- either falls back to ``all_proxy``, else ``ALL_PROXY``; an empty variable counts as unset;
- ``no_proxy``, else ``NO_PROXY``, lists hosts reached directly: ``*`` alone matches every host; a
  name matches itself and its subdomains (``example.com`` and ``.example.com`` both match
  ``example.com`` and ``a.example.com``, never ``notexample.com``), without regard to case or a
  trailing dot; an IP address or CIDR range (``10.0.0.0/8``, ``::1``, ``fd00::/8``; IPv6 with or
  without brackets) matches a cache URL that names an address in it. Names are never resolved,
  so ``localhost`` does not match ``127.0.0.1``, and an entry with a port matches nothing, as in
  curl. Entries are separated by commas (blanks around them are ignored).

A proxy URL without a scheme is ``http://``, and without a port uses 1080, curl's default. Only
``http://`` proxies can be used (``https://`` caches go through them with ``CONNECT``); a SOCKS or
TLS proxy is refused with an error naming the variable, never silently bypassed.
"""

from __future__ import annotations

import base64
import ipaddress
import urllib.parse
from dataclasses import dataclass, field
from typing import Mapping

DEFAULT_PROXY_PORT = 1080  # curl's default (CURLOPT_PROXYPORT)
_PROXY_VARIABLES = {"http": ("http_proxy",), "https": ("https_proxy", "HTTPS_PROXY")}
_FALLBACK_VARIABLES = ("all_proxy", "ALL_PROXY")
_NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")


class ProxyError(ValueError):
    """The proxy named by the environment cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: ``host`` is ``host:port`` for the connection, ``authorization`` the
    ``Proxy-Authorization`` value when the proxy URL carried credentials (never shown)."""

    host: str
    variable: str
    authorization: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"http://{self.host} (from {self.variable})"


def _getenv(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def proxy_for(url: str, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy for requests to ``url`` (an http or https URL), or None to go direct."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    found = _getenv(environ, _PROXY_VARIABLES.get(scheme, ()) + _FALLBACK_VARIABLES)
    if found is None:
        return None
    no_proxy = _getenv(environ, _NO_PROXY_VARIABLES)
    if no_proxy is not None and bypasses(parts.hostname or "", no_proxy[1]):
        return None
    return _parse_proxy(*found)


def _parse_proxy(variable: str, value: str) -> Proxy:
    shown = value
    if "://" not in value:
        value = "http://" + value
    try:
        parts = urllib.parse.urlsplit(value)
        if "@" in parts.netloc:  # never repeat a password in a message
            shown = value.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)
        port = parts.port or DEFAULT_PROXY_PORT
    except ValueError as exc:  # e.g. a port that is not a number
        raise ProxyError(f"proxy {shown!r} from {variable} cannot be used: {exc}") from None
    if parts.scheme.lower() != "http":
        raise ProxyError(f"proxy {shown!r} from {variable} cannot be used: only http:// proxies are supported")
    if not parts.hostname:
        raise ProxyError(f"proxy {shown!r} from {variable} cannot be used: no host name")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    authorization = None
    if parts.username is not None:
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")  # RFC 7617
    return Proxy(f"{host}:{port}", variable, authorization)


def bypasses(host: str, no_proxy: str) -> bool:
    """Whether ``host`` (a URL's host name, IPv6 without brackets) is listed in ``no_proxy``."""
    if not host:
        return False
    if no_proxy.strip() == "*":
        return True
    address = _address(host)
    name = host.rstrip(".").lower()
    for entry in no_proxy.replace(",", " ").split():
        if address is not None:
            if _in_range(address, entry):
                return True
            continue
        entry = entry.rstrip(".").lower()
        entry = entry[1:] if entry.startswith(".") else entry
        if entry and (name == entry or name.endswith("." + entry)):
            return True
    return False


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _in_range(address: ipaddress.IPv4Address | ipaddress.IPv6Address, entry: str) -> bool:
    """An address or CIDR range entry; anything else (a name, a port, a typo) matches no address."""
    text, slash, bits = entry.partition("/")
    text = text.strip("[]")
    try:
        network = ipaddress.ip_network(f"{text}/{bits}" if slash else text, strict=False)
    except ValueError:
        return False
    return network.version == address.version and address in network
