"""Rate limits (Flask-Limiter), kept apart so blueprints and the factory share one instance."""

from flask import request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, default_limits=[])


def address_and_username() -> str:
    """Key sign-in limits by the address and the username tried together.

    An attacker guessing at one account is slowed from their own address, while the owner,
    signing in from theirs, is never locked out by someone else's failures.
    """
    username = (request.form.get("username") or "").strip().lower()
    return f"{get_remote_address()}|user:{username}"


def failed(response) -> bool:
    """Count an attempt against a limit only when it failed (a sign-in redirects on success)."""
    return response.status_code != 302
