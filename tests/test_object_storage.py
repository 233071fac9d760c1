"""CLTs and graphs on a real S3-compatible endpoint (moto server on loopback), through fsspec/s3fs."""

import time

import pytest
import torch

from ct_ray import Graph, attribute, load_clt, random_clt, save_clt
from ct_ray.errors import CLTError


def test_clt_and_graph_on_s3(s3, tiny_models):
    lm = tiny_models["qwen3"]
    clt = random_clt(lm, 16, firing_rate=0.2, span=2)
    url = f"s3://{s3['bucket']}/clts/qwen3-tiny"
    save_clt(clt, url)
    back = load_clt(url)
    assert back.source == url and back.spans == clt.spans
    for l in range(clt.n_layers):
        assert torch.equal(back.W_dec[l], clt.W_dec[l]) and torch.equal(back.threshold[l], clt.threshold[l])
    g = attribute(lm, back, "on s3")
    g.save(f"s3://{s3['bucket']}/graphs/g1")
    g2 = Graph.load(f"s3://{s3['bucket']}/graphs/g1")
    assert torch.equal(g.adjacency, g2.adjacency)
    assert torch.equal(attribute(lm, clt, "on s3").adjacency, g.adjacency)


def test_s3_clt_decoders_are_mapped_from_unnamed_local_copies(s3, tiny_models, tmp_path, monkeypatch):
    """A remote CLT's decoder files are copied to unnamed files in TMPDIR and mapped, as a local CLT's: rows are
    read from them (never resident), nothing is left in TMPDIR, and an unusable TMPDIR is a one-line error."""
    import tempfile

    from ct_ray.clt.lazy import decoder_rows, is_lazy

    clt = random_clt(tiny_models["llama"], 16, firing_rate=0.2, span=2)
    url = f"s3://{s3['bucket']}/clts/spooled"
    save_clt(clt, url)
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    back = load_clt(url)
    assert is_lazy(back) and not is_lazy(load_clt(url, lazy_decoders=False))
    assert list(spool.iterdir()) == []  # unnamed: gone with the last map and descriptor
    idx = torch.tensor([[0, 5], [15, 6]])
    for l in range(clt.n_layers):
        assert torch.equal(decoder_rows(back, l, idx), clt.W_dec[l][idx]) and torch.equal(back.W_dec[l], clt.W_dec[l])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "absent"))
    with pytest.raises(CLTError, match=r"cannot create a local copy of W_dec_0.safetensors .*TMPDIR") as e:
        load_clt(url)
    assert "\n" not in str(e.value)


def test_missing_s3_clt(s3):
    with pytest.raises(CLTError, match="no CLT at"):
        load_clt(f"s3://{s3['bucket']}/nothing/here")


def test_unreachable_storage():
    t = time.time()
    with pytest.raises(CLTError, match="cannot reach"):
        load_clt("s3://bucket/clt", endpoint_url="http://127.0.0.1:9", config_kwargs={"retries": {"max_attempts": 1}})
    assert time.time() - t < 60
