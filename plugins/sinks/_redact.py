"""Keep stream keys out of every message and log line.

An RTMP URL carries a secret: the stream key (the last path component,
``rtmp://host/app/KEY``, or the only one, ``rtmp://host/KEY``), sometimes a
query string (``?token=...``) and sometimes a password
(``rtmp://user:pass@host/...``). Anyone who reads a log with the key can
hijack the channel, so the sink prints only :func:`redact_url` and passes all
foreign text (FFmpeg errors quote the URL) through :func:`scrub`. A command
line is visible to every user of the machine (``ps``), so the URL can also come
from a file (:func:`url_from_file`) or the environment (``AVATAR_RTMP_URL``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from avatar.errors import ConfigError

MASK = "***"


def redact_url(url: str) -> str:
    """``rtmp://host:1935/app/KEY?x=y`` → ``rtmp://host:1935/app/***``.

    The last path component is treated as the key, whatever the number of
    components (``/app/key`` and ``/key`` alike: a server may take the key as
    its only component); a query string, a fragment and a password are masked
    too. Anything that does not parse becomes ``<url redacted>``.
    """
    try:
        parts = urlsplit(str(url))
        port = parts.port  # raises on a malformed port
    except ValueError:
        return "<url redacted>"
    if not parts.scheme or not parts.netloc:
        return "<url redacted>"
    host = parts.hostname or ""
    if port is not None:
        host = f"{host}:{port}"
    if parts.username:
        host = f"{parts.username}:{MASK}@{host}" if parts.password else f"{parts.username}@{host}"
    named = [s for s in parts.path.split("/") if s]
    path = "/" + "/".join([*named[:-1], MASK]) if named else parts.path
    query = f"?{MASK}" if parts.query else ""
    fragment = f"#{MASK}" if parts.fragment else ""
    return f"{parts.scheme}://{host}{path}{query}{fragment}"


def secrets_of(url: str) -> list[str]:
    """The substrings of ``url`` that must never appear in output, longest first."""
    out = [str(url)]
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return out
    named = [s for s in parts.path.split("/") if s]
    if named:
        out += [named[-1], unquote(named[-1])]  # FFmpeg may quote the key decoded
        out.append(named[-1] + ("?" + parts.query if parts.query else ""))
    for part in (parts.query, parts.fragment, parts.password):
        if part:
            out += [part, unquote(part)]
    out += [value for _, value in parse_qsl(parts.query)]  # ?token=VALUE: the value alone too
    # very short "secrets" would shred ordinary words; keys are long in practice
    return sorted({s for s in out if len(s) >= 3}, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` with the URL replaced by its redacted form and every secret masked."""
    text = str(text).replace(str(url), redact_url(url))
    for secret in secrets_of(url)[1:]:
        text = text.replace(secret, MASK)
    return text


def url_from_file(path: str | Path) -> str:
    """The URL in the first non-empty line of ``path`` (a secret kept out of ``ps``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the RTMP URL file {path}: {exc.__class__.__name__}") from None
    url = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not url:
        raise ConfigError(f"the RTMP URL file {path} is empty; put rtmp://host/app/KEY on its first line")
    return url
