"""URLs that name several hosts (redis+cluster://, redis+sentinel://): the part both parse alike."""
from __future__ import annotations

from typing import NamedTuple
from urllib.parse import unquote

from .errors import ConfigError


class MultiHostURL(NamedTuple):
    """`scheme://[credentials@]host:port[,host:port...][/path][?options]`, taken apart."""
    scheme: str
    credentials: str  # "user:password@" as written, or ""
    hosts: list[tuple[str, int]]
    path: str  # after the first "/", without the query
    options: str  # the query, without "?"

    def node_url(self, node_scheme: str, path: str) -> str:
        """A URL of the first host with the same credentials and options (what redis-py's
        parse_url reads for every connection's options)."""
        host, port = self.hosts[0]
        url = f"{node_scheme}://{self.credentials}{bracketed(host)}:{port}/{path}"
        return url + "?" + self.options if self.options else url


def parse_multihost(url: str, schemes: dict[str, str], what: str, each: str) -> tuple[MultiHostURL, str]:
    """(the parts of `url`, the scheme of one node's URL) for a URL of one of `schemes` (its scheme
    -> a node's scheme); `what` names the kind in errors, `each` a host ("node", "sentinel").
    Raises ConfigError."""
    scheme, _, rest = url.partition("://")
    node_scheme = schemes.get(scheme.lower())
    if node_scheme is None:
        raise ConfigError(f"not a {what} URL ({' or '.join(s + '://' for s in schemes)}): {scheme}://...")
    # The query first: its values may hold a "/" (?ssl_ca_certs=/etc/ca.crt), the hosts cannot.
    rest, _, options = rest.partition("?")
    authority, _, path = rest.partition("/")
    credentials, at, hosts = authority.rpartition("@")
    parsed: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{scheme}:// URL: each {each} must be host:port, got {part!r}")
        parsed.append((unquote(host.strip("[]")), int(port)))
    return MultiHostURL(scheme, credentials + at, parsed, path, options), node_scheme


def bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
