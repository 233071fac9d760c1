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


# --- start-up and the one options layer (issue 25) --------------------------------------------------------------
# Runs each command in this one fresh process and reports, per command, the heavy modules loaded so far.
_LIGHT_RUNNER = """
import json, sys
from ct_ray.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as e:  # --help, --version
        code = e.code
    out.append([argv, code, [m for m in ("torch", "transformers", "ray") if m in sys.modules]])
sys.stdout.write("\\nLOADED " + json.dumps(out) + "\\n")
"""


def test_light_commands_do_not_import_torch(tmp_path):
    """`--help`, `sql`, `tables`, `sweep status`, `export`, `serve` and every command's `--help` start without torch,
    transformers or Ray (benchmarks/cli.py times them)."""
    import json

    from ct_ray.cli import COMMANDS

    from .test_sql import _committed_store

    store = _committed_store(tmp_path / "store", sid="s1").url
    runs = [["--help"], ["--version"], ["sql", "SELECT count(*) FROM graphs", "--store", store],
            ["tables", "list", "--store", store], ["tables"], ["sweep", "status", "s1", "--store", store],
            ["sweep", "list", "--store", store], ["--debug", "sql", "SELECT 1", "--store", str(tmp_path / "empty")],
            *([name, "--help"] for name in COMMANDS), ["tables", "compact", "--help"], ["clt", "list", "--help"]]
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-c", _LIGHT_RUNNER, json.dumps(runs)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.rsplit("\nLOADED ", 1)[1])
    for argv, code, loaded in report:
        assert code == (2 if argv == ["tables"] else 0), (argv, r.stderr[-2000:])
        assert loaded == [], f"ct-ray {' '.join(argv)} imported {loaded}"


def _all_parsers(p, path=("ct-ray",)):
    import argparse

    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _all_parsers(sp, (*path, name))


def _options(p) -> set[str]:
    return {o for a in p._actions for o in a.option_strings}


def test_every_option_has_help_and_debug_goes_anywhere(capsys, tmp_path):
    import argparse

    from ct_ray import __version__
    from ct_ray.cli import build_parser

    for path, p in _all_parsers(build_parser()):
        for a in p._actions:
            if not isinstance(a, argparse._SubParsersAction):
                assert a.help and a.help != argparse.SUPPRESS, f"{' '.join(path)} {a.option_strings or a.dest}: no help"
        assert "--debug" in _options(p), path
    p = build_parser()
    assert p.parse_args(["--debug", "tables", "list"]).debug and p.parse_args(["tables", "list", "--debug"]).debug
    assert not p.parse_args(["tables", "list"]).debug
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"ct-ray {__version__}"
    for group, commands in ((["tables"], "list, compact, expire, vacuum, recover, import"), (["clt"], "random, list"),
                            ([], "models, attribute")):
        code, out, err = _run(capsys, *group)
        assert code == 2 and out.startswith(f"usage: {' '.join(['ct-ray', *group])}"), out  # the group's help
        assert len(err.strip().splitlines()) == 1 and commands in err and "tables_cmd" not in err, err


def test_one_options_layer():
    """Every command that opens a store takes --store/--catalog/--endpoint-url; every long one --no-progress (alias
    --quiet); attribute's and perturb's defaults are the specs'."""
    from ct_ray.cli import build_parser
    from ct_ray.specs import AttributionSpec, PruneSpec
    from ct_ray.specs.intervention import ValidationSpec

    parsers = {" ".join(path[1:]): p for path, p in _all_parsers(build_parser())}
    store_cmds = ["sql", "sweep", "serve", "features", "export", "analyze", "diff", "tables list", "tables compact",
                  "tables expire", "tables vacuum", "tables import"]
    for c in store_cmds:
        assert {"--store", "--catalog", "--endpoint-url"} <= _options(parsers[c]), c
    for c in ["attribute", "perturb", "harvest", "train", "demo", "sweep", "features", "export", "analyze", "diff",
              "tables compact", "tables import"]:
        acts = {o: a for a in parsers[c]._actions for o in a.option_strings}
        assert acts["--quiet"] is acts["--no-progress"] and acts["--quiet"].dest == "no_progress", c
    a = parsers["attribute"].parse_args(["hi"])
    for f in ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes", "heads_top", "qk_topk"):
        assert getattr(a, f) == AttributionSpec.field_default(f), f
    for f in ("node_threshold", "edge_threshold"):
        assert getattr(a, f) == PruneSpec.field_default(f) == getattr(parsers["perturb"].parse_args([]), f), f
    pt = parsers["perturb"].parse_args([])
    assert (pt.top_k, pt.batch_size) == (ValidationSpec.field_default("top_k"), ValidationSpec.field_default("batch_size"))


def test_store_flags_override_the_specs_storage(tmp_path, monkeypatch):
    """`sweep SPEC` and `features` take the same --store/--catalog/--endpoint-url, applied over the spec's `storage:`."""
    import ct_ray.features.job as fjob
    import ct_ray.sweep.runner as runner

    seen = {}

    class Stop(Exception):
        pass

    def capture(name):
        def fn(spec, **kw):
            seen[name] = spec.storage
            raise Stop

        return fn

    monkeypatch.setattr(runner, "run_sweep", capture("sweep"))
    monkeypatch.setattr(fjob, "run_features", capture("features"))
    spec = tmp_path / "sweep.yaml"
    spec.write_text("sweep_id: s\nmodel: m\nrandom_clt: {features: 4}\nprompts: [{prompt: hi}]\n"
                    "storage: {url: /spec/store, endpoint_url: http://spec:9000}\n")
    cat = f"sqlite:///{tmp_path}/c.db"
    for argv, name in ((["sweep", str(spec), "--store", str(tmp_path / "st"), "--catalog", cat], "sweep"),
                       (["features", "--random-clt", "4", "--store", str(tmp_path / "st"), "--catalog", cat,
                         "--endpoint-url", "http://flag:9000"], "features")):
        with pytest.raises(Stop):
            main([*argv, "--debug"])  # --debug: main lets the exception through
        st = seen[name]
        assert (st.url, st.catalog) == (str(tmp_path / "st"), cat), name
        assert st.endpoint_url == ("http://spec:9000" if name == "sweep" else "http://flag:9000")
