"""Backend URLs: the one place that knows how to show one without its password."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_USERINFO = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/]*):(?P<secret>[^@/]*)@"
)


def redact(url: str) -> str:
    """``redis://u:secret@h`` → ``redis://u:***@h``: URLs reach logs, ``check``, ``status``
    and error reports, and a password must reach none of them."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url, count=1)


def scheme(url: str) -> str:
    """The scheme of ``url`` in lower case, or '' when it has none."""
    return urlsplit(url).scheme.lower() if "://" in url else ""
