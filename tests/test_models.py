import pytest
import torch

from ct_ray import load_model
from ct_ray.errors import ModelError, PromptError
from ct_ray.models.capture import capture
from ct_ray.models.tiny import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_points_add_up(tiny_models, family):
    lm = tiny_models[family]
    c = capture(lm, lm.encode("hook points add up"))
    # resid_mid + mlp_out == resid_post, exactly, and resid_post[l] feeds block l+1
    assert torch.equal(c.resid_mid + c.mlp_out, c.resid_post)
    assert c.patterns.shape[:2] == (lm.n_layers, lm.adapter.n_heads)
    assert torch.allclose(c.patterns.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.real
def test_hook_points_add_up_smollm2(smollm2):
    c = capture(smollm2, smollm2.encode("The capital of France is"))
    assert torch.equal(c.resid_mid + c.mlp_out, c.resid_post)
    assert smollm2.decode([int(c.probs.argmax())]) == [" Paris"]
    assert c.probs.max() > 0.7


def test_bos_prepended_once(tiny_models):
    lm = tiny_models["llama"]
    ids = lm.encode("ab")
    assert ids.tolist() == [256, ord("a"), ord("b")]
    assert lm.encode(ids).tolist() == ids.tolist()  # ids used as given, BOS not doubled
    assert lm.encode([97, 98]).tolist() == [256, 97, 98]


@pytest.mark.parametrize("prompt", ["", "   ", []])
def test_empty_prompt(tiny_models, prompt):
    with pytest.raises(PromptError, match="empty"):
        tiny_models["llama"].encode(prompt)


def test_prompt_too_long(tiny_models):
    lm = tiny_models["gpt2"]
    with pytest.raises(PromptError, match="context"):
        lm.encode("x" * 200)


def test_token_out_of_vocab(tiny_models):
    with pytest.raises(PromptError, match="out of range"):
        tiny_models["llama"].encode([5, 99999])


def test_unknown_model_name():
    with pytest.raises(ModelError, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model")


def test_unsupported_architecture(tmp_path):
    import transformers as tf

    cfg = tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="unsupported architecture 'bloom'.*llama"):
        load_model(str(tmp_path))


def test_local_directory(tiny_dir):
    lm = load_model(str(tiny_dir))
    assert lm.n_layers == 2 and lm.adapter.family == "llama"
    assert lm.encode("hi").tolist() == [256, ord("h"), ord("i")]


def test_hooks_replace_read_and_remove(tiny_models):
    """models/hooks.py: a replaced mlp_out changes the logits, read points never do, every hook goes on exit."""
    import torch

    from ct_ray.models.hooks import Hooks, forward

    m = tiny_models["llama"]
    toks = torch.tensor([[0, 5, 7, 9]])
    clean = forward(m, toks)
    seen = {}
    with Hooks(m) as h:
        h.on("resid_mid", lambda x: x * 0, layer=0)  # a read point: its return value is ignored
        h.on("mlp_out", lambda y: seen.setdefault("y", y.clone()), layer=1)
        assert torch.equal(forward(m, toks), clean)
    with Hooks(m) as h:
        h.on("mlp_out", lambda y: torch.zeros_like(y), layer=1)
        assert not torch.allclose(forward(m, toks), clean)
    with pytest.raises(RuntimeError, match="boom"), Hooks(m) as h:
        h.on("resid_post", lambda x: (_ for _ in ()).throw(RuntimeError("boom")), layer=0)
        forward(m, toks)
    assert torch.equal(forward(m, toks), clean)  # no hook left behind, also after an error
    with pytest.raises(ValueError, match="needs a layer"), Hooks(m) as h:
        h.on("mlp_out", print)
    with pytest.raises(ValueError, match="unknown hook point"), Hooks(m) as h:
        h.on("resid_final", print, layer=0)
