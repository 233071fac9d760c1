"""The CLI turns bad input into one line on stderr and a non-zero exit."""

import subprocess
import sys

import pytest

from ct_ray import random_clt, save_clt
from ct_ray.cli import main
from ct_ray.models import load_model


@pytest.fixture(scope="module")
def clt_dir(tiny_dir, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("clt") / "clt")
    save_clt(random_clt(load_model(str(tiny_dir)), 16, firing_rate=0.2), url)
    return url


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_attribute_writes_outputs(capsys, tiny_dir, clt_dir, tmp_path):
    code, out, err = _run(capsys, "attribute", "--model", str(tiny_dir), "--clt", clt_dir, "hello there",
                          "--out", str(tmp_path / "g"), "--quiet")
    assert code == 0, err
    assert "replacement=" in out and "completeness=" in out and "pruned:" in out
    for f in ("graph.json", "nodes.parquet", "edges.parquet", "pruned_nodes.parquet", "summary.json"):
        assert (tmp_path / "g" / f).exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["attribute", "--model", "{tiny}", "--clt", "{clt}", ""], "empty prompt"),
        (["attribute", "--model", "{tiny}", "--clt", "{clt}", "x" * 40], "more than the model context"),
        (["attribute", "--model", "no-such-model", "--random-clt", "8", "hi"], "unknown model"),
        (["attribute", "--model", "{tiny}", "--clt", "/nonexistent/clt", "hi"], "no CLT at"),
        (["attribute", "--model", "{tiny}", "--clt", "{other}", "hi"], "shape mismatch"),
        (["attribute", "--model", "{tiny}", "--clt", "{truncated}", "hi"], "corrupt CLT file"),
        (["attribute", "--model", "{tiny}", "hi"], "--random-clt"),
        (["attribute", "--model", "{tiny}", "--random-clt", "8", "--node-threshold", "2", "hi"], "node_threshold"),
    ],
)
def test_bad_input_one_line(capsys, tiny_dir, clt_dir, tmp_path, tiny_models, argv, message):
    other = str(tmp_path / "other")
    save_clt(random_clt(tiny_models["gpt2"], 8), other)
    trunc = str(tmp_path / "trunc")
    save_clt(random_clt(load_model(str(tiny_dir)), 8), trunc)
    f = tmp_path / "trunc" / "W_enc_1.safetensors"
    f.write_bytes(f.read_bytes()[:-20])
    argv = [a.format(tiny=tiny_dir, clt=clt_dir, other=other, truncated=trunc) for a in argv]
    code, out, err = _run(capsys, *argv, "--quiet")
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_console_entry_point(tiny_dir):
    """The installed command itself: real process, real exit code."""
    r = subprocess.run([sys.executable, "-m", "ct_ray.cli", "attribute", "--model", "nope", "--random-clt", "4", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("ct-ray: error: unknown model")
    r = subprocess.run([sys.executable, "-m", "ct_ray.cli", "models"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "smollm2-135m" in r.stdout


def test_the_local_ray_token_notice_is_dropped():
    """ct_ray's local Ray keeps token authentication on; Ray's notice about it at every start is dropped, nothing else."""
    import importlib
    import logging

    from ct_ray.executor.ray_start import _AUTH_LOGGER, _QuietTokenNotice

    importlib.import_module(_AUTH_LOGGER)  # the module that logs it is where the filter expects it

    def rec(msg):
        return logging.LogRecord(_AUTH_LOGGER, logging.WARNING, __file__, 1, msg, (), None)

    f = _QuietTokenNotice()
    assert not f.filter(rec("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ..."))
    assert f.filter(rec("Token authentication is disabled for this Ray cluster. Anyone with network access ..."))
