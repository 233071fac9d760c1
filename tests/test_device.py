"""Device placement without a GPU: what attribution allocates follows the model's device, the CUDA memory budget,
and a random CLT built where its model lives. The CUDA runs themselves: benchmarks/gpu_check.py (RESULTS.md)."""

import torch

from ct_ray import random_clt
from ct_ray.attribution import budget as B
from ct_ray.attribution.attribute import _on_model_device


class _Stub:
    def __init__(self, device):
        self.model = torch.nn.Linear(2, 2, device=device)


def test_attribution_allocates_on_the_model_device():
    where = _on_model_device(lambda model: (torch.zeros(1).device, torch.arange(3).device))
    assert where(_Stub("meta")) == (torch.device("meta"), torch.device("meta"))
    assert where(_Stub("cpu")) == (torch.device("cpu"), torch.device("cpu"))
    assert torch.zeros(1).device == torch.device("cpu")  # nothing leaks out of the call


def test_cuda_budget_is_the_gpu_free_memory(monkeypatch):
    monkeypatch.delenv("CT_RAY_ATTRIBUTION_MEMORY", raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    assert B.default_budget("cuda") == int(0.8 * 10 * 2**30)
    assert B.default_budget(torch.device("cuda", 0)) == int(0.8 * 10 * 2**30)
    assert B.default_budget("cpu") == B.default_budget()
    monkeypatch.setenv("CT_RAY_ATTRIBUTION_MEMORY", "2G")  # the override wins on any device
    assert B.default_budget("cuda") == 2 * 2**30


def test_random_clt_lives_with_its_model(tiny_models):
    lm = tiny_models["llama"]
    clt = random_clt(lm, 16, seed=2)
    assert all(p.device == next(lm.model.parameters()).device for p in clt.parameters())
    assert torch.equal(clt.W_enc[0], random_clt(lm, 16, seed=2).W_enc[0])  # seeded on the CPU: the same draws
