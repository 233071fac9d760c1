"""`ct-ray analyze SWEEP`: feature_stats + circuit_paths of a sweep, written as tables of the same store."""

from __future__ import annotations


def cmd_analyze(args) -> int:
    from ..store.options import store_of
    from .analyze import analyze

    r = analyze(store_of(args), args.sweep, top_paths=args.top_paths, max_hops=args.max_hops, workers=args.workers,
                progress=not args.no_progress, write=not args.no_write, supernodes=args.supernodes,
                supernodes_clt=not args.no_clt)
    s = r["seconds"]
    how = f"{r['workers']} Ray tasks" if r["workers"] > 1 else "in-process"
    print(f"analysed {r['graphs']} graph(s) of sweep {r['sweep_id']} in {s['total']:.1f} s ({how}): {r['features']} features "
          f"-> feature_stats, {r['paths']} paths ({r['distinct_paths']} distinct) -> circuit_paths"
          + (f", {r['supernodes'].num_rows} groups -> supernodes" if r.get("supernodes") is not None else "")
          + (" (not written: --no-write)" if args.no_write else ""))
    print(summary(r, args.show))
    return 0


def summary(r: dict, show: int = 5) -> str:
    """The most recurring features and paths (and automatic supernodes) of an `analyze` result, as lines to print."""
    import pyarrow.compute as pc

    lines = []
    fs = r["feature_stats"]
    if fs.num_rows:
        lines.append("most recurring features (graphs, mean logit influence, logits pushed most):")
        top = fs.sort_by([("n_prompts", "descending"), ("influence_sum", "descending")]).slice(0, show)
        for row in top.to_pylist():
            push = ", ".join(f"{t!r}" for t in (row["top_logits"] or [])[:3])
            lines.append(f"  L{row['layer']}/F{row['feature']}: {row['n_prompts']} ({row['frac_prompts']:.0%}), "
                         f"{row['influence_mean']:.3g}{', ' + push if push else ''}")
    sn = r.get("supernodes")
    if sn is not None and sn.num_rows:
        graph_rows = sn.filter(pc.is_valid(sn.column("key")))
        sweep_rows = sn.filter(pc.is_null(sn.column("key")))
        lines.append(f"automatic supernodes: {graph_rows.num_rows} groups in "
                     f"{len(set(graph_rows.column('key').to_pylist()))} graphs; {sweep_rows.num_rows} recurring "
                     f"across graphs, e.g.:")
        for row in (sweep_rows if sweep_rows.num_rows else graph_rows).slice(0, min(show, 3)).to_pylist():
            names = row["node_ids"] or [f"L{a}/F{b}" for a, b in zip(row["layers"], row["features"])]
            members = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            where = f" (graph {row['key']})" if row["key"] else ""
            lines.append(f"  {row['supernode']}{where}: {members}")
    cp = r["circuit_paths"]
    if cp.num_rows:
        lines.append("most recurring paths (graphs, mean score):")
        seen = cp.select(["path", "support", "mean_score"]).group_by(["path"]).aggregate(
            [("support", "max"), ("mean_score", "max")]).sort_by([("support_max", "descending"),
                                                                    ("mean_score_max", "descending")])
        for row in seen.slice(0, show).to_pylist():
            lines.append(f"  {row['path']}: {row['support_max']}, {row['mean_score_max']:.3g}")
    return "\n".join(lines)


def add_analyze(s) -> None:
    from ..cliargs import add_progress_arg
    from ..store.options import add_store_args

    s.description = ("Read a sweep's committed graphs, nodes and edges (file by file, bounded memory) "
                     "and write the tables feature_stats (per feature: prompts, activation, logit "
                     "influence, logits pushed, top prompts) and circuit_paths (each graph's strongest "
                     "feature -> ... -> logit paths and their recurrence) in the same store. Re-running "
                     "replaces the sweep's rows. See docs/analysis.md.")
    add_store_args(s)
    s.add_argument("sweep", help="sweep id")
    s.add_argument("--top-paths", type=int, default=10, help="paths kept per graph (default 10)")
    s.add_argument("--max-hops", type=int, default=4, help="edges per path at most (default 4)")
    s.add_argument("--workers", type=int, default=None,
                   help="Ray tasks in flight (1: in this process, no Ray; default: every CPU from 20,000 graphs on, "
                        "else 1)")
    s.add_argument("--show", type=int, default=5, help="rows of each summary printed (default 5)")
    s.add_argument("--supernodes", action="store_true",
                   help="also group each graph's features automatically, and the sweep's consensus groups, into the "
                        "supernodes table (docs/analysis-supernodes.md)")
    s.add_argument("--no-clt", action="store_true",
                   help="--supernodes from the graphs alone (default: with the CLT's decoder/encoder directions)")
    s.add_argument("--no-write", action="store_true", help="compute and print, write no table")
    add_progress_arg(s)
    s.set_defaults(fn=cmd_analyze)
