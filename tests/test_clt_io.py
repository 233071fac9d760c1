import pytest
import torch
import yaml
from safetensors.torch import save_file

from ct_ray import load_clt, random_clt, save_clt, save_transcoder_set
from ct_ray.errors import CLTError
from ct_ray.models.capture import capture
from tests._helpers import transcoder_set


def _same_outputs(a, b, x):
    for l in range(a.n_layers):
        torch.testing.assert_close(a.encode(l, x), b.encode(l, x), rtol=0, atol=0)
    acts = [a.encode(l, x) for l in range(a.n_layers)]
    for ya, yb in zip(a.decode(acts), b.decode(acts)):
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)


@pytest.mark.parametrize("span", [None, 1, 2])
def test_roundtrip(tiny_models, tmp_path, span):
    lm = tiny_models["llama"]
    clt = random_clt(lm, 24, seed=5, span=span)
    save_clt(clt, str(tmp_path / "clt"), extra={"note": "test"})
    back = load_clt(str(tmp_path / "clt"))
    assert back.spans == clt.spans and back.activation == "jumprelu"
    assert back.meta["note"] == "test"
    x = capture(lm, lm.encode("round trip")).resid_mid[0]
    _same_outputs(clt, back, x)
    cfg = yaml.safe_load((tmp_path / "clt" / "config.yaml").read_text())
    assert cfg["model_kind"] == "cross_layer_transcoder" and cfg["feature_input_hook"] == "hook_resid_mid"


def test_transcoder_set_roundtrip(tiny_models, tmp_path):
    lm = tiny_models["gpt2"]
    clt = random_clt(lm, 16, span=1)
    save_transcoder_set(clt, str(tmp_path / "ts"))
    back = load_clt(str(tmp_path / "ts"))
    _same_outputs(clt, back, torch.randn(5, lm.d_model))


def test_hand_written_circuit_tracer_clt(tmp_path):
    """A CLT written by hand in circuit-tracer's layout: known weights give known outputs."""
    L, d, F = 2, 4, 3
    (tmp_path / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
    )
    for l in range(L):
        W_enc = torch.zeros(F, d)
        W_enc[0, 0] = 1.0  # feature 0 reads dim 0
        W_enc[1, 1] = 2.0  # feature 1 reads 2 x dim 1
        W_enc[2, 2] = 1.0
        save_file({f"W_enc_{l}": W_enc, f"b_enc_{l}": torch.tensor([0.0, 0.0, -10.0]),
                   f"b_dec_{l}": torch.full((d,), 0.5 * l), f"threshold_{l}": torch.tensor([0.5, 0.5, 0.5])},
                  tmp_path / f"W_enc_{l}.safetensors")
        W_dec = torch.zeros(F, L - l, d)
        W_dec[0, :, 3] = 1.0  # feature 0 writes dim 3 of every later layer
        W_dec[1, 0, 0] = -1.0
        save_file({f"W_dec_{l}": W_dec}, tmp_path / f"W_dec_{l}.safetensors")
    clt = load_clt(str(tmp_path))
    assert clt.n_layers == L and clt.d_tc == [F, F] and clt.spans == [2, 1]
    x = torch.tensor([[1.0, 0.2, 3.0, 0.0]])
    a0 = clt.encode(0, x)
    assert a0.tolist() == [[1.0, 0.0, 0.0]]  # 0.4 < threshold 0.5 for feature 1; feature 2 below by bias
    y = clt.decode([a0, a0])
    assert y[0].tolist() == [[0.0, 0.0, 0.0, 1.0]]
    assert y[1].tolist() == [[0.5, 0.5, 0.5, 2.5]]  # b_dec 0.5 + layer-0 and layer-1 feature 0


def test_hand_written_transcoder_set(tmp_path):
    d, F = 3, 2
    files = []
    for l in range(2):
        save_file({"W_enc": torch.eye(F, d), "W_dec": torch.ones(F, d) * (l + 1), "b_enc": torch.zeros(F),
                   "b_dec": torch.zeros(d)}, tmp_path / f"layer_{l}.safetensors")
        files.append(f"layer_{l}.safetensors")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out",
         "transcoders": files}))
    clt = load_clt(str(tmp_path))
    assert clt.activation == "relu" and clt.spans == [1, 1]
    a = clt.encode(1, torch.tensor([[2.0, -1.0, 5.0]]))
    assert a.tolist() == [[2.0, 0.0]]
    assert clt.decode([torch.zeros(1, F), a])[1].tolist() == [[4.0, 4.0, 4.0]]


def test_errors(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    clt = random_clt(lm, 8)
    url = str(tmp_path / "clt")
    save_clt(clt, url)
    with pytest.raises(CLTError, match="no CLT at"):
        load_clt(str(tmp_path / "missing"))
    # truncated safetensors
    f = tmp_path / "clt" / "W_dec_1.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CLTError, match="corrupt CLT file W_dec_1.safetensors"):
        load_clt(url)
    (tmp_path / "clt" / "W_dec_1.safetensors").unlink()
    with pytest.raises(CLTError, match="missing: W_dec_1.safetensors"):
        load_clt(url)
    # shape mismatch against another model
    with pytest.raises(CLTError, match="shape mismatch"):
        random_clt(tiny_models["gpt2"], 8).check_model(lm.n_layers, lm.d_model + 1)


def test_clt_for_another_model_rejected(tiny_models):
    from ct_ray import attribute
    from ct_ray.models.tiny import tiny_model

    other = tiny_model("llama", n_layers=2)
    clt = random_clt(other, 8)
    with pytest.raises(CLTError, match="shape mismatch"):
        attribute(tiny_models["llama"], clt, "hello")


# --- untrusted CLT folders (docs/security.md) ---------------------------------------------------------------------
def _tset(d, entries=None, W_enc=None):
    return transcoder_set(d, entries, 4, W_enc=W_enc)  # d_model 4, 3 features


def test_a_hand_built_transcoder_set_loads(tmp_path):
    assert load_clt(str(_tset(tmp_path / "ok"))).n_layers == 1


@pytest.mark.parametrize("entry", ["/etc/passwd", "file:///etc/passwd", "s3://bucket/x.safetensors",
                                   "../outside.safetensors", "sub/../../outside.safetensors", "~/x.safetensors",
                                   "C:/x.safetensors", ""])
def test_transcoder_files_must_stay_in_the_folder(tmp_path, entry):
    d = _tset(tmp_path / "clt", [entry])
    with pytest.raises(CLTError, match="relative path inside the CLT folder"):
        load_clt(str(d))


@pytest.mark.parametrize("target", ["/etc/passwd", "/dev/zero", "outside"])
def test_symlinks_out_of_the_folder_are_refused(tmp_path, target):
    (tmp_path / "outside").write_bytes(b"x" * 100)
    d = _tset(tmp_path / "clt")
    (d / "layer_0.safetensors").unlink()
    (d / "layer_0.safetensors").symlink_to(target if target.startswith("/") else tmp_path / target)
    with pytest.raises(CLTError, match="points outside the CLT folder"):
        load_clt(str(d))


def test_a_special_file_inside_the_folder_is_refused(tmp_path):
    import os

    d = _tset(tmp_path / "clt")
    (d / "layer_0.safetensors").unlink()
    os.mkfifo(d / "layer_0.safetensors")  # would block forever on read
    with pytest.raises(CLTError, match="not a regular file"):
        load_clt(str(d))


def test_file_size_is_checked_against_the_header(tmp_path):
    d = _tset(tmp_path / "clt")
    f = d / "layer_0.safetensors"
    f.write_bytes(f.read_bytes()[:-4])  # truncated
    with pytest.raises(CLTError, match="its header describes"):
        load_clt(str(d))
    f.write_bytes((10**12).to_bytes(8, "little") + b"{}")  # a header length beyond the file
    with pytest.raises(CLTError, match="not a safetensors file"):
        load_clt(str(d))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    W = torch.ones(3, 4)
    W[1, 2] = bad
    with pytest.raises(CLTError, match="non-finite values"):
        load_clt(str(_tset(tmp_path / "clt", W_enc=W)))


def test_config_yaml_aliases_and_size(tmp_path):
    d = _tset(tmp_path / "clt")
    (d / "config.yaml").write_text("a: &a [x, x]\nb: [*a, *a]\nmodel_kind: transcoder_set\n")
    with pytest.raises(CLTError, match="aliases"):
        load_clt(str(d))
    (d / "config.yaml").write_text("model_kind: transcoder_set\n#" + "x" * (1 << 20))
    with pytest.raises(CLTError, match="larger than"):
        load_clt(str(d))


def test_shapes_in_the_header_are_checked_before_the_data_is_read(tmp_path, monkeypatch):
    import ct_ray.clt.io as io

    d = _tset(tmp_path / "clt")
    save_file({"W_enc": torch.ones(3, 4), "W_dec": torch.ones(3, 4), "b_enc": torch.zeros(3), "b_dec": torch.zeros(5)},
              d / "layer_1.safetensors")
    (d / "config.yaml").write_text(yaml.safe_dump({"model_kind": "transcoder_set",
                                                   "transcoders": ["layer_0.safetensors", "layer_1.safetensors"]}))
    loaded, st_load = [], io.st_load
    monkeypatch.setattr(io, "st_load", lambda data: loaded.append(len(data)) or st_load(data))
    with pytest.raises(CLTError, match=r"tensor 'b_dec' has shape \(5,\), expected \(4,\)"):
        load_clt(str(d))
    assert len(loaded) == 1  # only layer 0's data was read


def test_lazy_decoders_are_memory_mapped_and_equal_a_full_read(tiny_models, tmp_path):
    """A local CLT's decoders are mapped, not read: same values and outputs as a full read. Attribution's rows come
    from the file while the map is clean, from the tensor once it was written in place (also through .data) or
    replaced, and from the file that was loaded even when the path is replaced later. The CLT still pickles."""
    import os
    import pickle

    from ct_ray.clt.lazy import decoder_rows, is_lazy

    lm = tiny_models["llama"]
    clt = random_clt(lm, 24, seed=3)
    save_clt(clt, str(tmp_path / "clt"))
    lazy, full = load_clt(str(tmp_path / "clt")), load_clt(str(tmp_path / "clt"), lazy_decoders=False)
    assert is_lazy(lazy) and not is_lazy(full)
    x = capture(lm, lm.encode("lazy decoders")).resid_mid[0]
    _same_outputs(lazy, full, x)
    acts = [lazy.encode(l, x) for l in range(lazy.n_layers)]
    for a, b in zip(lazy.decode(acts, active_only=True), full.decode(acts)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    idx = torch.tensor([[3, 4, 5], [23, 0, 3]])
    for l in range(lazy.n_layers):
        assert torch.equal(decoder_rows(lazy, l, idx), full.W_dec[l][idx])

    other = random_clt(lm, 24, seed=4)  # the path now holds another CLT: rows still come from the loaded files
    save_clt(other, str(tmp_path / "clt2"))
    os.rename(tmp_path / "clt", tmp_path / "old")
    os.rename(tmp_path / "clt2", tmp_path / "clt")
    assert torch.equal(decoder_rows(lazy, 1, idx), full.W_dec[1][idx])

    lazy.W_dec[1].data[4, 0, 2] = 7.0  # written in place, behind autograd's back
    assert decoder_rows(lazy, 1, idx)[0, 1, 0, 2] == 7.0
    assert torch.equal(decoder_rows(lazy, 2, idx), full.W_dec[2][idx])  # other layers are still clean maps
    lazy.W_dec[2] = torch.nn.Parameter(torch.zeros_like(full.W_dec[2]))  # replaced
    assert decoder_rows(lazy, 2, idx).abs().sum() == 0
    back = pickle.loads(pickle.dumps(lazy))
    assert torch.equal(back.W_dec[0], full.W_dec[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_mapped_decoders_are_refused(tiny_models, tmp_path, bad):
    lm = tiny_models["llama"]
    clt = random_clt(lm, 24, seed=3)
    with torch.no_grad():
        clt.W_dec[1][5, 0, 3] = bad
    save_clt(clt, str(tmp_path / "clt"))
    with pytest.raises(CLTError, match="W_dec_1.safetensors .*non-finite"):
        load_clt(str(tmp_path / "clt"))


def test_a_decoder_in_another_dtype_is_read_not_mapped(tiny_models, tmp_path):
    from ct_ray.clt.lazy import is_lazy

    lm = tiny_models["llama"]
    clt = random_clt(lm, 24, seed=3)
    save_clt(clt, str(tmp_path / "clt"))
    half = load_clt(str(tmp_path / "clt"), dtype=torch.bfloat16)
    assert not is_lazy(half) and half.W_dec[0].dtype == torch.bfloat16
    assert torch.equal(half.W_dec[2], clt.W_dec[2].to(torch.bfloat16))
