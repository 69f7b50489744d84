"""tastebud: `create_app()` builds the site; `python app.py` serves it with its job worker."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from flask import Flask, g, render_template, request
from flask_login import LoginManager
from flask_migrate import Migrate, upgrade
from flask_wtf.csrf import CSRFError, CSRFProtect
from sqlalchemy import bindparam, event, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import BadRequest

from rating import (
    admin,
    auth,
    blind,
    crowd,
    database,
    job_kinds,
    job_views,
    jobs,
    me,
    media,
    pool_admin,
    rate,
    server,
    sharing,
    taste,
    upload,
)
from rating.limits import limiter
from rating.models import User, db, site_setting
from rating.pool import size_text
from rating.security import init_security
from rating.settings import load_settings

log = logging.getLogger(__name__)
MIGRATIONS = str(Path(__file__).resolve().parent / "migrations")

csrf = CSRFProtect()
migrate = Migrate()
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Sign in to continue."


# Built once: every signed-in request loads its person, and a prebuilt statement skips the
# query building that Session.get does each time (a fresh session has nothing cached).
USER_BY_ID = select(User).where(User.id == bindparam("id"))


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    """Return the signed-in person from the cookie's "id:token", if the token is current."""
    number, _, token = user_id.partition(":")
    found = number.isdigit() and token
    user = db.session.scalars(USER_BY_ID, {"id": int(number)}).first() if found else None
    return (
        user
        if user is not None and secrets.compare_digest(user.session_token or "", token)
        else None
    )


def create_app(test_config: dict | None = None, instance_path: str | None = None) -> Flask:
    """Build the app: settings, extensions, blueprints, error pages; migrate the database."""
    instance_path = instance_path or os.environ.get("TASTEBUD_INSTANCE_PATH") or None
    app = Flask(__name__, instance_path=instance_path, instance_relative_config=True)
    load_settings(app, test_config)

    db.init_app(app)
    app.teardown_appcontext(database.end_session)  # before Flask-SQLAlchemy's (registered first)
    migrate.init_app(app, db, directory=MIGRATIONS, render_as_batch=True)
    csrf.init_app(app)
    login_manager.init_app(app)
    limiter.init_app(app)
    init_security(app)
    jobs.init_app(app, job_kinds.KINDS)
    for module in (
        auth,
        rate,
        me,
        crowd,
        admin,
        pool_admin,
        upload,
        media,
        taste,
        blind,
        job_views,
    ):
        app.register_blueprint(module.bp)
    register_error_pages(app)
    app.jinja_env.globals.update(
        site_setting=site_setting,
        size_text=size_text,
        downloads_for=sharing.downloads_for,
        version_url=sharing.version_url,
        share_url=sharing.share_url,
        scorer_reveals=sharing.SCORER_REVEALS,
    )

    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            event.listen(db.engine, "connect", database.tune_sqlite)
        else:  # a server: a connection it dropped (a restart) is replaced
            database.ping_after_idle(db.engine, app.config["DATABASE_IDLE_PING"])
        if app.config["AUTO_MIGRATE"]:
            with database.migration_lock():
                upgrade(directory=MIGRATIONS)
    return app


def register_error_pages(app: Flask) -> None:
    """Answer errors with a page (or an htmx fragment) that says what to do next."""
    hints = {
        400: ("That request was not understood.", "Reload the page and try again."),
        403: ("That is not allowed for your account.", "Ask an admin if you need access."),
        404: ("Nothing here.", "It may have been removed, or it is not yours to see."),
        413: ("That upload is too large.", "Send a smaller file."),
        429: ("Too many attempts.", "Wait a minute, then try again."),
        500: ("Something went wrong on our side.", "Your ratings are safe; try again."),
        503: (
            "The job queue can't be reached right now.",
            "If it keeps happening, tell the site's admin: the queue (Redis) may be down.",
        ),
    }

    def render_error(error):
        code = getattr(error, "code", 500) or 500
        if code >= 500:
            db.session.rollback()
        title, hint = hints.get(code, (getattr(error, "name", "Error"), "Go back and try again."))
        detail = getattr(error, "description", "") if code in (400, 403, 429, 503) else ""
        if code == 400 and detail != BadRequest.description and not isinstance(error, CSRFError):
            # a form refused with its reason: the person fixes it, nothing to reload
            title = "Please check what you entered."
            hint = (
                "Correct it and send it again; what you typed is still in the form."
                if request.headers.get("HX-Request")
                else "Go back, correct it and send it again."
            )
        context = dict(code=code, title=title, hint=hint, detail=detail)
        if not request.headers.get("HX-Request"):
            return render_template("error.html", **context), code
        # htmx: show the message above the page and leave what is on screen as it is
        headers = {"HX-Retarget": "#notice", "HX-Reswap": "innerHTML"}
        return render_template("_error.html", **context), code, headers

    for code in hints:
        app.register_error_handler(code, render_error)

    def database_away(error):
        """The database did not answer (restarting, unreachable, or locked too long): say so
        with a page that needs no database, and ask the browser to try again."""
        log.warning("database error on %s %s: %s", request.method, request.path, error)
        try:
            db.session.rollback()
        except Exception:  # the connection is gone; the pool replaces it on the next checkout
            pass
        g._login_user = login_manager.anonymous_user()  # rendering must not ask who is signed in
        context = dict(
            code=503,
            title="The database can't be reached right now.",
            detail="What the site already confirmed is kept; this last action may not have been.",
            hint="Try again in a moment; if it keeps happening, tell the site's admin.",
            database_away=True,
        )
        headers = {"Retry-After": "5"}
        if not request.headers.get("HX-Request"):
            return render_template("error.html", **context), 503, headers
        headers |= {"HX-Retarget": "#notice", "HX-Reswap": "innerHTML"}
        return render_template("_error.html", **context), 503, headers

    for away in (OperationalError, InterfaceError, PoolTimeout):
        app.register_error_handler(away, database_away)


def main() -> None:
    """Serve the site with waitress (WEB_PROCESSES processes) and run the job worker here."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app()
    host, port = app.config["HOST"], int(app.config["PORT"])
    with app.app_context():
        first_start = db.session.scalar(db.select(db.func.count(User.id))) == 0
    processes = server.web_processes(app)
    web = server.ServerProcesses(host, port, processes).start() if processes > 1 else None
    consumer = sweeper = None
    if app.config["QUEUE"] != "immediate":
        with app.app_context():
            found = jobs.sweep()
        if found["failed"]:
            logging.warning("marked %d job(s) left by a stopped worker as failed", found["failed"])
        sweeper = jobs.Sweeper(app).start()
        if app.config["EMBEDDED_WORKER"]:
            consumer = jobs.start_embedded_worker(app)
    served = f" by {processes} processes" if web else ""
    print(f"tastebud is running on http://{host}:{port}/{served}  (Ctrl-C stops it)", flush=True)
    if first_start:
        print("First start: open that address and create an account; it becomes the admin.")
    try:
        if web is None:
            alone = server.create_server(app, host, port)
            server.settle_heap()
            alone.run()
        else:
            server.stop_on_sigterm()
            web.supervise()
    except KeyboardInterrupt:
        pass
    finally:
        if web is not None:
            web.stop()
        if consumer is not None:
            consumer.stop()
        if sweeper is not None:
            sweeper.stop()


if __name__ == "__main__":
    main()
