"""Every setting with its default; `TASTEBUD_<NAME>` or `instance/config.py` override them."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from flask import current_app

DEFAULTS: dict[str, object] = {
    # Where the server listens; 127.0.0.1 keeps a fresh install private to this machine.
    "HOST": "127.0.0.1",
    "PORT": 5000,
    # Worker threads of each web process; 0: two per core shared among the processes, 1 to 4
    # each (on 2 cores: 4 for one process, 2 each for two, 1 each for four). Python runs one
    # thread at a time per process: threads past that only overlap waits (database, slow
    # clients), and several processes already overlap one another's. bench/rating_load.py,
    # 4 processes on 2 cores, PostgreSQL: p99 210 ms with 2 threads each against 323 with 4,
    # then 226 and 257 ms with 1 each against 275 and 316 with 2; one process: 4 threads
    # serve static files in half the p99 of 2 (rating/server.py server_threads).
    "SERVER_THREADS": 0,
    # Processes that serve the site, each with SERVER_THREADS threads (0: one per core). With
    # more than one, `python app.py` forks them on one socket and runs the job worker beside
    # them; SQLite (WAL) or PostgreSQL coordinates them (Linux and macOS; Windows serves with 1).
    "WEB_PROCESSES": 1,
    # Database URL; empty means a SQLite file in the instance folder.
    "DATABASE_URL": "",
    # A database server's pooled connection idle this many seconds is checked before use, so
    # one dropped by a server restart is replaced; a busy one is not (rating.database).
    "DATABASE_IDLE_PING": 1.0,
    # Root for images (and later latents and models); empty means the instance folder.
    "STORAGE_ROOT": "",
    # Job queue: "sqlite" (embedded worker thread), "redis" (set REDIS_URL) or "immediate" (tests).
    "QUEUE": "sqlite",
    "REDIS_URL": "",
    # Run the job worker inside `python app.py`; turn off when separate workers run.
    "EMBEDDED_WORKER": True,
    # Threads for light jobs (imports, the demo pack); GPU jobs always get one thread of their
    # own, so an import never waits behind a training.
    "LIGHT_WORKERS": 2,
    # Run the GPU queue's worker inside `python app.py` too; turn off when GPU machines run
    # `flask --app app jobs worker --gpu` against the same Redis, database and storage.
    "EMBEDDED_GPU_WORKER": True,
    # A running job's worker beats its heartbeat this often (seconds), from a thread of its own,
    # whatever the job is doing.
    "JOB_HEARTBEAT_SECONDS": 10,
    # A running job whose worker (on another machine) has not beaten for this many seconds is
    # taken for dead: failed, its lock freed, its last checkpoint kept.
    "JOB_STALE_SECONDS": 60,
    # Every process that serves or runs jobs looks this often (seconds) for jobs whose worker
    # died and for queued jobs the queue lost (a Redis restart), and fails or re-queues them.
    "JOB_SWEEP_SECONDS": 15,
    # A queued job missing from its queue for this long is re-queued (a task being handed to a
    # worker is briefly in neither place).
    "JOB_REQUEUE_AFTER_SECONDS": 30,
    # Apply database migrations at start-up, so an upgrade never needs a manual step.
    "AUTO_MIGRATE": True,
    # Anyone may register; the first account becomes an admin.
    "ALLOW_REGISTRATION": True,
    # Sign-in attempts per client address and per username.
    "LOGIN_RATE_LIMIT": "10 per minute;50 per hour",  # failed sign-ins, per address and per
    # address + username (never per username alone: that would let anyone lock the owner out)
    "REGISTER_RATE_LIMIT": "5 per minute;20 per hour",  # new accounts per address
    # Largest request body (bytes): rating imports and uploads (a batch of files).
    "MAX_CONTENT_LENGTH": 200 * 2**20,
    # Images: how many the demo pack adds per click, thumbnail size, validation limits.
    "DEMO_PACK_SIZE": 300,
    "DEMO_PACK_SEED": 0,
    "THUMBNAIL_SIDE": 768,
    "MAX_IMAGE_PIXELS": 40_000_000,
    "MIN_IMAGE_SIDE": 256,
    # Fetching images: civitai's address (tests point it at a local server), time-outs, a size
    # cap, and hosts fetched even when they resolve to private addresses (an intranet server).
    "CIVITAI_URL": "https://civitai.com",
    "FETCH_TIMEOUT": 20.0,
    "FETCH_MAX_BYTES": 30 * 2**20,
    "FETCH_ALLOWED_HOSTS": [],
    # Browser uploads (when an admin allows them): per file and per request.
    "UPLOAD_MAX_FILE_BYTES": 20 * 2**20,
    "UPLOAD_MAX_FILES": 50,
    # Pixels one upload request may decode (header sizes, summed): 36 MP PNGs of 35 KB each
    # took 2–3.6 s apiece to decode, so bytes alone don't bound the work.
    "UPLOAD_MAX_PIXELS": 100_000_000,
    # ...and one person may send per hour (uploads are decoded by the light job queue).
    "UPLOAD_MAX_PIXELS_PER_HOUR": 1_000_000_000,
    # Perceptual-hash distance (of 64 bits) at or under which an image counts as a near copy.
    "NEAR_DUPLICATE_DISTANCE": 6,
    # Rating pages: how many upcoming images to prefetch, how many ratings undo reaches back.
    "PREFETCH": 2,
    # Images chosen ahead for a sitting (choosing is the costly query of rate-and-next).
    "PICK_AHEAD": 8,
    # Share of each batch of images to rate that the person's scorer asks for (the images whose
    # rating would teach it most, and those at the edge of their top); the rest keeps exploring.
    "ACTIVE_SHARE": 0.25,
    "UNDO_DEPTH": 50,
    "RATINGS_PER_PAGE": 60,
    # Crowd page: an image needs this many raters before agreement means anything.
    "CROWD_MIN_RATERS": 3,
    # "Train my taste": the base model (a hub id, a diffusers folder, a .safetensors file, or
    # "demo": the built-in demo world, a tiny model trained on the demo pack, offline), and the
    # ratings it needs.
    "BASE_MODEL": "demo",
    # A single-file checkpoint's configs, offline: a local diffusers folder of the same model
    # family (e.g. a downloaded stable-diffusion-v1-5); empty: diffusers fetches them.
    "BASE_MODEL_CONFIG": "",
    # The device GPU jobs run on ("cuda:1", "cpu"); empty: CUDA, then Apple MPS, then CPU.
    # Several GPU workers on one machine: one each, or CUDA_VISIBLE_DEVICES per worker.
    "DEVICE": "",
    # The weights' precision there: "auto" (bf16 or fp16 on CUDA, fp32 on Apple MPS and CPU),
    # "half" (fp16 on MPS too: half the memory, for Macs with 16 GB or less), "full" (fp32).
    "PRECISION": "auto",
    "TASTE_MIN_RATINGS": 30,
    # A scorer file whose trunk personal scorers start from; empty: the crowd model when an
    # admin has trained one for this base model, else from scratch.
    "SCORER_INIT": "",
    # Trainer settings, as JSON objects of dataclass fields (unknown keys are an error):
    # trainer.scorer.ScorerConfig, trainer.lora.TasteLoraConfig, trainer.latents.LatentsConfig.
    "TASTE_SCORER": {},
    "TASTE_LORA": {},
    "TASTE_LATENTS": {},
    # Unrated pool images the new scorer scores, to show the ones it predicts I'd love and hate.
    "TASTE_PREDICT_POOL": 200,
    # A prompt file ([train] and [eval] sections, like trainer/prompts.txt) for LoRA training,
    # its evaluation and the grid; empty: the base's own set (the demo world has its own words).
    "TASTE_PROMPTS": "",
    # The before/after grid: held-out prompts and seeds, and denoising steps per image.
    "TASTE_GRID_PROMPTS": 4,
    "TASTE_GRID_SEEDS": 2,
    "TASTE_SAMPLE_STEPS": 20,
    # The blind check ("which do you prefer?"): pairs of base and LoRA pictures per version,
    # and the LoRA strengths offered (empty: the one its evaluation recommends). 20 pairs, about
    # a minute by keyboard: a LoRA preferred 4 times in 5 clears chance (the 95% interval's low
    # end above 50%) in 80% of checks, against 56% with 12 pairs, which too often said "too
    # close to call".
    "TASTE_BLIND_PAIRS": 20,
    "TASTE_BLIND_STRENGTHS": [],
    # "Improve this image": settings for trainer.sample.refine (empty: its defaults).
    "TASTE_REFINE": {},
    # CPU threads torch may use in GPU-queue jobs; 0: half the cores (at least 1). One thread
    # per core spins against the web server: on a busy 2-core machine 2 threads ran a LoRA
    # 10× slower than 1.
    "TORCH_THREADS": 0,
    # Session cookies: HttpOnly always; set SESSION_COOKIE_SECURE=true behind HTTPS.
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    "SESSION_COOKIE_SECURE": False,
    "WTF_CSRF_TIME_LIMIT": None,  # tokens live as long as the session, so an open tab never breaks
}


PRECISIONS = ("auto", "half", "full")  # trainer.device.PRECISIONS (no torch import here)


def load_settings(app, test_config: dict | None) -> None:
    """Fill app.config: defaults, then instance/config.py, then TASTEBUD_* variables, then tests."""
    app.config.update(DEFAULTS)
    app.config.from_pyfile("config.py", silent=True)
    app.config.from_prefixed_env("TASTEBUD")  # values parse as JSON: 8080, true, "text"
    if test_config:
        app.config.update(test_config)
    instance = Path(app.instance_path)
    instance.mkdir(parents=True, exist_ok=True)
    app.config["STORAGE_ROOT"] = str(Path(app.config["STORAGE_ROOT"] or instance))
    if not app.config["DATABASE_URL"]:
        _owner_only(instance / "tastebud.db")
    app.config["SQLALCHEMY_DATABASE_URI"] = (
        app.config["DATABASE_URL"] or f"sqlite:///{instance / 'tastebud.db'}"
    )
    # Limits are counted where every web process sees them: in Redis when there is one (while
    # it is down, each process counts its own rather than refusing every sign-in).
    app.config.setdefault("RATELIMIT_STORAGE_URI", app.config["REDIS_URL"] or "memory://")
    app.config.setdefault("RATELIMIT_IN_MEMORY_FALLBACK_ENABLED", True)
    if app.config["PRECISION"] not in PRECISIONS:  # say so at start, not in a failed job
        raise ValueError(
            f"PRECISION must be one of {', '.join(PRECISIONS)}, not {app.config['PRECISION']!r}"
        )
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = _instance_secret(instance / "secret_key")


def _owner_only(database: Path) -> None:
    """Make the SQLite file (password hashes, the civitai key) readable by its owner only."""
    # Created here, before SQLite opens it, so it is never world-readable even briefly; SQLite
    # gives its -wal and -shm files the database file's mode.
    os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
    database.chmod(0o600)  # an older instance's 0644 file too


def _instance_secret(path: Path) -> str:
    """Read the instance's secret key, creating it (readable by the owner only) on first start."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass  # made on an earlier start, or by a process starting beside this one
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip()


def storage_root() -> Path:
    """Return the configured storage root."""
    return Path(current_app.config["STORAGE_ROOT"])
