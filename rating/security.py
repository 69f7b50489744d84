"""Security headers and cookie flags (Flask-Talisman), in one place."""

from __future__ import annotations

from flask import Flask
from flask_talisman import Talisman

# Everything the site loads is its own: htmx and keys.js are static files, and there is no
# inline script, inline style or eval (htmx's allowEval is off, its indicator styles live in
# style.css), so the policy needs no 'unsafe-*' exception.
CONTENT_SECURITY_POLICY = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data: blob:",
    "connect-src": "'self'",
    "object-src": "'none'",
    "base-uri": "'self'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
}

talisman = Talisman()


def init_security(app: Flask) -> None:
    """Send CSP, frame, content-type and referrer headers; set every cookie's flags."""
    secure = bool(app.config["SESSION_COOKIE_SECURE"])
    talisman.init_app(
        app,
        force_https=False,  # self-hosted, often on plain HTTP on a LAN; TLS is the proxy's job
        strict_transport_security=secure,  # only sent over HTTPS anyway
        frame_options="DENY",
        content_security_policy=CONTENT_SECURITY_POLICY,
        referrer_policy="same-origin",
        session_cookie_secure=secure,
        session_cookie_http_only=True,
        session_cookie_samesite=app.config["SESSION_COOKIE_SAMESITE"],
    )
    # Flask-Login's remember-me cookie: the same flags as the session cookie.
    app.config.setdefault("REMEMBER_COOKIE_SECURE", secure)
    app.config.setdefault("REMEMBER_COOKIE_HTTPONLY", True)
    app.config.setdefault("REMEMBER_COOKIE_SAMESITE", app.config["SESSION_COOKIE_SAMESITE"])
