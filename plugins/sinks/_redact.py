"""Keep stream keys out of every message and log line.

An RTMP URL carries a secret: the stream key (the last path component,
``rtmp://host/app/KEY``), sometimes a query string (``?token=...``) and
sometimes a password (``rtmp://user:pass@host/...``). Anyone who reads a log
with the key can hijack the channel, so the sink prints only
:func:`redact_url` and passes all foreign text (FFmpeg errors quote the URL)
through :func:`scrub`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

MASK = "***"


def redact_url(url: str) -> str:
    """``rtmp://host:1935/app/KEY?x=y`` → ``rtmp://host:1935/app/***``.

    The last path component is treated as the key when the path has at least
    two components (``/app/key``); a query string and a password are masked
    too. Anything that does not parse becomes ``<url redacted>``.
    """
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<url redacted>"
    if not parts.scheme or not parts.netloc:
        return "<url redacted>"
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if parts.username:
        host = f"{parts.username}:{MASK}@{host}" if parts.password else f"{parts.username}@{host}"
    segments = parts.path.split("/")
    named = [s for s in segments if s]
    if len(named) >= 2:
        path = "/" + "/".join(named[:-1]) + "/" + MASK
    else:
        path = parts.path
    query = f"?{MASK}" if parts.query else ""
    return f"{parts.scheme}://{host}{path}{query}"


def secrets_of(url: str) -> list[str]:
    """The substrings of ``url`` that must never appear in output, longest first."""
    out = [str(url)]
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return out
    named = [s for s in parts.path.split("/") if s]
    if len(named) >= 2:
        out.append(named[-1])
        out.append("/".join(named[-1:]) + ("?" + parts.query if parts.query else ""))
    if parts.query:
        out.append(parts.query)
    if parts.password:
        out.append(parts.password)
    # very short "secrets" would shred ordinary words; keys are long in practice
    return sorted({s for s in out if len(s) >= 3}, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` with the URL replaced by its redacted form and every secret masked."""
    text = str(text).replace(str(url), redact_url(url))
    for secret in secrets_of(url)[1:]:
        text = text.replace(secret, MASK)
    return text
