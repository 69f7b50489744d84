"""Accounts: register, sign in, sign out, and the `flask user create` command."""

from __future__ import annotations

from functools import wraps
from urllib.parse import urlsplit

import click
from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash
from wtforms import BooleanField, PasswordField, StringField
from wtforms.validators import EqualTo, InputRequired, Length, Regexp, ValidationError

from rating.limits import address_and_username, failed, limiter
from rating.models import User, db

bp = Blueprint("auth", __name__, cli_group="user")

USERNAME_RULES = [
    InputRequired(),
    Length(3, 40, message="Use 3 to 40 characters for your username."),
    Regexp(r"^[A-Za-z0-9_.-]+$", message="Use letters, digits, dot, dash or underscore."),
]


class LoginForm(FlaskForm):
    username = StringField("Username", [InputRequired(), Length(max=40)])
    password = PasswordField("Password", [InputRequired(), Length(max=200)])
    remember = BooleanField("Keep me signed in")


class RegisterForm(FlaskForm):
    username = StringField("Username", USERNAME_RULES)
    password = PasswordField(
        "Password",
        [InputRequired(), Length(8, 200, message="Use 8 to 200 characters for your password.")],
    )
    confirm = PasswordField("Repeat password", [EqualTo("password", "The passwords differ.")])

    def validate_username(self, field):
        """Refuse a name that is taken, whatever its case."""
        if find_user(field.data):
            raise ValidationError("That username is taken.")


def find_user(username: str) -> User | None:
    """Return the account with this username, ignoring case."""
    name = (username or "").strip().lower()
    return db.session.scalar(select(User).where(func.lower(User.username) == name))


def create_user(username: str, password: str, *, admin: bool = False) -> User:
    """Create an account; the first account on a site is always an admin, and only it."""
    first = db.session.scalar(select(func.count(User.id))) == 0
    user = User(username=username.strip(), is_admin=admin or first, founder=first or None)
    user.set_password(password)
    db.session.add(user)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        if not first:
            raise  # the username was taken a moment ago: not ours to paper over
        # Several first registrations at once: the database let one be the founder.
        return create_user(username, password, admin=admin)
    return user


def admin_required(view):
    """Let only admins through; others get 403."""

    @wraps(view)
    @login_required
    def wrapped(*args, **kwargs):
        if not current_user.is_admin:
            abort(403)
        return view(*args, **kwargs)

    return wrapped


def safe_next(target: str | None) -> str:
    """Return `target` if it is a path on this site, else the home page (no open redirects)."""
    parts = urlsplit(target or "")
    if target and not parts.scheme and not parts.netloc and target.startswith("/"):
        return target
    return url_for("rate.home")


@bp.route("/register", methods=["GET", "POST"])
@limiter.limit(lambda: current_app.config["REGISTER_RATE_LIMIT"], methods=["POST"])
def register():
    """Create an account and sign in."""
    if not current_app.config["ALLOW_REGISTRATION"]:
        abort(403)
    form = RegisterForm()
    if form.validate_on_submit():
        user = create_user(form.username.data, form.password.data)
        login_user(user)
        flash(f"Welcome, {user.username}!" + (" You are the admin." if user.is_admin else ""))
        return redirect(url_for("rate.home"))
    first_account = db.session.scalar(select(func.count(User.id))) == 0
    return (
        render_template("auth/register.html", form=form, first_account=first_account),
        400 if form.errors else 200,
    )


def login_limit() -> str:
    """The sign-in rate limit, from settings."""
    return current_app.config["LOGIN_RATE_LIMIT"]


# A hash of a password nobody has: an unknown username costs the same hashing as a known one,
# so the time of a failed sign-in doesn't tell whether the account exists.
DUMMY_HASH = generate_password_hash("not a real password")


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(login_limit, methods=["POST"], deduct_when=failed)
@limiter.limit(login_limit, methods=["POST"], key_func=address_and_username, deduct_when=failed)
def login():
    """Sign in with a username and password."""
    form = LoginForm()
    if form.validate_on_submit():
        user = find_user(form.username.data)
        matches = check_password_hash(
            user.password_hash if user else DUMMY_HASH, form.password.data
        )
        if user and matches and user.is_active:
            login_user(user, remember=form.remember.data)
            return redirect(safe_next(request.args.get("next")))
        form.password.errors.append("Wrong username or password.")
    return render_template("auth/login.html", form=form), 400 if form.errors else 200


@bp.route("/logout", methods=["POST"])
def logout():
    """Sign out everywhere: every session and remember-me cookie of this account ends."""
    if current_user.is_authenticated:
        current_user.new_session_token()  # cookies copied before now name the old token
        db.session.commit()
    logout_user()
    flash("Signed out.")
    return redirect(url_for("auth.login"))


@bp.cli.command("create")
@click.argument("username")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option("--admin", is_flag=True, help="Make the account an admin.")
def create_command(username: str, password: str, admin: bool) -> None:
    """Create an account: flask --app app user create NAME [--admin]."""
    problems = list(_check_new_account(username, password))
    if problems:
        raise click.ClickException(" ".join(problems))
    user = create_user(username, password, admin=admin)
    click.echo(f"created {user.username}" + (" (admin)" if user.is_admin else ""))


def _check_new_account(username: str, password: str):
    if find_user(username):
        yield f"The username {username!r} is taken."
    if len(password) < 8:
        yield "The password needs at least 8 characters."
    if not USERNAME_RULES[2].regex.match(username) or not 3 <= len(username) <= 40:
        yield "Usernames are 3–40 letters, digits, dots, dashes or underscores."
