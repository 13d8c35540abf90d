"""Backend URLs: the one place that knows how to show one without its password."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

#: ``scheme://user:secret@`` — the secret runs to the *last* ``@`` before the host, as
#: ``urlsplit`` reads it, so a password containing ``@`` is hidden whole.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s'\"]*):[^/\s'\"]*@")


#: libpq also takes the password as a URL parameter.
_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&\s'\"]*")


def redact(text: str) -> str:
    """``redis://u:secret@h`` → ``redis://u:***@h``, wherever URLs appear in ``text``: they
    reach logs, ``check``, ``status`` and error reports, and a password must reach none."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _PASSWORD_PARAMETER.sub(r"\1***", text)


def scheme(url: str) -> str:
    """The scheme of ``url`` in lower case, or '' when it has none."""
    return urlsplit(url).scheme.lower() if "://" in url else ""
