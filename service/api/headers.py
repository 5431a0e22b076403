"""Response headers every answer carries (ASGI form: lower-case byte pairs).

The API answers JSON and nothing a browser should render, frame, cache or sniff; the
interactive docs pages (/docs, /redoc) load their script and styles from a CDN, so they
get all but the Content-Security-Policy; the demo page (service/demo/) loads only its own
files and calls only this origin, which its policy says.
"""

from __future__ import annotations

COMMON_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)
JSON_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (*COMMON_HEADERS, JSON_CSP)
DEMO_CSP = (
    b"content-security-policy",
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
)
DEMO_HEADERS: tuple[tuple[bytes, bytes], ...] = (*COMMON_HEADERS, DEMO_CSP)
