"""The only `ray.init` in ct_ray.

No address means a fresh local Ray for this process: a command never attaches to a cluster by accident (a stray
RAY_ADDRESS in the shell, a dev cluster left running). Joining a cluster is always explicit: `--address auto` (what
`ct-ray submit` jobs run with) or `--address ray://HOST:10001`.
"""

from __future__ import annotations

from ..errors import CTRayError, one_line

# a local Ray that runs Ray Train: the dashboard (localhost only) serves the state API that Ray Train's placement-group
# cleaner polls every second; without it each poll logs a warning (hundreds per run)
_TRAINING = {"include_dashboard": True, "dashboard_host": "127.0.0.1"}


class _QuietTokenNotice:
    """Drops Ray's 'Token authentication is enabled for this Ray cluster' notice, printed at every local start: the
    local Ray ct_ray starts keeps token authentication on (the safe default); the user did not ask to hear it."""

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith("Token authentication is enabled for this Ray cluster")


_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def ensure_ray(address: str | None = None, *, training: bool = False, log_to_driver: bool = False, **init_kwargs):
    """The `ray` module, initialised: the caller's Ray if this process already has one, else a fresh local Ray
    (`address` None or 'local') or the cluster at `address`. `training`: a local Ray fit for Ray Train.
    Failure to start or reach Ray is a one-line `CTRayError`."""
    import ray

    if ray.is_initialized():
        return ray
    kw = {"log_to_driver": log_to_driver, "configure_logging": True, "logging_level": "WARNING", **init_kwargs}
    if address in (None, "local"):
        import logging

        address = "local"
        log = logging.getLogger(_AUTH_LOGGER)
        if not any(isinstance(f, _QuietTokenNotice) for f in log.filters):
            log.addFilter(_QuietTokenNotice())
        for k, v in (_TRAINING if training else {"include_dashboard": False}).items():
            kw.setdefault(k, v)
    try:
        ray.init(address=address, **kw)
    except Exception as e:
        raise CTRayError(f"cannot start or reach Ray at {address}: {one_line(e)}") from e
    return ray
