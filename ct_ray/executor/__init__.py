"""Where ct_ray meets Ray: the one place that starts or joins a cluster, the workers' environment, the actor pool.

Pipeline stages (attribution/, clt/, perturb/, train/loop.py) never import Ray; drivers (sweep/, features/, train/run.py,
ops/, demo) get their Ray from `ensure_ray`, their workers' environment from `worker_env`, and run their actors on
`pool.ActorPool` (sweeps: sweep/driver.py; feature dashboards: features/job.py).
"""

from .ray_start import ensure_ray
from .worker_env import worker_env

__all__ = ["ensure_ray", "worker_env"]
