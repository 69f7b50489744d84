"""Security headers on every page, and the flags of every cookie the site sets."""

from __future__ import annotations

import re
from pathlib import Path

from app import create_app

TEMPLATES = Path(__file__).parent.parent / "templates"


def test_pages_send_a_strict_csp_and_the_other_headers(client):
    response = client.get("/login")
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"


def test_templates_have_nothing_the_csp_would_block():
    for template in TEMPLATES.rglob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template  # inline script
        assert not re.search(r"\son\w+=|hx-on|style=|<style", text), template


def sign_in_remembered(app):
    client = app.test_client()
    app.config["WTF_CSRF_ENABLED"] = False
    form = {"username": "ada", "password": "correct horse", "confirm": "correct horse"}
    client.post("/register", data=form)
    client.post("/logout")
    login = {"username": "ada", "password": "correct horse", "remember": "y"}
    response = client.post("/login", data=login)
    assert response.status_code == 302
    return response.headers.getlist("Set-Cookie")


def test_remember_cookie_has_samesite_and_httponly(tmp_path):
    app = create_app({"TESTING": True, "QUEUE": "immediate"}, instance_path=str(tmp_path))
    remember = [c for c in sign_in_remembered(app) if c.startswith("remember_token=")]
    assert remember and "SameSite=Lax" in remember[0] and "HttpOnly" in remember[0]
    assert "Secure" not in remember[0]


def test_secure_setting_makes_every_cookie_secure(tmp_path):
    app = create_app(
        {"TESTING": True, "QUEUE": "immediate", "SESSION_COOKIE_SECURE": True},
        instance_path=str(tmp_path),
    )
    cookies = sign_in_remembered(app)
    assert {c.split("=")[0] for c in cookies} >= {"session", "remember_token"}
    assert all("; Secure" in c for c in cookies), cookies
