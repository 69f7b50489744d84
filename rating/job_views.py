"""Every job's page and widget, in one place: its progress (polled until it ends), Cancel, and,
per kind, what it shows of its results. Only a job's owner reaches it; anyone else gets 404."""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, make_response, redirect, request, url_for
from flask_login import current_user, login_required

from rating import jobs
from rating.models import Job, get_or_404
from rating.rate import page_or_fragment

bp = Blueprint("jobs", __name__, url_prefix="/jobs")

GENERIC = "_job.html"  # a bar, a tally and the failures: imports, the demo pack, the crowd
# kind → (its widget's template, what else the template needs); see `widget`
WIDGETS: dict[str, tuple[str, Callable[[Job], dict]]] = {}


def widget(kind: str, template: str, context: Callable[[Job], dict]) -> None:
    """Show jobs of `kind` with their own template, given `context(job)` besides the job."""
    WIDGETS[kind] = (template, context)


def job_widget(job: Job):
    """Render a job's widget (or its page); tell the page when the job ends (HX-Trigger
    job-finished) or has moved to another phase than the widget showed (job-phase)."""
    jobs.fail_if_orphaned(job)  # a dead worker's job must not poll as "running" forever
    template, context = WIDGETS.get(job.kind, (GENERIC, lambda _job: {}))
    shown = {"job": job, "widget": template} | context(job)
    response = make_response(page_or_fragment("job.html", template, **shown))
    seen = request.args.get("phase")  # the phase the polling widget showed
    if job.done:
        response.headers["HX-Trigger"] = "job-finished"  # the page refreshes what changed
    elif seen is not None and seen != job.phase:
        response.headers["HX-Trigger"] = "job-phase"
    return response


@bp.get("/<int:job_id>")
@login_required
def show(job_id: int):
    """Show my job's progress (its widget polls this until the job ends)."""
    return job_widget(get_or_404(Job, job_id, owner=current_user))


@bp.post("/<int:job_id>/cancel")
@login_required
def cancel(job_id: int):
    """Ask my job to stop; what it finished before is kept."""
    found = get_or_404(Job, job_id, owner=current_user)
    if not found.done:
        jobs.request_stop(found)
    if not request.headers.get("HX-Request"):
        return redirect(url_for("jobs.show", job_id=found.id))
    return job_widget(found)
