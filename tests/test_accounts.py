"""Accounts: registration, sign-in, roles, CSRF, rate limits, the user CLI."""

from __future__ import annotations

import pytest

from app import create_app
from rating.models import User, db


def test_first_account_is_admin_and_later_ones_are_not(app, site, second_site):
    assert site.register("alice").status_code == 302
    assert second_site.register("bob").status_code == 302
    with app.app_context():
        users = {u.username: u for u in db.session.scalars(db.select(User))}
    assert users["alice"].is_admin and not users["bob"].is_admin


def test_the_register_page_says_what_it_asks_before_it_refuses(client, site):
    page = client.get("/register").get_data(as_text=True)
    assert "This is the site's first account: it becomes the admin" in page
    assert "At least 8 characters" in page and 'autocomplete="new-password"' in page
    assert 'autocomplete="username"' in page
    site.register("alice")
    assert "first account" not in client.get("/register").get_data(as_text=True)


def test_password_is_stored_hashed(app, site):
    site.register("alice", "a long secret phrase")
    with app.app_context():
        user = db.session.scalar(db.select(User))
        assert "a long secret phrase" not in user.password_hash
        assert user.check_password("a long secret phrase")
        assert not user.check_password("wrong")


def test_register_validates_and_says_what_is_wrong(site):
    response = site.post("/register", {"username": "x", "password": "short", "confirm": "other"})
    html = response.get_data(as_text=True)
    assert response.status_code == 400
    assert "Use 3 to 40 characters for your username." in html
    assert "Use 8 to 200 characters for your password." in html
    assert "The passwords differ." in html


def test_username_taken_ignoring_case(site, second_site):
    site.register("Alice")
    response = second_site.register("alice")
    assert response.status_code == 400
    assert "That username is taken." in response.get_data(as_text=True)


def test_sign_in_and_out(site, client):
    site.register("alice")
    site.logout()
    assert client.get("/rate").status_code == 302  # back to the sign-in page
    wrong = site.login("alice", "not the password")
    assert wrong.status_code == 400
    assert "Wrong username or password." in wrong.get_data(as_text=True)
    assert site.login("alice").status_code == 302
    assert client.get("/rate").status_code == 200


def test_sign_in_does_not_redirect_off_site(site, client):
    site.register("alice")
    site.logout()
    token = site.token()
    response = client.post(
        "/login?next=https://evil.example/",
        data={"csrf_token": token, "username": "alice", "password": "correct horse battery"},
    )
    assert response.headers["Location"] == "/"


def test_post_without_csrf_token_is_refused(site, client):
    site.register("alice")
    response = client.post("/logout")
    assert response.status_code == 400
    assert client.get("/rate").status_code == 200  # still signed in


def test_htmx_post_needs_the_csrf_header_or_field(admin_site, client):
    response = client.post("/rate/1", data={"stars": 3}, headers={"HX-Request": "true"})
    assert response.status_code == 400
    assert response.headers["HX-Retarget"] == "#notice"


def test_login_attempts_are_rate_limited(tmp_path):
    app = create_app(
        {"TESTING": True, "QUEUE": "immediate", "LOGIN_RATE_LIMIT": "3 per minute"},
        instance_path=str(tmp_path),
    )
    client = app.test_client()
    app.config["WTF_CSRF_ENABLED"] = False
    codes = [
        client.post("/login", data={"username": "alice", "password": "guess"}).status_code
        for _ in range(4)
    ]
    assert codes == [400, 400, 400, 429]


def test_disabled_account_cannot_sign_in(app, site, second_site):
    site.register("admin")
    second_site.register("bob")
    with app.app_context():
        bob = db.session.scalar(db.select(User).where(User.username == "bob"))
        bob_id = bob.id
    assert site.post(f"/admin/users/{bob_id}", {"action": "disable"}).status_code == 302
    second_site.logout()
    assert second_site.login("bob").status_code == 400


def test_admin_pages_are_for_admins_only(site, second_site, client):
    site.register("admin")
    second_site.register("bob")
    assert second_site.client.get("/admin/").status_code == 403
    assert second_site.post("/admin/demo", {"count": 3}).status_code == 403
    assert client.get("/admin/").status_code == 200


def test_admin_cannot_demote_self(app, site):
    site.register("admin")
    response = site.post("/admin/users/1", {"action": "remove_admin"}, follow_redirects=True)
    assert "cannot change your own role" in response.get_data(as_text=True)
    with app.app_context():
        assert db.session.get(User, 1).is_admin


@pytest.mark.parametrize("admin", [True, False])
def test_cli_creates_users(app, runner, admin):
    runner.invoke(args=["user", "create", "first", "--password", "first password"])
    args = ["user", "create", "carol", "--password", "long enough"] + (["--admin"] if admin else [])
    result = runner.invoke(args=args)
    assert result.exit_code == 0, result.output
    with app.app_context():
        carol = db.session.scalar(db.select(User).where(User.username == "carol"))
        assert carol.is_admin is admin
        assert carol.check_password("long enough")


def test_cli_refuses_bad_accounts(runner):
    result = runner.invoke(args=["user", "create", "x y", "--password", "short"])
    assert result.exit_code != 0
    assert "at least 8 characters" in result.output and "Usernames are" in result.output


@pytest.mark.sqlite
def test_database_file_is_readable_by_its_owner_only(tmp_path):
    (tmp_path / "instance").mkdir()
    old = tmp_path / "instance" / "tastebud.db"
    old.touch(mode=0o644)  # as an older version left it
    old.chmod(0o644)
    app = create_app({"TESTING": True, "QUEUE": "immediate"}, instance_path=str(old.parent))
    with app.app_context():
        db.session.execute(db.text("select 1"))
        db.engine.dispose()
    assert old.stat().st_mode & 0o777 == 0o600  # password hashes and the civitai key
    fresh = create_app({"TESTING": True, "QUEUE": "immediate"}, instance_path=str(tmp_path / "new"))
    with fresh.app_context():
        db.engine.dispose()
    assert (tmp_path / "new" / "tastebud.db").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "new" / "secret_key").stat().st_mode & 0o777 == 0o600


def test_simultaneous_first_registrations_make_exactly_one_admin(tmp_path):
    import threading

    from tests.conftest import Site

    app = create_app(
        {
            "TESTING": True,
            "QUEUE": "immediate",
            "SECRET_KEY": "x",
            "REGISTER_RATE_LIMIT": "99/minute",
        },
        instance_path=str(tmp_path),
    )
    sites = [Site(app.test_client()) for _ in range(8)]
    tokens = [site.token() for site in sites]  # every form loaded before anyone submits
    start, codes = threading.Barrier(len(sites)), []

    def register(site: Site, token: str, name: str) -> None:
        start.wait()
        form = {"username": name, "password": "correct horse", "confirm": "correct horse"}
        codes.append(site.client.post("/register", data=form | {"csrf_token": token}).status_code)

    threads = [
        threading.Thread(target=register, args=(s, t, f"user{i}"))
        for i, (s, t) in enumerate(zip(sites, tokens, strict=True))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert codes == [302] * 8
    with app.app_context():
        users = db.session.scalars(db.select(User)).all()
        assert len(users) == 8
        assert sum(u.is_admin for u in users) == 1
        assert sum(bool(u.founder) for u in users) == 1
        db.engine.dispose()


def test_someone_elses_failures_never_lock_the_owner_out(tmp_path):
    app = create_app(
        {"TESTING": True, "QUEUE": "immediate", "LOGIN_RATE_LIMIT": "3 per minute"},
        instance_path=str(tmp_path),
    )
    app.config["WTF_CSRF_ENABLED"] = False
    owner, attacker = app.test_client(), app.test_client()
    form = {"username": "alice", "password": "correct horse", "confirm": "correct horse"}
    assert owner.post("/register", data=form).status_code == 302
    owner.post("/logout")
    guesses = [
        attacker.post(
            "/login",
            data={"username": "alice", "password": f"guess {i}"},
            environ_base={"REMOTE_ADDR": "10.9.9.9"},
        ).status_code
        for i in range(5)
    ]
    assert guesses == [400, 400, 400, 429, 429]  # the attacker is slowed...
    signed_in = owner.post("/login", data={"username": "alice", "password": "correct horse"})
    assert signed_in.status_code == 302  # ...and the owner, from their own address, is not


def test_sign_out_ends_a_copied_session_cookie(site, client):
    site.register("alice")
    assert client.get("/rate").status_code == 200
    copied = client.get_cookie("session").value
    site.logout()
    client.set_cookie("session", copied)  # the cookie as it was before signing out
    assert client.get("/rate").status_code == 302  # back to sign-in: it no longer works
    site.login("alice")
    assert client.get("/rate").status_code == 200


def test_unknown_and_known_usernames_cost_the_same_hashing(app, site, monkeypatch):
    site.register("alice")
    site.logout()
    import rating.auth

    checked = []
    real = rating.auth.check_password_hash
    monkeypatch.setattr(
        rating.auth, "check_password_hash", lambda h, p: checked.append(h) or real(h, p)
    )
    site.login("nobody", "wrong password")
    site.login("alice", "wrong password")
    assert len(checked) == 2  # a hash is checked for the unknown name too
    assert checked[0] == rating.auth.DUMMY_HASH and checked[1] != checked[0]


def test_registration_is_rate_limited(tmp_path):
    app = create_app(
        {"TESTING": True, "QUEUE": "immediate", "REGISTER_RATE_LIMIT": "2 per minute"},
        instance_path=str(tmp_path),
    )
    app.config["WTF_CSRF_ENABLED"] = False
    client = app.test_client()
    codes = [
        client.post("/register", data={"username": f"u{i}", "password": "x"}).status_code
        for i in range(3)
    ]
    assert codes == [400, 400, 429]
