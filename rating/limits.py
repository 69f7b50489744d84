"""Rate limits (Flask-Limiter), kept apart so blueprints and the factory share one instance."""

from flask import request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, default_limits=[])


def submitted_username() -> str:
    """Key sign-in limits by the username tried, so one account can't be guessed at from many
    addresses."""
    return "user:" + (request.form.get("username") or "").strip().lower()
