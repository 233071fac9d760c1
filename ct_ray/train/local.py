"""The same training as the Ray Train loop, in one process without Ray: the reference for sharding tests and a
debugging aid (tests/test_train.py compares the two)."""

from __future__ import annotations

from ..specs import TrainSpec
from .data import StoreFeed
from .shard import Layout, Shard


def train_local(spec: TrainSpec, activations: str, n_layers: int, d_model: int, model_name: str = "") -> tuple:
    """Returns (shard with the full CLT in scaled units, sx, sy, metric history)."""
    lay = Layout(n_layers, d_model, spec.clt.n_features, spec.clt.span, spec.clt.activation,
                 spec.harvest.read_point, k=spec.clt.k)
    shard = Shard(lay, spec.optim, model_name)
    feed = StoreFeed(activations, spec.optim.batch_tokens, spec.optim.seed, spec.optim.shuffle_buffer_tokens)
    sx, sy = feed.scales(d_model)
    shard.init_from_data(feed.first_global_batch()[0] * sx[:, None])
    history = []
    for x, y in feed.batches():
        if shard.step_no >= spec.optim.steps:
            break
        ys = y * sy[:, None]
        stats = shard.step(x * sx[:, None], ys, spec.optim.steps)
        if shard.step_no % spec.metrics_every == 0:
            history.append(shard.metrics(stats, ys))
    return shard, sx, sy, history
