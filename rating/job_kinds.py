"""Every kind of background job, in one list: what runs it, on which queue, and how the job of
a worker that died mid-run is salvaged. The queues run exactly these (create_app registers
them); nothing registers itself by being imported."""

from __future__ import annotations

from rating import blind, blind_jobs, crowd_jobs, imports, refine_jobs, taste_files, taste_jobs
from rating.jobs import JobKind
from rating.sources import demo

KINDS = (
    # light queue: imports, many at once
    JobKind("demo_pack", demo.import_demo_pack),
    JobKind("import_urls", imports.import_urls),
    JobKind("import_folder", imports.import_folder),
    JobKind("import_civitai", imports.import_civitai),
    JobKind("import_upload", imports.import_upload),
    # GPU queue: one at a time per worker
    JobKind("train_taste", taste_jobs.train_taste, gpu=True, salvage=taste_files.salvage_orphan),
    JobKind("train_crowd", crowd_jobs.train_crowd, gpu=True),
    JobKind("refine_image", refine_jobs.refine_image, gpu=True),
    JobKind(blind.MORE_PAIRS, blind_jobs.draw_more_pairs, gpu=True),
)
