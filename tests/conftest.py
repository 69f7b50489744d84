"""Fixtures: an app with its own instance folder and database per test, and a browser-ish client."""

from __future__ import annotations

import gc
import itertools
import re
import warnings
from types import SimpleNamespace

import pytest

from app import create_app
from rating.models import Image, db

DATABASES = itertools.count()
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"|"X-CSRFToken": "([^"]+)"')


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Run the suite's tiny nets on one CPU thread, then give torch its thread count back."""
    # Models this small gain nothing from a second thread, and on a busy 2-core machine the
    # OpenMP threads wait on each other: steps took ten times longer with two than with one.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption(
        "--services",
        action="store_true",
        help="run against real PostgreSQL and Redis servers started here (tests/services.py)",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked `services` need the real servers: without --services they are skipped; those
    marked `sqlite` check the SQLite file itself: with --services they are."""
    on = config.getoption("--services")
    skip = pytest.mark.skip(reason="about SQLite" if on else "needs --services (make test)")
    for item in items:
        if ("sqlite" if on else "services") in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def services(request):
    """The real PostgreSQL and Redis servers of a --services run (None otherwise)."""
    if not request.config.getoption("--services"):
        yield None
        return
    from tests.services import Postgres, Redis

    postgres = Postgres()
    try:
        redis = Redis()
    except BaseException:
        postgres.close()
        raise
    yield SimpleNamespace(postgres=postgres, redis=redis)
    postgres.close()
    redis.close()


@pytest.fixture(autouse=True)
def on_services(services, monkeypatch):
    """In a --services run, give each test a fresh PostgreSQL database and an empty Redis,
    through the settings' environment variables, so every app the test builds uses them."""
    if services is None:
        yield None
        return
    name = f"test_{next(DATABASES)}"
    monkeypatch.setenv("TASTEBUD_DATABASE_URL", services.postgres.create_database(name))
    monkeypatch.setenv("TASTEBUD_REDIS_URL", services.redis.url())
    services.redis.flush()
    yield services
    with warnings.catch_warnings():  # an app the test built and dropped still holds connections
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    services.postgres.drop_database(name)


@pytest.fixture
def app(tmp_path):
    """Return an app on a fresh instance folder, running jobs synchronously."""
    app = create_app(
        {"TESTING": True, "QUEUE": "immediate", "DEMO_PACK_SIZE": 12, "SECRET_KEY": "test"},
        instance_path=str(tmp_path / "instance"),
    )
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def client(app):
    """Return a test client."""
    return app.test_client()


@pytest.fixture
def runner(app):
    """Return a CLI runner for `flask` commands."""
    return app.test_cli_runner()


class Site:
    """Drive the site as a person would: fetch a page for its CSRF token, then post."""

    def __init__(self, client):
        self.client = client

    def token(self) -> str:
        """Read the CSRF token from a page, as a browser form would carry it."""
        html = self.client.get("/login").get_data(as_text=True)
        match = TOKEN.search(html)
        assert match, "no CSRF token on the page"
        return match.group(1) or match.group(2)

    def post(self, url: str, data: dict | None = None, htmx: bool = False, **kwargs):
        """POST with the CSRF token; `htmx` sends the HX-Request header like htmx does."""
        headers = kwargs.pop("headers", {})
        if htmx:
            headers["HX-Request"] = "true"
        payload = {"csrf_token": self.token(), **(data or {})}
        return self.client.post(url, data=payload, headers=headers, **kwargs)

    def register(self, username: str, password: str = "correct horse battery"):
        """Create an account (signed in afterwards)."""
        return self.post(
            "/register", {"username": username, "password": password, "confirm": password}
        )

    def login(self, username: str, password: str = "correct horse battery"):
        """Sign in."""
        return self.post("/login", {"username": username, "password": password})

    def logout(self):
        """Sign out."""
        return self.post("/logout")


@pytest.fixture
def site(client):
    """Return a Site driving the test client."""
    return Site(client)


@pytest.fixture
def admin_site(app, site):
    """Return a Site signed in as the first account (the admin), with a demo pool loaded."""
    site.register("admin")
    response = site.post("/admin/demo", {"count": 12})
    assert response.status_code == 302
    with app.app_context():
        assert db.session.scalar(db.select(db.func.count(Image.id))) == 12
    return site


@pytest.fixture
def second_site(app):
    """Return a second person's Site (a separate cookie jar)."""
    return Site(app.test_client())
