"""Where ct_ray meets Ray: the one place that starts or joins a cluster, the workers' environment, actors and tasks.

Pipeline stages (attribution/, clt/, perturb/, train/loop.py, analysis/ computations) never import Ray; drivers
(sweep/, features/, analysis/analyze.py, train/run.py, ops/, demo) get their Ray from `ensure_ray` (ray_start.py), their
workers' environment from `worker_env`, and run on `pool.ActorPool` (sweeps: sweep/driver.py; feature dashboards:
features/job.py), `tasks.map_unordered` (analysis over a sweep's keys), or `split_rows.SplitRows` (one prompt's
adjacency rows over several actors: `ct-ray attribute --workers`); `capacity` says when none finds room.
"""

from .ray_start import ensure_ray
from .worker_env import worker_env

__all__ = ["ensure_ray", "worker_env"]
