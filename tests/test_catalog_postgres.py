"""The table catalog on a real PostgreSQL server (Debian's `postgresql` package, a throwaway cluster on 127.0.0.1)
with the warehouse on S3 (moto): a sweep's commit round, read back by ct_ray and by an independent pyiceberg
catalog; the catalog tables are the Iceberg JDBC catalog layout that Spark and Trino read (docs/engines.md);
passwords come from PGPASSWORD, never from the URI."""

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter

import pytest

from ct_ray.errors import StorageError
from ct_ray.store.catalog import check_catalog_uri
from ct_ray.store.commit import Committer
from ct_ray.store.schemas import SWEEP_TABLES
from ct_ray.store.sql import query
from ct_ray.store.tables import Store
from tests._helpers import free_ports

from .test_sql import report

PG_BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
DB = "ct_ray_catalog"
PW_USER, PW_DB, PW = "ct_ray_pw", "ct_ray_pw_catalog", "s3cret-test-only"

NO_SERVER = "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin): install Debian's `postgresql` package (.ci/run does)"


def _free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster of its own: trust for TCP from 127.0.0.1 (a test server only), except one role that
    must give a password (scram); sockets off. Run as the `postgres` OS user when the tests run as root."""
    import psycopg2

    if not PG_BINS:  # every test that needs the server is skipped; the others run
        pytest.skip(NO_SERVER)
    bindir = os.path.dirname(PG_BINS[-1])
    as_pg: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` OS user to run PostgreSQL as")
        as_pg = ["runuser", "-u", "postgres", "--"]
    top = tempfile.mkdtemp(prefix="ct_ray_pg-")  # not under pytest's tmp (0700 root dirs the server cannot enter)
    data = os.path.join(top, "data")
    if as_pg:
        shutil.chown(top, "postgres", "postgres")
    port = _free_port()

    def run(*args, **kw):
        return subprocess.run(as_pg + [os.path.join(bindir, args[0]), *args[1:]], check=True, capture_output=True,
                              text=True, timeout=120, **kw)

    try:
        run("initdb", "-D", data, "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync", "--auth=reject")
        with open(os.path.join(data, "pg_hba.conf"), "w") as f:
            f.write(f"host all {PW_USER} 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n")
        with open(os.path.join(data, "postgresql.auto.conf"), "a") as f:
            f.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\nfsync = off\n"
                    "password_encryption = 'scram-sha-256'\n")
        run("pg_ctl", "-D", data, "-l", os.path.join(top, "server.log"), "-w", "-t", "60", "start")
    except subprocess.CalledProcessError as e:
        log = open(os.path.join(top, "server.log")).read()[-2000:] if os.path.exists(os.path.join(top, "server.log")) else ""
        shutil.rmtree(top, ignore_errors=True)
        raise RuntimeError(f"cannot start PostgreSQL: {e.stderr or e.stdout}\n{log}") from e
    try:
        con = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f"CREATE DATABASE {DB}")
            cur.execute(f"CREATE ROLE {PW_USER} LOGIN PASSWORD %s", (PW,))
            cur.execute(f"CREATE DATABASE {PW_DB} OWNER {PW_USER}")
        con.close()
        yield {"host": "127.0.0.1", "port": port, "db": DB, "uri": f"postgresql://postgres@127.0.0.1:{port}/{DB}"}
    finally:
        try:
            run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(top, ignore_errors=True)


def rows(t) -> Counter:
    return Counter(zip(t.column("sweep_id").to_pylist(), t.column("key").to_pylist()))


def test_commit_round_in_a_postgres_catalog_with_the_warehouse_on_s3(postgres, s3):
    import psycopg2
    from pyiceberg.catalog import load_catalog

    url = f"s3://{s3['bucket']}/pg-{uuid.uuid4().hex[:8]}"
    st = Store(url, catalog=postgres["uri"])
    for sid, keys in {"s1": {"a": "ok", "b": "error"}, "007": {"a": "ok"}}.items():
        c = Committer(st, sid)
        assert c.add(report(st, sid, keys))
        assert c.commit()["prompts"] == len(keys)
    report(st, "s1", {"ghost": "ok"})  # written, never committed

    # ct_ray's SQL, from a fresh Store (nothing cached): the catalog is the only shared state
    fresh = Store(url, catalog=postgres["uri"])
    r = query("SELECT sweep_id, key, status FROM graphs ORDER BY sweep_id, key", store=fresh).to_pylist()
    assert r == [{"sweep_id": "007", "key": "a", "status": "ok"}, {"sweep_id": "s1", "key": "a", "status": "ok"},
                 {"sweep_id": "s1", "key": "b", "status": "error"}]
    assert query("SELECT key FROM nodes ORDER BY sweep_id DESC", store=fresh).column("key").to_pylist() == ["a", "a"]
    assert fresh.sweeps() == ["007", "s1"]

    # another engine on the same catalog: a plain pyiceberg SqlCatalog (named ct_ray, as JDBC catalogs must be)
    other = load_catalog("ct_ray", type="sql", uri=f"postgresql+psycopg2://postgres@127.0.0.1:{postgres['port']}/{DB}",
                         **{"s3.endpoint": s3["endpoint"], "s3.region": "us-east-1"})
    assert sorted(n for _, n in other.list_tables("ct_ray")) == sorted(SWEEP_TABLES)
    for name in ("graphs", "nodes", "edges"):
        mine = query(f"SELECT sweep_id, key FROM {'raw_' + name if name != 'graphs' else name}", store=fresh)
        theirs = other.load_table(f"ct_ray.{name}").scan().to_arrow()
        assert rows(theirs) == rows(mine) and ("s1", "ghost") not in rows(theirs)
        assert sum(rows(theirs).values()) == (3 if name == "graphs" else 2)  # graph rows of the ok keys only

    # the catalog tables are the Iceberg JDBC catalog's: one iceberg_tables row per table, pointing at the
    # current metadata file on S3
    con = psycopg2.connect(host="127.0.0.1", port=postgres["port"], user="postgres", dbname=DB)
    try:
        with con.cursor() as cur:
            cur.execute("SELECT catalog_name, table_namespace, table_name, metadata_location, previous_metadata_location, "
                        "iceberg_type FROM iceberg_tables ORDER BY table_name")
            tabs = cur.fetchall()
            cur.execute("SELECT catalog_name, namespace, property_key FROM iceberg_namespace_properties")
            ns = cur.fetchall()
            # a reader's role: SELECT on the two catalog tables only (docs/engines.md)
            cur.execute("CREATE ROLE ct_ray_reader LOGIN")
            cur.execute("GRANT SELECT ON iceberg_tables, iceberg_namespace_properties TO ct_ray_reader")
        con.commit()
    finally:
        con.close()
    reader = load_catalog("ct_ray", type="sql", uri=f"postgresql+psycopg2://ct_ray_reader@127.0.0.1:{postgres['port']}/{DB}",
                          **{"s3.endpoint": s3["endpoint"], "s3.region": "us-east-1"})
    assert reader.load_table("ct_ray.graphs").scan(row_filter="sweep_id = '007'").to_arrow().column("key").to_pylist() == ["a"]
    assert [t[2] for t in tabs] == sorted(SWEEP_TABLES)
    # catalog_name is what Spark's catalog name / Trino's iceberg.jdbc-catalog.catalog-name must be; iceberg_type
    # 'TABLE' is the JDBC catalog's V1 schema (Trino's default, Spark's jdbc.schema-version=V1)
    assert {(t[0], t[1], t[5]) for t in tabs} == {("ct_ray", "ct_ray", "TABLE")}
    for _, _, name, loc, prev, _ in tabs:
        assert loc == other.load_table(f"ct_ray.{name}").metadata_location
        assert loc.startswith(f"{url}/warehouse/{name}/metadata/") and loc.endswith(".metadata.json")
        assert fresh.fs.exists(loc)
        # created, never committed to (no perturbations, no attention rows here): one metadata file
        assert bool(prev) == (name in ("graphs", "nodes", "edges"))
    assert ("ct_ray", "ct_ray", "exists") in ns


def test_a_password_in_the_catalog_uri_is_refused(monkeypatch):
    uri = "postgresql://postgres:hunter2@127.0.0.1:5432/db"
    for call in (lambda: check_catalog_uri(uri), lambda: Store("/tmp/x", catalog=uri)):
        with pytest.raises(ValueError) as e:
            call()
        assert "\n" not in str(e.value) and "hunter2" not in str(e.value) and "PGPASSWORD" in str(e.value)
    monkeypatch.setenv("CT_RAY_CATALOG", uri)
    with pytest.raises(ValueError, match="password"):
        Store("/tmp/x")


def test_the_password_comes_from_pgpassword(postgres, tmp_path, monkeypatch):
    uri = f"postgresql://{PW_USER}@127.0.0.1:{postgres['port']}/{PW_DB}"
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    t = time.time()
    with pytest.raises(StorageError, match="cannot open the table catalog") as e:
        Store(str(tmp_path / "a"), catalog=uri).table("graphs")
    assert "\n" not in str(e.value) and time.time() - t < 30
    monkeypatch.setenv("PGPASSWORD", PW)
    st = Store(str(tmp_path / "a"), catalog=uri)
    c = Committer(st, "s")
    assert c.add(report(st, "s", {"k": "ok"}))
    c.commit()
    assert query("SELECT key FROM graphs", store=Store(str(tmp_path / "a"), catalog=uri)).column("key").to_pylist() == ["k"]
