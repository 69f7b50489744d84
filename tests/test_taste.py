"""My taste: one button runs encode → scorer → LoRA → results as one GPU job, live, cancellable.

Most tests share one site on the real SQLite queue with its worker threads (light queue and
GPU queue), a demo pool, and the real trainer on the demo model with tiny settings.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import weakref
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app import create_app
from rating import jobs, taste_files
from rating.jobs import JobProgress
from rating.models import Image, Job, TasteVersion, User, db, utcnow
from rating.taste_jobs import new_version
from tests.conftest import Site
from tests.widgets import job_state
from trainer.lora import TasteLoraConfig

# Small enough that a whole run takes seconds on one CPU thread.
TINY = {
    "TASTE_SCORER": {"channels": [8, 16, 32, 64], "epochs": 2, "batch_size": 16},
    "TASTE_LORA": {
        "steps": 4,
        "eval_every": 2,
        "eval_prompts": 2,
        "eval_seeds": [0],
        "sample_steps": 4,
        "window": 2,
        "batch_size": 2,
    },
    "TASTE_GRID_PROMPTS": 2,
    "TASTE_GRID_SEEDS": 1,
    "TASTE_SAMPLE_STEPS": 2,
    "TASTE_BLIND_PAIRS": 4,
    "TASTE_PREDICT_POOL": 12,
    "TASTE_REFINE": {"steps": 3},
    "TORCH_THREADS": 1,  # a shared 2-core CPU: spinning OpenMP threads cost 10× here
}
POOL = 48
RATED = 40
JOB_SECONDS = 180  # the longest any one job may take before a test gives up
FINAL = ("succeeded", "failed", "cancelled")
ROOT = Path(__file__).resolve().parents[1]


def wait_for(check, what: str, timeout: float = JOB_SECONDS):
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def widget(site: Site, job_id: int) -> tuple[str, str, str]:
    """Fetch a job's widget as htmx polls it; return (html, status, phase)."""
    html = site.client.get(f"/jobs/{job_id}", headers={"HX-Request": "true"}).get_data(as_text=True)
    state = job_state(html)
    return html, state.status, state.phase


def fetch(site: Site, url: str):
    """GET a URL and close the response (a file download holds its file open until then)."""
    with site.client.get(url) as response:
        response.get_data()  # read now; the body stays readable after the close
    return response


def click_train(site: Site) -> int:
    """Press "Train my taste"; return the job id the widget shows."""
    response = site.post("/taste/train", htmx=True)
    assert response.status_code == 200, response.get_data(as_text=True)
    return job_state(response.get_data(as_text=True)).id


def wait_until_done(site: Site, job_id: int) -> tuple[str, str, str]:
    """Poll the widget until the job ends, as the page does; return the last answer."""
    return wait_for(
        lambda: (found := widget(site, job_id))[1] in FINAL and found, f"job {job_id} to end"
    )


@pytest.fixture(scope="module")
def site_app(tmp_path_factory):
    """Serve a site on the real queue with its workers, and a demo pool loaded by its admin."""
    instance = tmp_path_factory.mktemp("taste") / "instance"
    config = {
        "SECRET_KEY": "test",
        "QUEUE": "sqlite",
        "REDIS_URL": "",
        "DATABASE_URL": "",
        "STORAGE_ROOT": "",
        "BASE_MODEL": "demo",
        "SCORER_INIT": "",
        "REGISTER_RATE_LIMIT": "1000 per minute",  # one address registers everyone here
        **TINY,
    }
    app = create_app(config, instance_path=str(instance))
    app.config["TEST_SETTINGS"] = config  # for the subprocess worker below
    workers = jobs.start_embedded_worker(app)
    admin = Site(app.test_client())
    admin.register("admin")
    admin.post("/admin/demo", {"count": POOL})
    with app.app_context():
        count = lambda: db.session.scalar(select(func.count(Image.id)))  # noqa: E731
        wait_for(lambda: count() == POOL, "the demo pack")
    app.config["ADMIN_SITE"] = admin
    yield app
    workers.stop(graceful=True)
    with app.app_context():
        db.engine.dispose()


def person(app, name: str, rated: int = RATED) -> Site:
    """Register someone who rated the first `rated` images of the pool, through the site."""
    site = Site(app.test_client())
    site.register(name)
    with app.app_context():
        ids = db.session.scalars(select(Image.id).order_by(Image.id).limit(rated)).all()
    for n, image_id in enumerate(ids):
        # stars follow the image's style a little, so the scorer has something to find
        stars = 1 + (image_id * 7 + n) % 5
        assert site.post(f"/rate/{image_id}", {"stars": stars}).status_code == 200
    return site


def version_of(app, job_id: int) -> TasteVersion:
    """Return the taste version a job made (loaded in a fresh session)."""
    with app.app_context():
        version = db.session.scalar(select(TasteVersion).where(TasteVersion.job_id == job_id))
        db.session.expunge_all()
        return version


class Gate:
    """Holds a train_taste job at its first progress report inside one phase."""

    def __init__(self):
        self.phase = None
        self.reached, self.release = threading.Event(), threading.Event()


@pytest.fixture
def gate(monkeypatch):
    """Let a test press Cancel while the job is certainly inside the phase it names."""
    held = Gate()
    report = JobProgress.report  # every report: the job's own and the trainers'

    def waiting(self, step, total, message="", shown=""):
        if self.job.kind == "train_taste" and self.job.phase == held.phase:
            held.reached.set()
            held.release.wait(timeout=JOB_SECONDS)
        return report(self, step, total, message, shown)

    monkeypatch.setattr(JobProgress, "report", waiting)
    yield held
    held.release.set()


# ---- the whole flow -----------------------------------------------------------------------


def test_train_my_taste_from_ratings_to_a_downloaded_lora(site_app, tmp_path, monkeypatch):
    counted = []  # (step, total) the results phase reports: one bar, never starting over
    report = JobProgress.report

    def recorded(progress, step, total, message="", shown=""):
        if progress.job.kind == "train_taste" and progress.job.phase == "results":
            counted.append((step, total))
        report(progress, step, total, message, shown)

    monkeypatch.setattr(JobProgress, "report", recorded)
    ada = person(site_app, "ada")
    with site_app.app_context():  # two picks between images she never rated: they count too
        ids = db.session.scalars(select(Image.id).order_by(Image.id).offset(RATED).limit(4)).all()
    for a, b in zip(ids[::2], ids[1::2], strict=True):
        assert ada.post(f"/pairs/{a}/{b}", {"outcome": "a"}).status_code == 200
    page = ada.client.get("/taste/").get_data(as_text=True)
    assert re.search(r'id="train-button" data-ready="true"\s*>Train my taste<', page)  # enabled
    assert "demo model" in page and f"Uses your {RATED + 2} ratings and picks" in page

    job_id = click_train(ada)
    assert click_train(ada) == job_id  # a second click shows the same job
    with site_app.app_context():
        owner = db.session.scalar(select(User).where(User.username == "ada"))
        assert db.session.scalar(select(func.count(Job.id)).where(Job.owner_id == owner.id)) == 1

    html, status, phase = wait_until_done(ada, job_id)
    assert status == "succeeded", html
    assert html.count('data-state="done"') == 4 and "Held-out SRCC" in html
    grid_renders, blind_pictures = 4 * TINY["TASTE_GRID_PROMPTS"], 2 * TINY["TASTE_BLIND_PAIRS"]
    assert {total for _, total in counted} == {grid_renders + blind_pictures + 1}
    steps = [step for step, _ in counted]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == counted[-1][1]
    version = version_of(site_app, job_id)
    assert version.complete and version.ratings_count == RATED and version.is_demo
    assert version.picks_count == 2 and version.metrics["encoded"]["picked_only"] == 4
    assert version.metrics["love"][0]["spread"] >= 0  # how sure, with each guess
    active = version.metrics["active"]
    assert active["informative"] and active["edge_of_top"] and 1 <= active["top_edge_stars"] <= 5
    assert active["coin_flips"] and all(len(pair) == 2 for pair in active["coin_flips"])
    assert set(version.metrics["seconds"]) == {"encode", "scorer", "lora", "results"}
    assert version.metrics["family"] == "Stable Diffusion 1.x"  # the demo world's structure

    # The results: a grid of base vs LoRA at 0.5, 1 and −1, each image with its score.
    page = ada.client.get("/taste/").get_data(as_text=True)
    cells = TINY["TASTE_GRID_PROMPTS"] * TINY["TASTE_GRID_SEEDS"] * 4
    assert page.count('<figure class="cell">') == cells
    assert len(re.findall(r"score <b>\d\.\d\d</b> · demo", page)) == cells
    assert "anti-taste −1" in page and "Score gain" in page and "Drift" in page
    assert 'id="verdict"' in page and "The figures, and what they mean" in page
    blind = version.metrics["blind"]  # a LoRA kept at step 0 draws what the base draws
    assert len(blind["pairs"]) + blind["identical"] == TINY["TASTE_BLIND_PAIRS"]
    assert '<small class="muted"> ±' in page  # the guesses say how sure they are
    cell = fetch(ada, f"/taste/versions/{version.number}/grid/0.png")
    assert cell.status_code == 200 and cell.data.startswith(b"\x89PNG")

    # Downloads with their names; the kohya file loads into a fresh demo pipeline.
    zipped = fetch(ada, f"/taste/versions/{version.number}/download/lora")
    assert zipped.headers["Content-Disposition"] == (
        "attachment; filename=tastebud-ada-taste-v1-lora.zip"
    )
    with zipfile.ZipFile(io.BytesIO(zipped.data)) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path)
    stem = "bundle/tastebud-ada-taste-v1"
    expected = {f"{stem}.safetensors", f"{stem}.json", f"{stem}.preview.png", "bundle/README.md"}
    assert names == expected  # only files every loader reads: no diffusers-format trap
    # The LoRA trained in the default mode, on the pool's latents; the card carries its strength.
    trained = version.metrics["lora"]
    assert trained["mode"] == TasteLoraConfig().mode and trained["unet_passes"] > 0
    card = json.loads((tmp_path / f"{stem}.json").read_text())
    assert card["preferred weight"] == (trained["recommended_strength"] or 1.0)
    with site_app.app_context():
        checkpoint = taste_files.version_folder(version) / version.lora_dir
    assert_kohya_file_loads(tmp_path / "bundle", "tastebud-ada-taste-v1.safetensors", checkpoint)
    assert_other_downloads(ada, version, tmp_path)
    # What each download is, where it goes, and its size.
    shown = ada.client.get(f"/taste/versions/{version.number}").get_data(as_text=True)
    for words in ("models/Lora", "models/loras", "load_lora_weights", "&lt;lora:tastebud-ada"):
        assert words in shown, words
    assert re.search(r"LoRA \.zip</a> <span class=\"muted\">\d+ KiB</span>", shown)

    improve_an_image(site_app, ada)
    others_see_nothing_until_it_is_public(site_app, ada, version, job_id)

    deleted = ada.post(f"/taste/versions/{version.number}/delete")
    assert deleted.status_code == 302
    with site_app.app_context():
        assert not taste_files.version_folder(version).exists()
    assert ada.client.get(f"/taste/versions/{version.number}").status_code == 404


def assert_kohya_file_loads(folder: Path, kohya_name: str, checkpoint: Path) -> None:
    """Load the kohya file, and the trained checkpoint, into fresh demo pipelines: same adapter."""
    from peft.utils import get_peft_model_state_dict

    from trainer.demo_world import load_world

    adapters = []
    for where, weight_name in (
        (folder, kohya_name),
        (checkpoint, "pytorch_lora_weights.safetensors"),
    ):
        pipe = load_world()
        pipe.load_lora_weights(str(where), weight_name=weight_name, adapter_name="taste")
        assert pipe.get_list_adapters() == {"unet": ["taste"]}
        adapters.append(get_peft_model_state_dict(pipe.unet, adapter_name="taste"))
    kohya, diffusers = adapters
    assert kohya.keys() == diffusers.keys() and len(kohya) > 0
    for key, value in diffusers.items():  # kohya files are fp16
        assert (kohya[key].float() - value.float()).abs().max() < 1e-2, key


def assert_other_downloads(site: Site, version: TasteVersion, tmp_path: Path) -> None:
    """The scorer and the latents+scores file download with their names and load again."""
    from trainer.latents import load_latents_file
    from trainer.scorer import load_scorer

    for what, suffix in (("scorer", "scorer"), ("latents", "latents")):
        response = fetch(site, f"/taste/versions/{version.number}/download/{what}")
        name = f"tastebud-ada-taste-v1-{suffix}.safetensors"
        assert response.headers["Content-Disposition"] == f"attachment; filename={name}"
        (tmp_path / name).write_bytes(response.data)
    _, metadata = load_scorer(tmp_path / "tastebud-ada-taste-v1-scorer.safetensors")
    assert json.loads(metadata["input_shape"]) == [4, 8, 8]
    latents = load_latents_file(tmp_path / "tastebud-ada-taste-v1-latents.safetensors")
    assert latents.latents.shape == (RATED, 4, 8, 8) and len(latents.sha256s) == RATED
    assert set(latents.scores.tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def improve_an_image(app, site: Site) -> None:
    """On an image's page, "Improve this image" refines it with my scorer: both scores shown."""
    with app.app_context():
        pool = select(Image).where(Image.hidden.is_(False))  # not a blind-check picture
        image = db.session.scalar(pool.order_by(Image.id.desc()))
        image_id = image.id
    page = site.client.get(f"/taste/images/{image_id}").get_data(as_text=True)
    assert re.search(r'id="improve-button"\s*>', page)  # enabled: I have a scorer
    response = site.post(f"/taste/images/{image_id}/improve", htmx=True)
    job_id = job_state(response.get_data(as_text=True)).id
    html, status, _ = wait_until_done(site, job_id)
    assert status == "succeeded", html
    before = float(re.search(r'class="score-before">([\d.]+)<', html).group(1))
    after = float(re.search(r'class="score-after">([\d.]+)<', html).group(1))
    assert after >= before and "demo model" in html
    assert f'href="/img/{image.sha256}/original"' in html  # the original, beside the two
    for which in ("before", "after"):
        picture = fetch(site, f"/taste/refined/{job_id}/{which}.png")
        assert picture.status_code == 200 and picture.data.startswith(b"\x89PNG")
    app.config["REFINE_JOB"] = job_id


def others_see_nothing_until_it_is_public(app, ada: Site, version: TasteVersion, job_id: int):
    """Another person gets 404 for everything of mine; a public version they may download."""
    bob = Site(app.test_client())
    bob.register("bob")
    base = f"/taste/versions/{version.number}"
    private = [f"{base}", f"{base}/download/lora", f"{base}/download/scorer",
               f"{base}/download/latents", f"{base}/grid/0.png", f"/jobs/{job_id}",
               f"/taste/refined/{app.config['REFINE_JOB']}/after.png"]  # fmt: skip
    for url in private:
        assert bob.client.get(url).status_code == 404, url
    for url in (f"{base}/public", f"{base}/delete", f"/jobs/{job_id}/cancel"):
        assert bob.post(url, {"public": "1"}).status_code == 404, url
    assert "v1" not in bob.client.get("/taste/").get_data(as_text=True)

    shared = ada.post(f"{base}/public", {"public": "1"}, htmx=True).get_data(as_text=True)
    assert "Make private" in shared and "never your ratings" in shared
    link = re.search(r'value="http://localhost(/taste/shared/([\w-]+))"', shared)
    assert link and len(link.group(2)) >= 20  # 128 random bits, not the sequential id
    page = link.group(1)
    client = app.test_client()  # signed out: a share link works for anyone

    class Visitor:
        """Fetch as a signed-out visitor, closing every response (files are streamed)."""

        @staticmethod
        def get(url: str):
            response = client.get(url)
            response.get_data()  # read it all, then let the file go
            response.close()
            return response

    visitor = Visitor()
    seen = visitor.get(page).get_data(as_text=True)
    assert "by ada" in seen and "its owner&#39;s scorer" in seen and "your scorer" not in seen
    assert "/taste/versions/" not in seen and "/jobs/" not in seen  # no owner's URL, no id
    assert visitor.get(f"{page}/grid/0.png").status_code == 200
    lora = visitor.get(f"{page}/download/lora")
    assert lora.status_code == 200 and lora.data.startswith(b"PK")
    # Public is the LoRA, the grid and the figures, never the ratings nor the id-based pages.
    for url in (f"{page}/download/latents", f"{page}/download/scorer", *private[:5]):
        response = visitor.get(url)
        assert response.status_code in (302, 404), url  # 302: the sign-in page
        assert b"latents" not in response.data or response.status_code != 200
    assert "latents + my stars" not in visitor.get(page).get_data(as_text=True)
    assert bob.post(f"{base}/delete").status_code == 404  # public is not theirs to delete
    assert bob.client.get(f"/jobs/{job_id}").status_code == 404
    ada.post(f"{base}/public", {"public": "1", "share_scorer": "1"})  # already public: same link
    ada.post(f"{base}/public", {"public": "0"})
    assert (
        visitor.get(page).status_code == 404
        and visitor.get(f"{page}/download/lora").status_code == 404
    )
    again = ada.post(f"{base}/public", {"public": "1", "share_scorer": "1"}, htmx=True)
    new_page = re.search(
        r'value="http://localhost(/taste/shared/[\w-]+)"', again.get_data(as_text=True)
    )
    assert new_page.group(1) != page  # a new link: the old one stays dead
    assert visitor.get(f"{new_page.group(1)}/download/scorer").status_code == 200
    assert visitor.get(f"{new_page.group(1)}/download/latents").status_code == 404


# ---- cancel, failure, restart -------------------------------------------------------------


@pytest.mark.parametrize("phase", ["encode", "scorer", "lora", "results"])
def test_cancel_works_during_each_phase(site_app, gate, phase):
    site = person(site_app, f"cancel-{phase}")
    gate.phase = phase
    job_id = click_train(site)
    assert gate.reached.wait(JOB_SECONDS), f"the job never reached {phase}"
    html, status, shown = widget(site, job_id)
    assert (status, shown) == ("running", phase) and "Cancel" in html
    version = version_of(site_app, job_id)
    refused = site.post(f"/taste/versions/{version.number}/delete", follow_redirects=True)
    assert "still training" in refused.get_data(as_text=True)

    pressed = site.post(f"/jobs/{job_id}/cancel", htmx=True).get_data(as_text=True)
    assert 'data-status="running"' in pressed  # it stops at its next report
    gate.release.set()
    html, status, shown = wait_until_done(site, job_id)
    assert (status, shown) == ("cancelled", phase), html
    assert 'data-state="cancelled"' in html and "hx-trigger" not in html  # polling stopped

    version = version_of(site_app, job_id)
    assert bool(version.scorer_file) == (phase in ("lora", "results"))
    # What finished before the cancel is kept: a LoRA checkpoint, bundled for download.
    assert bool(version.bundle_file) == (phase in ("lora", "results"))
    assert version.grid_file is None and not version.complete
    with site_app.app_context():
        assert db.session.get(Job, job_id).lock_key is None  # the button works again
        folder = taste_files.version_folder(version)
        recorded = {version.latents_file, version.scorer_file, version.bundle_file}
        expected = {name for name in recorded if name} | {"lora", "bundle"}
        assert {entry.name for entry in folder.iterdir()} <= expected


def test_out_of_memory_retries_once_smaller_then_says_what_to_change(site_app, monkeypatch):
    import torch

    from trainer import lora

    configs, held = [], []

    class Activations:  # what a failed attempt's frames hold: on a GPU, gigabytes
        pass

    def out_of_memory(base, scorer_path, out_dir, config=None, **callbacks):
        configs.append(config)
        held.append(all(alive() is None for alive in held_refs))  # freed before the retry?
        activations = Activations()
        held_refs.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    held_refs: list = []

    monkeypatch.setattr(lora, "train", out_of_memory)
    site = person(site_app, "oom")
    html, status, phase = wait_until_done(site, click_train(site))
    assert (status, phase) == ("failed", "lora")
    assert "out of GPU memory even with gradient checkpointing, batch size 1" in html
    assert "retrying once with gradient checkpointing on, batch size 1 and 1 evaluation" in html
    assert [c.batch_size for c in configs] == [2, 1] and configs[1].gradient_checkpointing
    assert [c.eval_prompts for c in configs] == [2, 1]  # the evaluation's batch shrinks too
    assert held == [True, True]  # the retry starts with the failed attempt's memory released


def test_full_precision_trains_the_lora_without_autocast(site_app, monkeypatch):
    from trainer import lora

    configs = []

    def capture(base, scorer_path, out_dir, config=None, **callbacks):
        configs.append(config)
        raise RuntimeError("captured")

    monkeypatch.setattr(lora, "train", capture)
    site_app.config["PRECISION"] = "full"
    site = person(site_app, "fp32")
    html, status, phase = wait_until_done(site, click_train(site))
    assert (status, phase) == ("failed", "lora") and "captured" in html
    assert [c.mixed_precision for c in configs] == ["no"]  # fp32 weights, fp32 compute


def test_a_failure_says_why_removes_partial_files_and_keeps_the_checkpoint(site_app, monkeypatch):
    from trainer import sample

    def broken_grid(base, scorer, prompts, seeds, *, lora_folder, **options):
        (Path(lora_folder).parents[1] / "grid.png").write_bytes(b"half a picture")
        raise RuntimeError("the renderer ran out of disk")

    monkeypatch.setattr(sample, "grid", broken_grid)
    site = person(site_app, "broken")
    job_id = click_train(site)
    html, status, phase = wait_until_done(site, job_id)
    assert (status, phase) == ("failed", "results")
    assert "Failed: the renderer ran out of disk" in html and '<details class="log"' in html
    version = version_of(site_app, job_id)
    with site_app.app_context():
        assert "RuntimeError" in db.session.get(Job, job_id).error
        folder = taste_files.version_folder(version)
        assert not (folder / "grid.png").exists()  # the partial file is gone
        assert (folder / version.lora_dir / "pytorch_lora_weights.safetensors").is_file()
    assert fetch(site, f"/taste/versions/{version.number}/download/lora").status_code == 200


WORKER = """
import json, sys
from app import create_app
from rating import jobs
app = create_app(json.loads(sys.argv[2]), instance_path=sys.argv[1])
with app.app_context():
    jobs.run_job(int(sys.argv[3]))
"""


def test_a_killed_worker_leaves_no_job_running_and_keeps_its_checkpoint(site_app):
    site = person(site_app, "kim")
    with site_app.app_context():
        owner = db.session.scalar(select(User).where(User.username == "kim"))
        job = Job(kind="train_taste", owner_id=owner.id, lock_key=f"taste:{owner.id}")
        db.session.add(job)
        db.session.commit()
        job_id = job.id
    settings = dict(site_app.config["TEST_SETTINGS"], QUEUE="immediate")
    settings["TASTE_LORA"] = {**TINY["TASTE_LORA"], "steps": 10_000}  # still training when killed
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, site_app.instance_path, json.dumps(settings), str(job_id)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: taste_jobs_checkpoint(site_app, job_id), "the first LoRA checkpoint")
    finally:
        worker.kill()  # SIGKILL: no finally blocks run, as in a power cut or the OOM killer
        worker.wait()
    # the next poll of its widget sees the worker is gone: failed, salvaged, no restart needed
    html, status, phase = widget(site, job_id)
    assert (status, phase) == ("failed", "lora") and "the worker stopped" in html
    restarted = create_app(settings, instance_path=site_app.instance_path)
    with restarted.app_context():
        assert jobs.fail_orphaned_jobs() == 0  # nothing left for a restart to find
        db.engine.dispose()
    version = version_of(site_app, job_id)
    assert version.lora_dir == "lora/checkpoint-000000" and version.bundle_file
    with site_app.app_context():
        assert db.session.get(Job, job_id).lock_key is None


def taste_jobs_checkpoint(app, job_id: int) -> bool:
    """Tell whether a job's version has a complete LoRA checkpoint yet."""
    version = version_of(app, job_id)
    if version is None:
        return False
    with app.app_context():
        folder = taste_files.version_folder(version) / "lora"
        return taste_files.latest_checkpoint(folder) is not None


# ---- the queues ---------------------------------------------------------------------------


def test_an_import_finishes_while_a_training_runs_and_gpu_jobs_wait_their_turn(
    site_app, monkeypatch
):
    started, release = threading.Event(), threading.Event()

    def long_training(job, progress):
        started.set()
        assert release.wait(JOB_SECONDS)
        return {}

    monkeypatch.setitem(jobs.HANDLERS, "train_taste", long_training)
    first, second = person(site_app, "gpu-1"), person(site_app, "gpu-2")
    training = click_train(first)
    assert started.wait(JOB_SECONDS)
    waiting = click_train(second)

    admin = site_app.config["ADMIN_SITE"]
    imported = admin.post("/admin/demo", {"count": 2}, htmx=True).get_data(as_text=True)
    import_id = int(re.search(r'id="job-(\d+)"', imported).group(1))
    with site_app.app_context():
        job = lambda i: db.session.get(Job, i, populate_existing=True)  # noqa: E731
        wait_for(lambda: job(import_id).status == "succeeded", "the import")
        assert job(training).status == "running"  # the import did not wait for it
        assert job(waiting).status == "queued"  # one GPU job at a time
        release.set()
        wait_for(lambda: job(waiting).status == "succeeded", "the second training")
        assert job(training).finished_at <= job(waiting).started_at


def test_a_remote_workers_job_is_left_alone_until_it_goes_silent(app):
    with app.app_context():
        alive = Job(kind="train_taste", status="running", worker="gpu-box:4242")
        alive.heartbeat_at = utcnow()
        silent = Job(kind="train_taste", status="running", worker="gpu-box:4343")
        silent.heartbeat_at = utcnow() - timedelta(hours=1)
        db.session.add_all([alive, silent])
        db.session.commit()
        assert jobs.fail_orphaned_jobs(stale_after=900) == 1
        assert (alive.status, silent.status) == ("running", "failed")


# ---- the button ---------------------------------------------------------------------------


def test_while_a_version_trains_my_taste_lists_it_with_its_counts(site_app, gate):
    site = person(site_app, "mid-run")
    gate.phase = "encode"  # its first report: nothing encoded or counted by the job yet
    job_id = click_train(site)
    assert gate.reached.wait(JOB_SECONDS), "the job never reached its encode phase"
    try:
        page = site.client.get("/taste/").get_data(as_text=True)
        row = page.split('id="history"')[1]
        assert "No versions yet" not in row and 'class="status-running">training<' in row
        assert f"<td>{RATED}</td>" in row  # its ratings, counted when the run began
        # The widget tells the page when the phase it showed has moved on: the list refreshes.
        moved = site.client.get(f"/jobs/{job_id}?phase=", headers={"HX-Request": "1"})
        assert moved.headers.get("HX-Trigger") == "job-phase"
        same = site.client.get(f"/jobs/{job_id}?phase=encode", headers={"HX-Request": "1"})
        assert "HX-Trigger" not in same.headers
    finally:
        gate.release.set()
    assert wait_until_done(site, job_id)[1] == "succeeded"


def test_a_started_job_says_what_it_does_before_its_first_phase(app, site):
    site.register("ada")
    with app.app_context():
        job = Job(
            kind="train_taste",
            owner_id=1,
            status="running",
            message=jobs.starting_text("train_taste"),
            worker=jobs.WORKER,  # alive: this process
            heartbeat_at=utcnow(),
        )
        db.session.add(job)
        db.session.commit()
        job_id = job.id
    html = site.client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "Starting: loading torch and the model code" in html and "Waiting for" not in html
    queued = jobs.waiting_text("train_taste")
    assert "GPU" not in queued and "one training at a time" in queued  # true on any machine


def test_the_eta_counts_from_when_the_count_started_not_the_setup(app):
    with app.app_context():
        job = Job(kind="train_taste", status="running", phase="lora")
        job.phase_started_at = utcnow() - timedelta(seconds=100)  # 100 s of loading and setup
        db.session.add(job)
        db.session.commit()
        progress = JobProgress(job)
        progress(0, 100, "training: step 1 of 100")
        job.phase_started_at -= timedelta(seconds=2)  # then two steps take a second each
        progress(2, 100, "step 2")
        assert 90 <= job.eta_seconds <= 110  # 98 steps left at a second each, not 4,900 s


def test_a_trainers_figures_go_to_the_log_and_the_page_says_plain_words(app):
    with app.app_context():
        job = Job(kind="train_taste", owner_id=None, status="running")
        db.session.add(job)
        db.session.commit()
        report = JobProgress(job).in_words("Learning what you like from your ratings")
        report(3, 10, "epoch 2: loss 0.412")
        assert (job.progress, job.total) == (3, 10)
        assert job.message == "Learning what you like from your ratings"
        assert "epoch 2: loss 0.412" in job.log and "epoch" not in job.message


def test_while_a_training_runs_the_button_says_so_and_links_to_it(app, site):
    site.register("ada")
    with app.app_context():
        job = Job(kind="train_taste", owner_id=1, status="running", lock_key="taste:1")
        job.worker, job.heartbeat_at = jobs.WORKER, utcnow()  # alive: this process
        db.session.add(job)
        db.session.commit()
        job_id = job.id
    page = site.client.get("/taste/").get_data(as_text=True)
    assert re.search(r'id="train-button" data-ready="false"\s*disabled[^>]*>Training…<', page)
    assert f'href="/jobs/{job_id}"' in page and "Your taste is training now" in page


def test_the_button_is_disabled_below_the_minimum_with_the_reason(app, site):
    site.register("newcomer")
    page = site.client.get("/taste/").get_data(as_text=True)
    assert re.search(r'id="train-button" data-ready="false"\s*disabled', page)
    assert "Rate or compare at least 30 images first — you have 0 ratings and picks." in page
    response = site.post("/taste/train", htmx=True)
    assert response.status_code == 400
    assert (
        "Rate or compare at least 30 images first; you have 0 ratings and picks."
        in response.get_data(as_text=True)
    )
    with app.app_context():
        assert db.session.scalar(select(func.count(Job.id))) == 0


def test_a_second_click_never_starts_a_second_job(app, site):
    site.register("ada")
    app.config["TASTE_MIN_RATINGS"] = 0
    with app.app_context():
        running = Job(kind="train_taste", owner_id=1, status="running", lock_key="taste:1")
        running.worker, running.heartbeat_at = jobs.WORKER, utcnow()  # alive: this process
        db.session.add(running)
        db.session.commit()
        with pytest.raises(jobs.JobBusy) as busy:  # refused by the database, not just the page
            jobs.enqueue("train_taste", 1, lock_key="taste:1")
        assert busy.value.job.id == running.id
    assert click_train(site) == running.id
    with app.app_context():
        assert db.session.scalar(select(func.count(Job.id))) == 1


def test_posts_need_the_csrf_token(app, site):
    site.register("ada")
    app.config["TASTE_MIN_RATINGS"] = 0
    assert site.client.post("/taste/train").status_code == 400
    with app.app_context():
        assert db.session.scalar(select(func.count(Job.id))) == 0


# ---- the crowd model ----------------------------------------------------------------------


def test_the_crowd_model_trains_on_all_ratings_and_personal_scorers_start_from_it(site_app, gate):
    fan = person(site_app, "crowd-fan")
    admin = site_app.config["ADMIN_SITE"]
    started = admin.post("/admin/crowd-model", htmx=True).get_data(as_text=True)
    crowd_job = int(re.search(r'id="job-(\d+)"', started).group(1))
    with site_app.app_context():
        job = lambda: db.session.get(Job, crowd_job, populate_existing=True)  # noqa: E731
        wait_for(lambda: job().done, "the crowd model")
        assert job().status == "succeeded", job().error
    page = admin.client.get("/admin/").get_data(as_text=True)
    assert re.search(r"Trained on \d+ ratings by \d+ raters", page)

    gate.phase = "lora"  # the scorer is all this test needs
    job_id = click_train(fan)
    assert gate.reached.wait(JOB_SECONDS)
    fan.post(f"/jobs/{job_id}/cancel")
    gate.release.set()
    assert wait_until_done(fan, job_id)[1] == "cancelled"
    assert version_of(site_app, job_id).metrics["scorer"]["init"] == "the crowd model"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")
def test_embedded_job_threads_run_below_the_servers_priority(site_app):
    @jobs.handler("report_priority")
    def report_priority(job, progress):
        return {"nice": os.getpriority(os.PRIO_PROCESS, threading.get_native_id())}

    with site_app.app_context():
        job_id = jobs.enqueue("report_priority", None).id
        done = wait_for(
            lambda: db.session.get(Job, job_id).done and db.session.get(Job, job_id), "it"
        )
        assert done.status == "succeeded"
        server = os.getpriority(os.PRIO_PROCESS, os.getpid())
        assert done.result["nice"] == min(server + jobs.WORKER_NICENESS, 19)
    # this thread, like the server's, is untouched
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == server


# ---- an SDXL-family base --------------------------------------------------------------------


@pytest.mark.slow
def test_train_my_taste_on_an_sdxl_family_base_gives_sdxl_files(site_app, tmp_path):
    from safetensors import safe_open

    from tests.tiny_sdxl import build_tiny_sdxl

    folder = tmp_path / "tiny-sdxl"
    build_tiny_sdxl().save_pretrained(folder)
    site_app.config["BASE_MODEL"] = str(folder)
    try:
        xl = person(site_app, "xl-fan")
        job_id = click_train(xl)
        html, status, _ = wait_until_done(xl, job_id)
    finally:
        site_app.config["BASE_MODEL"] = "demo"
    assert status == "succeeded", html
    version = version_of(site_app, job_id)
    assert version.complete and version.metrics["family"].startswith("SDXL family")
    page = xl.client.get(f"/taste/versions/{version.number}").get_data(as_text=True)
    assert "SDXL family" in page
    zipped = fetch(xl, f"/taste/versions/{version.number}/download/lora")
    with zipfile.ZipFile(io.BytesIO(zipped.data)) as archive:
        archive.extractall(tmp_path)
    stem = tmp_path / "bundle" / "tastebud-xl-fan-taste-v1"
    with safe_open(f"{stem}.safetensors", framework="pt") as file:
        meta = file.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(Path(f"{stem}.json").read_text())["sd version"] == "SDXL"
    with site_app.app_context():
        latents = taste_files.version_folder(version) / taste_files.LATENTS
        scorer = taste_files.version_folder(version) / taste_files.SCORER
    for path in (latents, scorer):
        with safe_open(str(path), framework="pt") as file:
            assert file.metadata()["family"] == "sdxl", path


def test_each_person_numbers_their_own_versions_and_never_reuses_one(app, site):
    """My URLs name my versions 1, 2, … (never the global id); another's number is 404 to me;
    a deleted version's number never names a new one, so an old link can't open another model."""
    bob = Site(app.test_client())
    site.register("ada")
    bob.register("bob")

    def train(username: str) -> int:
        """Make a version as a train_taste job does; return its number."""
        with app.app_context():
            owner = db.session.scalar(select(User).where(User.username == username))
            job = Job(owner_id=owner.id, kind="train_taste", status="succeeded")
            db.session.add(job)
            db.session.commit()
            version = new_version(job)
            version.base_model = f"{username}-base"
            db.session.commit()
            return version.number

    assert [train("ada"), train("bob"), train("ada")] == [1, 1, 2]  # ids 1, 2, 3
    for person, name in ((site, "ada"), (bob, "bob")):
        shown = person.client.get("/taste/versions/1").get_data(as_text=True)
        assert f"<b>{name}-base</b>" in shown and "Delete version 1" in shown
    listed = site.client.get("/taste/").get_data(as_text=True)
    assert 'href="/taste/versions/2"' in listed and "/taste/versions/3" not in listed
    for url in ("/taste/versions/2", "/taste/versions/2/download/lora"):
        assert bob.client.get(url).status_code == 404, url
    for url in ("/taste/versions/2/public", "/taste/versions/2/delete"):
        assert bob.post(url, {"public": "1"}).status_code == 404, url

    assert site.post("/taste/versions/2/delete").status_code == 302
    assert site.client.get("/taste/versions/2").status_code == 404
    assert train("ada") == 3  # not 2 again
    assert site.client.get("/taste/versions/2").status_code == 404
    with app.app_context(), pytest.raises(IntegrityError):  # the database refuses a twin
        db.session.add(TasteVersion(owner_id=1, number=1, base_model="demo", metrics={}))
        db.session.commit()


def test_the_download_says_at_which_strength_to_use_the_lora(app, site):
    site.register("ada")
    with app.app_context():
        version = TasteVersion(
            owner_id=1,
            number=1,
            base_model="demo",
            is_demo=True,
            bundle_file="bundle.zip",
            metrics={"lora": {"score_gain": 0.4, "recommended_strength": 0.7}},
        )
        db.session.add(version)
        db.session.commit()
        folder = taste_files.version_folder(version)
        folder.mkdir(parents=True)
        (folder / "bundle.zip").write_bytes(b"PK")
    shown = site.client.get("/taste/versions/1").get_data(as_text=True)
    assert "Use it at strength 0.7</b>" in shown and "stronger than this, it scored lower" in shown
    assert "&lt;lora:tastebud-ada-taste-v1:0.7&gt;" in shown and "lora_scale=0.7" in shown
    listed = site.client.get("/taste/").get_data(as_text=True)
    assert re.search(r"LoRA \.zip</a> <small [^>]*>at 0\.7</small>", listed)
    with app.app_context():  # a version from before the recommendation: strength 1, unsaid
        db.session.get(TasteVersion, version.id).metrics = {"lora": {"score_gain": 0.4}}
        db.session.commit()
    shown = site.client.get("/taste/versions/1").get_data(as_text=True)
    assert "Use it at strength" not in shown and "&lt;lora:tastebud-ada-taste-v1:1&gt;" in shown
