"""The CLT registry on a local directory and on a real S3 endpoint (moto): immutable versions, the production
pointer, history, rollback, and one-line errors from the CLI. No Ray."""

import json

import pytest

from ct_ray import load_clt, random_clt, save_clt
from ct_ray.cli import main
from ct_ray.errors import CTRayError
from ct_ray.models import load_model
from ct_ray.ops.promotion import decide
from ct_ray.ops.registry import Registry


@pytest.fixture(scope="module")
def clts(tiny_dir, tmp_path_factory):
    lm = load_model(str(tiny_dir))
    d = tmp_path_factory.mktemp("reg_clts")
    out = []
    for seed in (1, 2, 3):
        save_clt(random_clt(lm, 8, seed=seed, firing_rate=0.2), str(d / f"c{seed}"), extra={"seed": seed})
        out.append(str(d / f"c{seed}"))
    return out


@pytest.fixture(params=["local", "s3"])
def registry_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "registry")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3['bucket']}/registry-{tmp_path.name}"


def test_versions_pointer_history_rollback(clts, registry_url):
    reg = Registry(registry_url)
    assert not reg.exists() and reg.production() is None
    v1 = reg.register(clts[0], metrics={"fvu": 0.5}, provenance={"spec_hash": "abc", "parent": None}, date="2025-01-01")
    assert v1.startswith("20250101-") and reg.register(clts[0], date="2025-01-05") == v1  # same bytes: same version
    v2 = reg.register(clts[1], date="2025-01-02")
    v3 = reg.register(clts[2], date="2025-01-03")
    assert [m["version"] for m in reg.versions()] == [v1, v2, v3]
    m = reg.meta(v1)
    assert m["metrics"] == {"fvu": 0.5} and m["provenance"]["spec_hash"] == "abc" and m["created_at"]
    assert m["clt"]["features_per_layer"] == 8 and len(m["content_sha256"]) == 64
    # a version loads like any CLT, with its bytes unchanged
    a, b = load_clt(reg.version_url(v2)), load_clt(clts[1])
    assert all((x == y).all() for x, y in zip(a.W_enc, b.W_enc)) and a.meta["seed"] == 2

    assert reg.promote(v1)["seq"] == 1
    assert reg.promote(v1)["seq"] == 1  # promoting production again changes nothing
    reg.promote(v2)
    reg.promote(v3, reason="nightly")
    assert reg.production()["version"] == v3 and reg.production()["previous"] == v2
    r = reg.rollback()
    assert (r["version"], r["previous"], r["action"]) == (v2, v3, "rollback")
    reg.rollback(to=v1)
    assert reg.production_url() == reg.version_url(v1)
    assert [(h["seq"], h["version"], h["action"]) for h in reg.history()] == [
        (1, v1, "promote"), (2, v2, "promote"), (3, v3, "promote"), (4, v2, "rollback"), (5, v1, "rollback")]

    with pytest.raises(CTRayError, match="no version 'nope'"):
        reg.promote("nope")
    with pytest.raises(CTRayError, match="no version"):
        reg.rollback(to="../x")


def test_interrupted_writes_are_invisible(clts, tmp_path):
    reg = Registry(str(tmp_path / "r"))
    v1 = reg.register(clts[0])
    # a registration that died before its meta.json (the commit record): not a version, and redone cleanly
    v2 = reg.register(clts[1])
    (tmp_path / "r" / "versions" / v2 / "meta.json").unlink()
    assert [m["version"] for m in reg.versions()] == [v1]
    assert reg.register(clts[1]) == v2 and len(reg.versions()) == 2
    # a pointer change that died between its history entry and the pointer: the pointer is the truth
    reg.promote(v1)
    (tmp_path / "r" / "history" / "00000002.json").write_text(json.dumps({"seq": 2, "version": v2}))
    assert [h["version"] for h in reg.history()] == [v1] and reg.production()["version"] == v1
    reg.promote(v2)  # rewrites entry 2
    assert [h["version"] for h in reg.history()] == [v1, v2]
    assert not [p for p in (tmp_path / "r").rglob("*") if ".tmp-" in p.name]
    first = Registry(str(tmp_path / "r2"))
    first.promote(first.register(clts[0]))
    with pytest.raises(CTRayError, match="first production version"):
        first.rollback()


def test_cli(clts, tmp_path, capsys):
    url = str(tmp_path / "reg")
    assert main(["clt", "register", clts[0], "--registry", url]) == 0
    assert main(["clt", "register", clts[1], "--registry", url]) == 0
    v1, v2 = [m["version"] for m in Registry(url).versions()]
    assert main(["clt", "promote", v1, "--registry", url]) == 0
    assert main(["clt", "promote", v2, "--registry", url]) == 0
    assert main(["clt", "rollback", "--registry", url]) == 0
    capsys.readouterr()
    assert main(["clt", "list", "--registry", url]) == 0
    out = capsys.readouterr().out
    assert f"{v1}" in out and f"production: {v1}" in out and out.count(" *") == 1
    assert main(["clt", "show", v2, "--registry", url]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == v2
    assert main(["clt", "show", "--registry", url]) == 0
    assert [h["action"] for h in json.loads(capsys.readouterr().out)["history"]] == ["promote", "promote", "rollback"]


@pytest.mark.parametrize("argv,message", [
    (["clt", "list", "--registry", "{missing}"], "no CLT registry at"),
    (["clt", "show", "v0", "--registry", "{reg}"], "no version 'v0'"),
    (["clt", "promote", "v0", "--registry", "{reg}"], "no version 'v0'"),
    (["clt", "rollback", "--registry", "{reg}"], "no production version"),
    (["clt", "register", "{missing}", "--registry", "{reg}"], "no CLT at"),
])
def test_cli_errors_one_line(clts, tmp_path, capsys, argv, message):
    reg = str(tmp_path / "reg")
    Registry(reg).register(clts[0])
    argv = [a.format(missing=str(tmp_path / "missing"), reg=reg) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_decide_margins():
    prod = {"fvu": 0.30, "kl": 0.20, "top1_agreement": 0.80, "l0": 20.0, "replacement_score": 0.5,
            "completeness_score": 0.9}
    better = {**prod, "fvu": 0.25, "kl": 0.15, "top1_agreement": 0.82}
    m = {"fvu": 0.0, "kl": 0.0, "top1_agreement": 0.0}
    assert decide(better, prod, m)[0]
    assert decide(better, None, m) == (True, ["no production version yet"])
    assert not decide(better, prod, {**m, "fvu": 0.1})[0]  # not better by the margin
    ok, reasons = decide({**better, "kl": 0.5}, prod, m)
    assert not ok and any(r.startswith("kl:") and r.endswith("FAILED") for r in reasons)
    assert decide({**better, "kl": 0.21}, prod, {**m, "kl": -0.05})[0]  # a tolerated regression
    assert not decide({**better, "fvu": float("nan")}, prod, m)[0]


def test_symlinks_out_of_a_clt_are_never_registered(clts, tmp_path):
    import shutil

    src = tmp_path / "clt"
    shutil.copytree(clts[0], src)
    (tmp_path / "secret.txt").write_text("do not ship")
    (src / "notes.txt").symlink_to(tmp_path / "secret.txt")
    reg = Registry(str(tmp_path / "reg"))
    with pytest.raises(CTRayError, match="symlink out of the CLT folder"):
        reg.register(str(src))
    assert not list((tmp_path / "reg").rglob("secret*")) and not list((tmp_path / "reg").rglob("notes.txt"))


@pytest.mark.parametrize("pointer", [
    {"version": "../../etc", "previous": None, "seq": 1},
    {"version": "ok", "previous": "../x", "seq": 2},
    {"version": "ok", "previous": None},
    ["not", "a", "record"],
])
def test_a_tampered_production_pointer_is_refused(clts, tmp_path, capsys, pointer):
    url = str(tmp_path / "reg")
    reg = Registry(url)
    v1 = reg.register(clts[0])
    reg.promote(v1)
    (tmp_path / "reg" / "production.json").write_text(json.dumps(pointer))
    (tmp_path / "reg" / "history" / "00000009.json").write_text(json.dumps(pointer))
    before = sorted(p.name for p in (tmp_path / "reg" / "history").iterdir())
    for argv in (["clt", "list", "--registry", url], ["clt", "promote", v1, "--registry", url],
                 ["clt", "rollback", "--registry", url]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "production.json is invalid" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in (tmp_path / "reg" / "history").iterdir()) == before  # nothing recorded
    assert [m["version"] for m in reg.versions()] == [v1]


def test_a_clt_file_name_that_is_not_utf8_is_refused(clts, tmp_path):
    import os
    import shutil

    src = tmp_path / "clt"
    shutil.copytree(clts[0], src)
    with open(os.path.join(os.fsencode(src), b"notes-\xff.txt"), "wb") as f:
        f.write(b"x")
    with pytest.raises(CTRayError, match="not UTF-8"):
        Registry(str(tmp_path / "reg")).register(str(src))
