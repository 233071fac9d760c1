"""Activation harvesting on Ray Data: contexts -> actor pool (one model per actor) -> streamed batches or shards.

    read + tokenise (driver, small: token ids only)  ──►  map_batches(HarvestActor, ActorPoolStrategy)
        ├─ streamed:  batches of (x, y) flow to the consumer (e.g. the training workers), nothing on disk
        └─ persisted: each actor writes its shard straight to storage and returns a small manifest entry
"""

from __future__ import annotations

import json
import threading

import numpy as np
import torch

from ..errors import CTRayError
from ..specs import HarvestSpec
from .activations import harvest_batch, training_mask
from .corpus import Contexts, iter_documents, tokenize_contexts


class HarvestActor:
    """Loads the model once; turns a batch of contexts into activations (or a written shard)."""

    def __init__(self, model: str, read_point: str, outlier_factor: float, out: str | None, dtype: str,
                 contexts=None):
        import ray

        from ..models import load_model

        torch.set_grad_enabled(False)
        # the token ids, fetched once per actor from the object store (batches carry context indices only)
        self.contexts = ray.get(contexts[0]) if isinstance(contexts, list) else contexts
        self.model = load_model(model, attn="sdpa")
        self.read_point, self.outlier_factor, self.out, self.dtype = read_point, outlier_factor, out, dtype
        # Two calls run at once (see harvest_dataset): the forward (hooks on one shared model) is serialised by this
        # lock, so one batch's shard write overlaps the next batch's forward instead of idling the CPU.
        self.compute = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "tokens" not in batch:  # context indices: look the rows up here rather than in tasks of their own
            ids = np.asarray(batch["data"])
            c = self.contexts
            batch = {"ctx": ids, "tokens": c.tokens[ids], "doc": c.doc[ids], "offset": c.offset[ids]}
        tokens = torch.from_numpy(np.asarray(batch["tokens"], np.int64))
        with self.compute:
            x, y = harvest_batch(self.model, tokens, self.read_point)
            mask = training_mask(x, self.outlier_factor)
            b, t = torch.nonzero(mask, as_tuple=True)
            xs, ys = x[b, t], y[b, t]  # [n, L, d]
            del x, y
        doc = np.asarray(batch["doc"])[b.numpy()]
        pos = (np.asarray(batch["offset"])[b.numpy()] + t.numpy()).astype(np.int32)
        if self.out is not None:
            from .shards import write_shard

            entry = write_shard(self.out, f"{int(batch['ctx'][0]):09d}", xs, ys, doc, pos, self.dtype)
            return {"entry": np.array([json.dumps(entry)])}
        return {"x": xs.numpy(), "y": ys.numpy(), "doc": doc.astype(np.int32), "pos": pos}


def build_contexts(spec: HarvestSpec, tokenizer) -> Contexts:
    n_ctx = max(1, -(-spec.n_tokens // (spec.context_len - 1)))
    return tokenize_contexts(tokenizer, iter_documents(spec.corpus, spec.text_column), spec.context_len, n_ctx)


def quiet_ray_data() -> None:
    """ct_ray shows its own harvest bar and step lines: Ray Data's own progress bars and INFO lines (one every few
    seconds, thousands in a long harvest when stdout is not a terminal) only bury them. Per process."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def harvest_dataset(spec: HarvestSpec, contexts: Contexts, out: str | None = None):
    """The Ray Data pipeline (lazy). `out` set: actors write shards there and emit manifest entries."""
    import ray

    # one block per batch (capped) so that several actors can work in parallel. The context ids are put in the
    # object store from here rather than read by `ray.data.range` tasks: a read task holds a whole CPU, and beside
    # streaming training workers that own the other CPUs it starved the harvest actors (a deadlock on 2 cores).
    # The token rows are looked up by the actors from one object-store copy: a separate lookup map with
    # num_cpus=0 had no concurrency bound, and Ray started ~45 worker processes for it (250-470 MB each, OOM kills).
    blocks = max(1, min(256, len(contexts) // spec.batch_contexts))
    ids = ray.data.from_numpy(np.array_split(np.arange(len(contexts)), blocks))
    return ids.map_batches(
        HarvestActor,
        fn_constructor_kwargs={"model": spec.model, "read_point": spec.read_point,
                               "outlier_factor": spec.outlier_factor, "out": out, "dtype": spec.dtype,
                               "contexts": [ray.put(contexts)]},  # in a list: the actor fetches it itself
        batch_size=spec.batch_contexts,
        # 2 concurrent calls per actor: the write of one shard overlaps the next forward (HarvestActor.compute)
        compute=ray.data.ActorPoolStrategy(size=spec.workers, max_concurrent_calls_per_actor=2,
                                           enable_true_multi_threading=True),
        num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus or None,
    )


def harvest_to_store(spec: HarvestSpec, url: str, progress: bool = True) -> dict:
    """Persisted harvest: shards + manifest at `url`. Returns the manifest."""
    from tqdm.auto import tqdm

    from ..models import load_model
    from ..store.fs import absolute_url
    from .shards import ActivationStore, write_manifest

    url = absolute_url(url)
    tok = load_model(spec.model).tokenizer
    contexts = build_contexts(spec, tok)
    meta = {"model": spec.model, "read_point": spec.read_point, "dtype": spec.dtype, "context_len": spec.context_len,
            "corpus": spec.corpus, "n_contexts": len(contexts), "outlier_factor": spec.outlier_factor}
    try:  # the same harvest already committed (manifest written last): reuse it
        done = ActivationStore(url).manifest
        if all(done.get(k) == v for k, v in meta.items()):
            return done
    except CTRayError:
        pass
    if progress:
        quiet_ray_data()
    ds = harvest_dataset(spec, contexts, out=url)
    entries = []
    with tqdm(total=len(contexts) * (spec.context_len - 1), unit="tok", desc="harvest", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
            for e in batch["entry"]:
                entry = json.loads(str(e))
                entries.append(entry)
                bar.update(entry["n_tokens"])
    return write_manifest(url, entries, meta)
