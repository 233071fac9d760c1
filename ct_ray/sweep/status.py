"""`ct-ray sweep status`: a sweep's progress read from storage alone (works for remote runs)."""

from __future__ import annotations

from ..errors import CTRayError
from ..store.tables import DEFAULT_STORE, Store, sweep_counts


def sweep_status(sweep_id: str, url: str = DEFAULT_STORE, *, store: Store | None = None, **storage_options) -> dict:
    st = store or Store(url, **storage_options)
    c = sweep_counts(st, sweep_id)
    if c["planned"] is None and c["committed"] == 0:
        known = st.sweeps()
        hint = f" (sweeps here: {', '.join(known[:20])})" if known else " (no sweeps here)"
        raise CTRayError(f"no sweep {sweep_id!r} in {st.url}{hint}")
    return c


def format_status(c: dict) -> str:
    planned = c["planned"]
    lines = [f"sweep {c['sweep_id']}"]
    if planned is not None:
        pct = 100.0 * (planned - c["pending"]) / planned if planned else 100.0
        lines.append(f"  prompts:   {planned - c['pending']}/{planned} committed ({pct:.0f}%), {c['pending']} pending")
    lines.append(f"  ok:        {c['ok']}")
    errs = ", ".join(f"{k} {v}" for k, v in sorted(c["errors_by_kind"].items()))
    lines.append(f"  errors:    {c['error']}" + (f" ({errs})" if errs else ""))
    if c.get("duplicate_rows"):
        lines.append(f"  DUPLICATES: {c['duplicate_rows']} graphs row(s) of keys committed twice: run "
                     f"'ct-ray sweep repair {c['sweep_id']}', then the sweep again")
    p = c.get("plan") or {}
    if p.get("perturbation_active"):
        lines.append(f"  perturbed: {c['perturbed']} graph(s)")
    if p.get("model"):
        lines.append(f"  model:     {p['model']}   CLT: {p.get('clt')}")
    if p.get("updated_at"):
        lines.append(f"  last run started: {p['updated_at']}")
    return "\n".join(lines)


SUMMARY_SQL = """
SELECT prompt_index AS i, prompt, status, top_token_str AS top, round(top_prob, 3) AS p,
       n_features_pruned AS features, n_edges_pruned AS edges,
       round(replacement_score, 3) AS replacement, round(completeness_score, 3) AS completeness,
       round(attribute_s, 2) AS seconds, coalesce(error, '') AS error
FROM graphs WHERE sweep_id = $sid ORDER BY prompt_index
"""


def summary_table(sweep_id: str, url: str = DEFAULT_STORE, *, store: Store | None = None, **storage_options) -> str:
    """A per-prompt summary of a sweep (one SQL query over its tables), formatted for the terminal."""
    from ..store.sql import connect, format_table

    con = connect(url, store=store, sql=SUMMARY_SQL, **storage_options)
    try:
        t = con.sql(SUMMARY_SQL, params={"sid": sweep_id}).to_arrow_table()
    finally:
        con.close()
    return format_table(t, max_rows=1000)
