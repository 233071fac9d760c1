"""Bad input, as a hostile or careless user would give it (issue 15; docs/security.md): every case must end in one
line on stderr (no traceback), the expected exit code, and nothing written where nothing should be.

The table runs the CLI in-process (`ct_ray.cli.main`) over one shared world of files built once: a tiny model, a
valid CLT, a store with committed rows, and many broken CLT folders, spec files and stores. Explorer/HTTP cases
are in test_explorer_hardening.py."""

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ct_ray.cli import main
from tests._helpers import transcoder_set

SENTINEL = "SENTINEL-DO-NOT-READ"
D = 64  # d_model of the tiny Llama


@dataclass
class Case:
    id: str
    argv: list[str]
    message: str  # a substring of the one stderr line
    code: int = 2
    hint_lines: int = 0  # lines of the tool's own help after it (DuckDB's candidates and caret for SQL mistakes)


def _tset(d: Path, entries=None, **tensors) -> str:
    return str(transcoder_set(d, entries, D, **tensors))  # one layer, the tiny model's d_model


def _cfg(d: Path, text: str | bytes) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(d)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every file the cases name, keyed by placeholder."""
    from ct_ray import load_model, random_clt, save_clt
    from ct_ray.models.tiny import save_tiny
    from ct_ray.ops.registry import Registry
    from ct_ray.store.commit import append_rows
    from ct_ray.store.tables import Store

    root = tmp_path_factory.mktemp("adversarial")
    w = {"root": str(root)}
    (root / "outside.txt").write_text(SENTINEL)
    tiny = save_tiny("llama", root / "tiny", n_layers=2, max_pos=32)
    w["tiny"] = str(tiny)
    lm = load_model(str(tiny))
    assert lm.d_model == D
    w["clt"] = str(root / "clt")
    save_clt(random_clt(lm, 8, seed=1), w["clt"])
    # models
    (root / "pickle_model").mkdir()
    shutil.copy(tiny / "config.json", root / "pickle_model" / "config.json")
    torch.save({"w": torch.zeros(2)}, root / "pickle_model" / "pytorch_model.bin")
    w["pickle_model"] = str(root / "pickle_model")
    (root / "no_config_model").mkdir()
    w["no_config_model"] = str(root / "no_config_model")
    # CLT folders
    c = root / "clts"
    (c / "no_config").mkdir(parents=True)
    w["clt_no_config"] = str(c / "no_config")
    w["clt_binary_config"] = _cfg(c / "binary_config", b"\xff\xfe\x00model_kind")
    w["clt_bad_yaml"] = _cfg(c / "bad_yaml", "model_kind: [unclosed\n")
    w["clt_list_config"] = _cfg(c / "list_config", "- a\n- b\n")
    w["clt_alias"] = _cfg(c / "alias", "a: &a [x, x]\nb: [*a, *a]\n")
    w["clt_huge_config"] = _cfg(c / "huge_config", "model_kind: transcoder_set\n#" + "x" * (2 << 20))
    w["clt_kind"] = _cfg(c / "kind", "model_kind: pickle_of_doom\n")
    w["clt_hook"] = _cfg(c / "hook", "feature_input_hook: hook_anything\n")
    w["clt_not_list"] = _cfg(c / "not_list", "model_kind: transcoder_set\ntranscoders: {a: 1}\n")
    w["clt_repeated"] = _tset(c / "repeated", ["layer_0.safetensors"] * 1500)
    w["clt_repeated_dot"] = _tset(c / "repeated_dot", ["layer_0.safetensors", "./layer_0.safetensors"])
    w["clt_many"] = _tset(c / "many", [f"layer_{i}.safetensors" for i in range(2000)])
    w["clt_nul"] = _tset(c / "nul", ["layer_0.safetensors\x00.bin"])
    w["clt_abs"] = _tset(c / "abs", [str(root / "outside.txt")])
    w["clt_etc"] = _tset(c / "etc", ["/etc/passwd"])
    w["clt_url"] = _tset(c / "url", ["http://169.254.169.254/latest/meta-data"])
    w["clt_file_url"] = _tset(c / "file_url", ["file:///etc/passwd"])
    w["clt_dotdot"] = _tset(c / "dotdot", ["../../outside.txt"])
    w["clt_home"] = _tset(c / "home", ["~/.aws/credentials"])
    for name, target in (("link_etc", "/etc/passwd"), ("link_zero", "/dev/zero"), ("link_out", root / "outside.txt")):
        d = Path(_tset(c / name))
        (d / "layer_0.safetensors").unlink()
        (d / "layer_0.safetensors").symlink_to(target)
        w[f"clt_{name}"] = str(d)
    d = Path(_tset(c / "fifo"))
    (d / "layer_0.safetensors").unlink()
    os.mkfifo(d / "layer_0.safetensors")
    w["clt_fifo"] = str(d)
    d = Path(_tset(c / "truncated"))
    (d / "layer_0.safetensors").write_bytes((d / "layer_0.safetensors").read_bytes()[:-8])
    w["clt_truncated"] = str(d)
    d = Path(_tset(c / "big_header"))
    (d / "layer_0.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    w["clt_big_header"] = str(d)
    d = Path(_tset(c / "not_json_header"))
    (d / "layer_0.safetensors").write_bytes((4).to_bytes(8, "little") + b"nope")
    w["clt_bad_header"] = str(d)
    nan = torch.ones(3, D)
    nan[0, 0] = float("nan")
    w["clt_nan"] = _tset(c / "nan", W_enc=nan)
    w["clt_inf"] = _tset(c / "inf", b_dec=torch.full((D,), float("inf")))
    w["clt_skip"] = _tset(c / "skip", W_skip=torch.zeros(D, D))
    w["clt_wrong_d"] = _tset(c / "wrong_d", W_enc=torch.ones(3, 7), W_dec=torch.ones(3, 7), b_dec=torch.zeros(7))
    d = root / "clt_symlinked"
    shutil.copytree(w["clt"], d)
    (d / "README").symlink_to(root / "outside.txt")
    w["clt_symlinked"] = str(d)
    # spec files
    s = root / "specs"
    s.mkdir()
    for name, data in (("binary", b"\x00\xff\xfe\x01"), ("empty", b""), ("list", b"- 1\n- 2\n"),
                       ("bad_yaml", b"sweep_id: [\n"), ("alias", b"a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"),
                       ("unknown_field", b"sweep_id: s\nmodel: m\nprompts: [a]\nrandom_clt: {features: 4}\nbogus: 1\n"),
                       ("secret", b"sweep_id: s\nmodel: m\nprompts: [a]\nrandom_clt: {features: 4}\n"
                                  b"storage: {url: s3://b/x, options: {secret: abc}}\n"),
                       ("latin1", "sweep_id: caf\xe9\n".encode("latin-1"))):
        (s / f"{name}.yaml").write_bytes(data)
        w[f"spec_{name}"] = str(s / f"{name}.yaml")
    w["spec_dir"] = str(s)
    w["spec_missing"] = str(s / "missing.yaml")
    # stores
    st = Store(str(root / "store"))
    import pyarrow as pa

    append_rows(st, "graphs", "s1", pa.Table.from_pylist([{"key": "a", "prompt_index": 0, "status": "ok"}]))
    w["store"] = st.url
    st2 = Store(str(root / "corrupt_store"))
    append_rows(st2, "graphs", "s1", pa.Table.from_pylist([{"key": "a", "prompt_index": 0, "status": "ok"}]))
    for f in (root / "corrupt_store" / "warehouse").rglob("*.parquet"):
        f.write_bytes(b"PAR1 garbage PAR1")
    w["corrupt_store"] = st2.url
    # graph keys written into a store by hand (anyone who can write the store can): names that are paths
    st3 = Store(str(root / "evil_store"))
    for sid, key in (("s1", "x/../../../PWNED"), ("s2", "..")):  # complete graphs: exported but for their keys
        append_rows(st3, "graphs", sid, pa.Table.from_pylist([{"key": key, "prompt_index": 0, "status": "ok",
                                                               "prompt": "hi", "token_strs": ["hi"]}]))
        append_rows(st3, "nodes", sid, pa.Table.from_pylist([
            {"key": key, "node": 0, "node_id": "E_1_0", "kind": "embedding", "layer": -1, "position": 0, "feature": -1,
             "token": 1, "token_str": "hi", "activation": 1.0, "influence": 0.5, "kept": True},
            {"key": key, "node": 1, "node_id": "2_7_0", "kind": "logit", "layer": 2, "position": 0, "feature": -1,
             "token": 7, "token_str": "x", "activation": 1.0, "probability": 0.9, "influence": 0.0, "kept": True}]))
        append_rows(st3, "edges", sid, pa.Table.from_pylist([{"key": key, "source": 0, "target": 1, "weight": 1.0,
                                                              "kept": True}]))
    w["evil_store"] = st3.url
    (root / "bad_catalog_store").mkdir()
    (root / "bad_catalog_store" / "catalog.db").write_bytes(b"this is not sqlite" * 100)
    w["bad_catalog_store"] = str(root / "bad_catalog_store")
    (root / "a_file").write_text("not a folder")
    w["a_file"] = str(root / "a_file")
    (root / "work").mkdir()
    (root / "work" / "notes.txt").write_text("precious")
    w["work"] = str(root / "work")
    # a registry whose production pointer was tampered with
    reg = Registry(str(root / "registry"))
    v = reg.register(w["clt"])
    reg.promote(v)
    (root / "registry" / "production.json").write_text(json.dumps({"version": "../../etc", "previous": v, "seq": 2}))
    w["registry"] = reg.url
    return w


T, C = "{tiny}", "{clt}"
ATTR = ["attribute", "--quiet", "--model", T]
SQL = ["sql", "--store", "{store}"]
CASES = [
    # --- the command line itself
    Case("no-command", [], "required"),
    Case("unknown-command", ["frobnicate"], "invalid choice"),
    Case("argv-not-utf8", ["sql", "SELECT '\udcff'"], "not valid UTF-8"),
    Case("store-not-utf8", ["sql", "--store", "/tmp/\udcfe", "SELECT 1"], "not valid UTF-8"),
    Case("features-zero", ["clt", "random", "--model", T, "--features", "0", "--out", "{root}/r0"], "at least 1"),
    Case("features-negative", ["clt", "random", "--model", T, "--features", "-5", "--out", "{root}/r1"], "at least 1"),
    Case("features-word", ["clt", "random", "--model", T, "--features", "many", "--out", "{root}/r2"], "invalid"),
    Case("span-zero", ["clt", "random", "--model", T, "--span", "0", "--out", "{root}/r3"], "at least 1"),
    Case("random-clt-zero", ATTR + ["--random-clt", "0", "hi"], "at least 1"),
    Case("batch-size-zero", ATTR + ["--random-clt", "4", "--batch-size", "0", "hi"], "batch_size"),
    Case("node-threshold", ATTR + ["--random-clt", "4", "--node-threshold", "2", "hi"], "node_threshold"),
    Case("no-clt", ATTR + ["hi"], "--random-clt"),
    Case("empty-prompt", ATTR + ["--clt", C, ""], "empty prompt"),
    Case("long-prompt", ATTR + ["--clt", C, "x" * 64], "more than the model context"),
    Case("bad-slug", ATTR + ["--random-clt", "4", "--out", "{root}/g", "--slug", "../escape", "hi"], "slug"),
    Case("out-is-a-file", ATTR + ["--random-clt", "4", "--out", "{a_file}", "hi"], "{a_file}"),
    Case("out-is-users-folder", ATTR + ["--random-clt", "4", "--out", "{work}", "hi"], "not a folder of ct_ray graphs"),
    Case("features-huge", ["clt", "random", "--model", T, "--features", str(10**12), "--out", "{root}/r4"],
         "GiB, more than half"),
    Case("out-replaces-a-folder", ["clt", "random", "--model", T, "--features", "4", "--out", "{work}"],
         "not a folder ct_ray wrote"),
    Case("out-replaces-a-file", ["clt", "random", "--model", T, "--features", "4", "--out", "{a_file}"],
         "not a folder ct_ray wrote"),
    Case("sql-format", SQL + ["--format", "xml", "SELECT 1"], "invalid choice"),
    # --- models
    Case("unknown-model", ["attribute", "--model", "no-such-model", "--random-clt", "4", "hi"], "unknown model"),
    Case("pickle-only-model", ["attribute", "--model", "{pickle_model}", "--random-clt", "4", "hi"], "model.safetensors"),
    Case("model-without-config", ["attribute", "--model", "{no_config_model}", "--random-clt", "4", "hi"], "no config.json"),
    # --- spec files
    Case("spec-binary", ["sweep", "{spec_binary}"], "not a UTF-8 text file"),
    Case("spec-latin1", ["sweep", "{spec_latin1}"], "not a UTF-8 text file"),
    Case("spec-binary-train", ["train", "{spec_binary}"], "not a UTF-8 text file"),
    Case("spec-binary-harvest", ["harvest", "{spec_binary}"], "not a UTF-8 text file"),
    Case("spec-binary-submit", ["submit", "{spec_binary}"], "not a UTF-8 text file"),
    Case("spec-empty", ["sweep", "{spec_empty}"], "empty.yaml"),
    Case("spec-list", ["sweep", "{spec_list}"], "list.yaml"),
    Case("spec-bad-yaml", ["sweep", "{spec_bad_yaml}"], "not valid YAML"),
    Case("spec-alias", ["sweep", "{spec_alias}"], "alias"),
    Case("spec-unknown-field", ["sweep", "{spec_unknown_field}"], "bogus"),
    Case("spec-secret", ["sweep", "{spec_secret}"], "secret"),
    Case("spec-missing", ["sweep", "{spec_missing}"], "missing.yaml"),
    Case("spec-directory", ["sweep", "{spec_dir}"], "specs"),
    # --- untrusted CLT folders
    Case("clt-missing", ATTR + ["--clt", "{root}/nothing", "hi"], "no CLT at"),
    Case("clt-no-config", ATTR + ["--clt", "{clt_no_config}", "hi"], "no config.yaml"),
    Case("clt-binary-config", ATTR + ["--clt", "{clt_binary_config}", "hi"], "not UTF-8"),
    Case("clt-bad-yaml", ATTR + ["--clt", "{clt_bad_yaml}", "hi"], "not valid YAML"),
    Case("clt-list-config", ATTR + ["--clt", "{clt_list_config}", "hi"], "not a mapping"),
    Case("clt-alias", ATTR + ["--clt", "{clt_alias}", "hi"], "aliases"),
    Case("clt-huge-config", ATTR + ["--clt", "{clt_huge_config}", "hi"], "larger than"),
    Case("clt-kind", ATTR + ["--clt", "{clt_kind}", "hi"], "unknown model_kind"),
    Case("clt-hook", ATTR + ["--clt", "{clt_hook}", "hi"], "unsupported feature_input_hook"),
    Case("clt-not-list", ATTR + ["--clt", "{clt_not_list}", "hi"], "must be a list"),
    Case("clt-repeated-file", ATTR + ["--clt", "{clt_repeated}", "hi"], "listed twice"),
    Case("clt-repeated-dot", ATTR + ["--clt", "{clt_repeated_dot}", "hi"], "listed twice"),
    Case("clt-too-many-layers", ATTR + ["--clt", "{clt_many}", "hi"], "more than 1024 layers"),
    Case("clt-nul-entry", ATTR + ["--clt", "{clt_nul}", "hi"], "NUL byte"),
    Case("clt-abs-path", ATTR + ["--clt", "{clt_abs}", "hi"], "inside the CLT folder"),
    Case("clt-etc-passwd", ATTR + ["--clt", "{clt_etc}", "hi"], "inside the CLT folder"),
    Case("clt-url", ATTR + ["--clt", "{clt_url}", "hi"], "inside the CLT folder"),
    Case("clt-file-url", ATTR + ["--clt", "{clt_file_url}", "hi"], "inside the CLT folder"),
    Case("clt-dotdot", ATTR + ["--clt", "{clt_dotdot}", "hi"], "inside the CLT folder"),
    Case("clt-home", ATTR + ["--clt", "{clt_home}", "hi"], "inside the CLT folder"),
    Case("clt-symlink-etc", ATTR + ["--clt", "{clt_link_etc}", "hi"], "outside the CLT folder"),
    Case("clt-symlink-dev-zero", ATTR + ["--clt", "{clt_link_zero}", "hi"], "outside the CLT folder"),
    Case("clt-symlink-out", ATTR + ["--clt", "{clt_link_out}", "hi"], "outside the CLT folder"),
    Case("clt-fifo", ATTR + ["--clt", "{clt_fifo}", "hi"], "not a regular file"),
    Case("clt-truncated", ATTR + ["--clt", "{clt_truncated}", "hi"], "header describes"),
    Case("clt-header-length", ATTR + ["--clt", "{clt_big_header}", "hi"], "not a safetensors file"),
    Case("clt-header-json", ATTR + ["--clt", "{clt_bad_header}", "hi"], "bad safetensors header"),
    Case("clt-nan", ATTR + ["--clt", "{clt_nan}", "hi"], "non-finite"),
    Case("clt-inf", ATTR + ["--clt", "{clt_inf}", "hi"], "non-finite"),
    Case("clt-skip", ATTR + ["--clt", "{clt_skip}", "hi"], "W_skip"),
    Case("clt-wrong-width", ATTR + ["--clt", "{clt_wrong_d}", "hi"], "mismatch"),
    # --- stores
    Case("sql-no-store", ["sql", "--store", "{root}/no_store", "SELECT 1"], "no store at"),
    Case("sql-store-is-file", ["sql", "--store", "{a_file}", "SELECT 1"], "no store at"),
    Case("sql-store-glob", ["sql", "--store", "{root}/sto*", "SELECT * FROM graphs"], "glob characters"),
    Case("sql-store-brackets", ["sql", "--store", "{root}/[s]tore", "SELECT * FROM graphs"], "glob characters"),
    Case("sql-corrupt-parquet", ["sql", "--store", "{corrupt_store}", "SELECT * FROM graphs"], "cannot read table graphs"),
    Case("sql-bad-catalog", ["sql", "--store", "{bad_catalog_store}", "SELECT * FROM graphs"], "catalog"),
    Case("sweep-status-no-store", ["sweep", "status", "s1", "--store", "{root}/no_store"], "no store at"),
    Case("sweep-list-no-store", ["sweep", "list", "--store", "{root}/no_store"], "no store at"),
    Case("tables-list-no-store", ["tables", "list", "--store", "{root}/no_store"], "no store at"),
    Case("tables-vacuum-no-store", ["tables", "vacuum", "--store", "{root}/no_store"], "no store at"),
    Case("export-key-traversal", ["export", "--store", "{evil_store}", "--sweep", "s1", "--all", "--out", "{root}/exp/o"],
         "is not a safe name"),
    Case("export-key-dotdot", ["export", "--store", "{evil_store}", "--sweep", "s2", "--all", "--out", "{root}/exp/o"],
         "is not a safe name"),
    Case("export-asked-traversal", ["export", "--store", "{evil_store}", "--sweep", "s1", "--keys", "x/../../../PWNED",
                                    "--out", "{root}/exp/o"], "is not a safe name"),
    Case("export-sweep-traversal", ["export", "--store", "{store}", "--sweep", "../s1", "--all", "--out", "{root}/exp/o"],
         "is not a safe name"),
    # --- SQL text
    Case("sql-empty", SQL + [""], "give a query"),
    Case("sql-syntax", SQL + ["SELEC 1"], "SQL error", hint_lines=2),
    Case("sql-unknown-column", SQL + ["SELECT nope FROM graphs"], "SQL error", hint_lines=1),
    Case("sql-read-passwd", SQL + ["SELECT * FROM read_csv('/etc/passwd')"], "Permission Error"),
    Case("sql-read-outside", SQL + ["SELECT * FROM read_text('{root}/outside.txt')"], "Permission Error"),
    Case("sql-read-catalog", SQL + ["SELECT * FROM read_blob('{store}/catalog.db')"], "Permission Error"),
    Case("sql-glob", SQL + ["SELECT * FROM glob('/*')"], "Permission Error"),
    Case("sql-copy", SQL + ["COPY graphs TO '{store}/forged.csv'"], "not COPY"),
    Case("sql-copy-select", SQL + ["COPY (SELECT 1) TO '{root}/forged.parquet'"], "not COPY"),
    Case("sql-explain-analyze-copy", SQL + ["EXPLAIN ANALYZE COPY graphs TO '{store}/f.csv'"], "only EXPLAIN"),
    Case("sql-attach", SQL + ["ATTACH '{root}/x.duckdb' AS x"], "not ATTACH"),
    Case("sql-install", SQL + ["INSTALL httpfs"], "read-only"),
    Case("sql-load", SQL + ["LOAD httpfs"], "read-only"),
    Case("sql-pragma", SQL + ["PRAGMA database_list"], "not PRAGMA"),
    Case("sql-set", SQL + ["SET enable_external_access = true"], "not SET"),
    Case("sql-create", SQL + ["CREATE TABLE t AS SELECT 1"], "not CREATE"),
    Case("sql-create-secret", SQL + ["CREATE SECRET (TYPE s3, KEY_ID 'k', SECRET 's')"], "not CREATE"),
    Case("sql-two-statements", SQL + ["SELECT 1; SELECT 2"], "exactly one SQL statement"),
    Case("sql-smuggled-copy", SQL + ["SELECT 1; COPY graphs TO '{root}/f.csv'"], "exactly one SQL statement"),
    Case("sql-call", SQL + ["CALL pragma_version()"], "not CALL"),
    Case("sql-checkpoint", SQL + ["CHECKPOINT"], "read-only"),
    Case("sql-runs-forever", SQL + ["--timeout", "1", "SELECT sum(hash(i)) FROM range(100000000000) t(i)"],
         "SQL stopped after 1 s"),
    Case("sql-memory-hog", SQL + ["--memory-limit", "100MB",
                                  "SELECT length(string_agg(i::VARCHAR, ',')) FROM range(100000000) t(i)"],
         "more memory than its limit"),
    Case("sql-bad-memory-limit", SQL + ["--memory-limit", "lots", "SELECT 1"], "bad memory limit"),
    # --- registry
    Case("registry-missing", ["clt", "list", "--registry", "{root}/no_registry"], "no CLT registry"),
    Case("registry-tampered-list", ["clt", "list", "--registry", "{registry}"], "production.json is invalid"),
    Case("registry-tampered-rollback", ["clt", "rollback", "--registry", "{registry}"], "production.json is invalid"),
    Case("registry-version-traversal", ["clt", "show", "../../etc", "--registry", "{registry}"], "no version"),
    Case("registry-symlink-out", ["clt", "register", "{clt_symlinked}", "--registry", "{root}/reg2"],
         "symlink out of the CLT folder"),
]


def _tree(root: str) -> dict[str, tuple[int, int]]:
    """Every file under root (size, mtime): what a case must leave as it was."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def test_the_table_is_large_enough():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world, case, capsys):
    argv = [a.format(**world) for a in case.argv]
    before = _tree(world["root"])
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    # one line (library progress bars and warnings aside: there are none here), plus any hint lines the case expects
    assert len(lines) == 1 + case.hint_lines, err
    assert code == case.code, err
    assert case.message.format(**world) in lines[0], lines[0]
    assert lines[0].startswith("ct-ray"), lines[0]
    assert SENTINEL not in err + out  # nothing from outside was read back
    assert _tree(world["root"]) == before  # nothing written


# --- faults that need a server or a cluster ------------------------------------------------------------------------
@pytest.fixture
def silent_server():
    """A server (an 'S3 endpoint', a 'PostgreSQL catalog') that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


@pytest.mark.parametrize("argv", [["sql", "SELECT * FROM graphs"], ["sweep", "list"], ["tables", "list"]])
def test_an_s3_endpoint_that_never_answers_fails_in_bounded_time(silent_server, monkeypatch, capsys, argv):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("CT_RAY_S3_READ_TIMEOUT", "1")  # the defaults (5 s connect, 6 s read, 2 tries) take ~30 s
    t = time.monotonic()
    code = main(argv + ["--store", "s3://bucket/store", "--endpoint-url", f"http://{silent_server}"])
    took = time.monotonic() - t
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the store" in err and len(err.strip().splitlines()) == 1, err
    assert took < 20, took


def test_s3_writes_to_an_endpoint_that_never_answers_fail_in_bounded_time(world, silent_server, monkeypatch, capsys):
    """Issue 21 item 5: a PUT waiting for its `100 Continue` used to wait forever (the store write check of
    `ct-ray sweep`); every S3 request is now bounded as a whole, and the error names what was written."""
    from ct_ray.errors import StorageError
    from ct_ray.store.tables import Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("CT_RAY_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("CT_RAY_S3_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{silent_server}")
    t = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot write s3://bucket/w/_sweeps/.*timed out"):
        Store("s3://bucket/w").check_writable()
    code = main(["clt", "random", "--model", world["tiny"], "--features", "4", "--out", "s3://bucket/clt"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write s3://bucket/clt: timed out" in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - t < 60


def test_a_catalog_that_never_answers_fails_in_bounded_time(world, silent_server, capsys):
    t = time.monotonic()
    code = main(["sql", "--store", world["store"], "--catalog", f"postgresql://ct_ray@{silent_server}/db",
                 "SELECT * FROM graphs"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot open the table catalog" in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - t < 60


def test_s3_timeouts_are_bounded_by_default():
    from ct_ray.store.fs import S3_RETRIES, filesystem
    from ct_ray.store.tables import io_properties

    fs, _ = filesystem("s3://bucket/x", endpoint_url="http://127.0.0.1:9")
    ck = fs.config_kwargs if hasattr(fs, "config_kwargs") else {}
    assert ck["connect_timeout"] <= 10 and ck["read_timeout"] <= 10 and ck["retries"]["max_attempts"] == 1
    assert fs.retries == S3_RETRIES <= 3
    props = io_properties("s3://bucket/x", {})
    assert float(props["s3.connect-timeout"]) <= 10 and float(props["s3.request-timeout"]) <= 10


def test_unsatisfiable_num_cpus_fails_after_a_bounded_wait(ray_local, tiny_dir, tmp_path, monkeypatch):
    from ct_ray.errors import CTRayError
    from ct_ray.sweep import parse_sweep_spec, run_sweep

    monkeypatch.setenv("CT_RAY_RESOURCE_WAIT_S", "3")
    spec = parse_sweep_spec({"sweep_id": "huge", "model": str(tiny_dir), "random_clt": {"features": 4},
                             "prompts": ["a b"], "storage": str(tmp_path / "store"),
                             "resources": {"workers": 1, "num_cpus": 512}})
    t = time.monotonic()
    with pytest.raises(CTRayError, match="no sweep worker could start .* num_cpus=512") as e:
        run_sweep(spec, progress=False)
    assert time.monotonic() - t < 60 and "\n" not in str(e.value)


def test_sql_into_a_closed_pipe_exits_quietly(world, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ct_ray.cli", "sql", "--store", world["store"], "--max-rows", "200000",
           "SELECT * FROM range(200000)"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # like `| head -1`
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert p.returncode == 141


def test_the_explorer_refuses_a_missing_store(world, capsys):
    before = _tree(world["root"])
    assert main(["serve", "--store", f"{world['root']}/no_store", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "no store at" in err and len(err.strip().splitlines()) == 1, err
    assert _tree(world["root"]) == before


def test_unsatisfiable_features_workers_fail_after_a_bounded_wait(ray_local, tiny_dir, tmp_path, monkeypatch):
    from ct_ray.errors import CTRayError
    from ct_ray.features import parse_features_spec, run_features

    monkeypatch.setenv("CT_RAY_RESOURCE_WAIT_S", "3")
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    spec = parse_features_spec({"model": str(tiny_dir), "random_clt": {"features": 4}, "corpus": [str(tmp_path / "corpus.txt")],
                                "context_len": 16, "n_contexts": 4, "workers": 1, "num_cpus": 512,
                                "storage": str(tmp_path / "store")})
    with pytest.raises(CTRayError, match="no features worker could start .* num_cpus=512"):
        run_features(spec)


def test_store_writes_stay_inside_the_store(tmp_path):
    """Every writer goes through Store.put_bytes / write_json: a relative path that climbs out, or a symlinked folder
    inside the store that leads out, is refused before anything is created (issue 21, item 1)."""
    from ct_ray.errors import StorageError
    from ct_ray.store.names import check_name
    from ct_ray.store.tables import Store

    st = Store(str(tmp_path / "st"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "_sweeps").symlink_to(outside)
    for rel in ("../PWNED.json", "_sweeps/../../PWNED.json", "a//b.json", "./x.json", "a/\x00.json"):
        with pytest.raises(StorageError, match="leaves its store folder"):
            st.write_json(rel, {})
        with pytest.raises(StorageError, match="leaves its store folder"):
            st.read_json(rel)
    with pytest.raises(StorageError, match="outside the folder"):
        st.put_bytes(str(tmp_path / "PWNED.json"), b"x")
    with pytest.raises(StorageError, match="outside"):
        st.write_json("_sweeps/s1/plan.json", {})  # through the symlink
    assert not list(outside.iterdir()) and not (tmp_path / "PWNED.json").exists()
    st.write_json("ok/plan.json", {"a": 1})
    assert st.read_json("ok/plan.json") == {"a": 1}
    for bad in ("", ".", "..", "-x", ".hidden", "a/b", "a\\b", "x" * 129, None, 3, "é"):
        with pytest.raises(Exception, match="not a safe name"):
            check_name(bad, "key")
    assert check_name("s1-abc.v2_0", "key") == "s1-abc.v2_0"


def test_a_store_reads_and_writes_only_its_own_files(tmp_path, capsys):
    """Issue 21 item 2: a copied store's catalog (naming the original's tables), a manifest entry naming another
    store's Parquet file, and a FIFO in place of a data file are refused with one line, before anything is read or
    written outside the store and without hanging."""
    import pyarrow as pa

    from ct_ray.errors import StorageError
    from ct_ray.store.commit import append_rows
    from ct_ray.store.tables import Store

    s1 = Store(str(tmp_path / "store1"))
    append_rows(s1, "graphs", "s", pa.Table.from_pylist([{"key": "a", "status": "ok"}]))
    shutil.copytree(tmp_path / "store1", tmp_path / "store2")
    s2 = Store(str(tmp_path / "store2"))
    for fn in (lambda: s2.read("graphs", "s"), lambda: s2.table("graphs"),
               lambda: append_rows(s2, "graphs", "s", pa.Table.from_pylist([{"key": "b", "status": "ok"}]))):
        with pytest.raises(StorageError, match=r"lives at .*store1.*Moving a store"):
            fn()
    assert main(["sql", "--store", s2.url, "SELECT count(*) FROM graphs"]) == 2
    assert "not in this store" in capsys.readouterr().err
    assert s1.read("graphs", "s").num_rows == 1  # the original is untouched

    s3 = Store(str(tmp_path / "store3"))  # a manifest naming store1's file
    append_rows(s3, "graphs", "s", pa.Table.from_pylist([{"key": "c", "status": "ok"}]))
    other = next((tmp_path / "store1" / "warehouse" / "graphs").rglob("*.parquet"))
    s3.table("graphs").add_files([str(other)])
    with pytest.raises(StorageError, match="outside the table's location"):
        Store(s3.url).read("graphs", "s")
    assert main(["sql", "--store", s3.url, "SELECT count(*) FROM graphs"]) == 2
    assert "outside the table's location" in capsys.readouterr().err

    s4 = Store(str(tmp_path / "store4"))  # a FIFO where a data file was
    append_rows(s4, "graphs", "s", pa.Table.from_pylist([{"key": "d", "status": "ok"}]))
    f = next((tmp_path / "store4" / "warehouse" / "graphs").rglob("*.parquet"))
    f.unlink()
    os.mkfifo(f)
    t = time.monotonic()
    with pytest.raises(StorageError, match="not a regular file"):
        Store(s4.url).read("graphs", "s")
    assert main(["sweep", "status", "s", "--store", s4.url]) == 2
    assert "not a regular file" in capsys.readouterr().err and time.monotonic() - t < 30
