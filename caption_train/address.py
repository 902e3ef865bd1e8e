"""`--interactive [HOST:]PORT` / `review --listen`: parsing, loopback detection and the page URL. Imports nothing heavy.

    host, port = parse_interactive("8765")              # ("127.0.0.1", 8765)
    host, port = parse_interactive("0.0.0.0:8765")      # reachable from other machines: warn loudly
    page_url("127.0.0.1", 8765, token)                  # "http://127.0.0.1:8765/?token=..."

It lives outside caption_train.iterative (the page, which uses it too) so that config validation, and through it
the training loop, depend on nothing of the page.
"""

from __future__ import annotations

import ipaddress
import re

from caption_train.errors import UserError

DEFAULT_HOST = "127.0.0.1"
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_EXAMPLES = "e.g. 8765, 127.0.0.1:8765 or [::1]:8765"


def parse_interactive(value: str | int, flag: str = "--interactive") -> tuple[str, int]:
    """'PORT', 'HOST:PORT' or '[IPv6]:PORT' -> (host, port). Host defaults to 127.0.0.1; port 0 picks a free one."""
    text = str(value).strip()
    if "://" in text or "/" in text:
        raise UserError(f"{flag} {text!r}: not a host name and port; give only [HOST:]PORT, without http:// or a path ({_EXAMPLES})")
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UserError(f"{flag} {text!r}: write an IPv6 host in brackets, e.g. [::1]:8765")
    host = host or DEFAULT_HOST
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UserError(f"{flag} {text!r}: expected [HOST:]PORT with a port from 0 to 65535 ({_EXAMPLES})")
    if not _valid_host(host):
        raise UserError(f"{flag} {text!r}: {host!r} is not a host name or IP address ({_EXAMPLES})")
    return host, int(port_text)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """Host as written in a URL (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host


def page_url(host: str, port: int, token: str) -> str:
    return f"http://{url_host(host)}:{port}/?token={token}"


def exposure_warning(host: str, port: int) -> str:
    """The loud warning for a non-loopback bind address."""
    bar = "!" * 100
    return "\n".join([
        bar,
        f"WARNING: the interactive page listens on {url_host(host)}:{port}, which other machines can reach.",
        "Anyone who has the page's URL (its token) can read every image of the dataset and rewrite its captions,",
        "and plain HTTP sends the token unencrypted. Prefer the default 127.0.0.1 and an SSH tunnel:",
        f"    ssh -L {port}:127.0.0.1:{port} THIS_HOST    then open the printed URL with 127.0.0.1",
        bar,
    ])
