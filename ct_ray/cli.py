"""The `ct-ray` command: a thin layer over the library. User errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USER_ERROR = 2


def _cmd_models(args) -> int:
    from .models import list_builtin

    for m in list_builtin():
        cached = "cached" if m["cached"] else "not converted yet"
        print(f"{m['name']:<16} {m['description']}  [{m['package']}, {cached}]")
    print("Any local HF model directory, or a hub id when online, loads too (llama/qwen2/qwen3/gemma2/gemma3/gpt2).")
    return 0


def _feature_nodes(v: str) -> int | None:
    return None if v == "all" else int(v)  # argparse reports a ValueError as "invalid _feature_nodes value"


def _add_models(s) -> None:
    s.set_defaults(fn=_cmd_models)


def _add_attribute(s) -> None:
    from .cliargs import add_progress_arg, add_prune_args, positive_int
    from .specs import AttributionSpec, RandomCLTSpec
    from .specs.common import DEFAULT_MODEL

    a = AttributionSpec.field_default  # one default per setting: the specs'
    s.add_argument("prompt", help="the prompt text; the graph explains its next-token logits")
    s.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name, local HF directory or hub id (default %(default)s)")
    s.add_argument("--clt", help="CLT directory URL (circuit-tracer layout; local path or s3://)")
    s.add_argument("--random-clt", type=positive_int, metavar="N", help="use a seeded random CLT with N features per layer")
    s.add_argument("--seed", type=int, default=RandomCLTSpec.field_default("seed"),
                   help="seed of --random-clt (default %(default)s)")
    s.add_argument("--out", help="directory for graph JSON + Parquet nodes/edges")
    s.add_argument("--slug", default="graph",
                   help="name of the graph JSON file (SLUG.json) and of its entry in graph-metadata.json "
                        "(default %(default)s)")
    s.add_argument("--max-n-logits", type=int, default=a("max_n_logits"),
                   help="logit nodes, at most (default %(default)s)")
    s.add_argument("--desired-logit-prob", type=float, default=a("desired_logit_prob"),
                   help="logit nodes: the top tokens covering this probability (default %(default)s)")
    s.add_argument("--batch-size", type=int, default=a("batch_size"),
                   help="adjacency rows per backward pass (default %(default)s)")
    s.add_argument("--max-feature-nodes", type=_feature_nodes, default=a("max_feature_nodes"),
                   help="feature nodes kept, chosen by influence (default %(default)s, as circuit-tracer); "
                        "'all': every one")
    add_prune_args(s)
    s.add_argument("--workers", type=positive_int, default=1,
                   help="split the prompt's rows over N Ray workers, each holding the model and the CLT (default 1: "
                        "in this process; docs/attribution.md)")
    s.add_argument("--worker-cpus", type=float, default=1.0, help="num_cpus (and torch threads) per worker")
    s.add_argument("--worker-gpus", type=float, default=0.0, help="num_gpus per worker (> 0: the workers use CUDA)")
    s.add_argument("--address", default=None, help="Ray cluster address for --workers (default: start a local Ray)")
    s.add_argument("--heads", action="store_true",
                   help="split each kept edge over the attention heads that carry it (edge_heads.parquet, JSON links)")
    s.add_argument("--heads-top", type=int, default=a("heads_top"), metavar="N",
                   help="heads listed per edge, the rest summed in one row (default %(default)s; 0: every head)")
    s.add_argument("--qk", action="store_true",
                   help="also explain the attention scores of the top heads (qk_attributions.parquet, JSON "
                        "qk_tracing_results); implies --heads")
    s.add_argument("--qk-topk", type=int, default=a("qk_topk"), metavar="N",
                   help="at most N (layer, head, query) triples (default %(default)s)")
    add_progress_arg(s)
    s.set_defaults(fn=_cmd_attribute)


def _cmd_attribute(args) -> int:
    import pyarrow.parquet as pq

    from . import attribute, load_clt, load_model, random_clt
    from .errors import CTRayError
    from .specs import AttributionSpec, PruneSpec, parse

    aspec = parse(AttributionSpec, {"max_n_logits": args.max_n_logits, "desired_logit_prob": args.desired_logit_prob,
                                    "batch_size": args.batch_size, "max_feature_nodes": args.max_feature_nodes,
                                    "heads": args.heads or args.qk, "heads_top": args.heads_top, "qk": args.qk,
                                    "qk_topk": args.qk_topk},
                  "attribution options")
    pspec = parse(PruneSpec, {"node_threshold": args.node_threshold, "edge_threshold": args.edge_threshold},
                  "pruning options")
    if not args.clt and not args.random_clt:
        raise CTRayError("give --clt URL (a CLT directory) or --random-clt N (a seeded random CLT, for testing)")
    if args.out:
        _check_graph_folder(args.out)  # before minutes of attribution
    model = load_model(args.model)
    clt = load_clt(args.clt) if args.clt else random_clt(model, args.random_clt, seed=args.seed)
    clt.check_model(model.n_layers, model.d_model)
    if args.workers > 1:  # the prompt's rows split over Ray actors, each holding the model and the CLT
        from .executor.split_rows import SplitRows

        with SplitRows(args.model, args.clt, random_clt=None if args.clt else {"features": args.random_clt,
                       "seed": args.seed}, workers=args.workers, num_cpus=args.worker_cpus,
                       num_gpus=args.worker_gpus, address=args.address) as split:
            graph = attribute(model, clt, args.prompt, verbose=not args.no_progress, rows=split, **aspec.attribute_kwargs())
    else:
        graph = attribute(model, clt, args.prompt, verbose=not args.no_progress, **aspec.attribute_kwargs())
    pruned = graph.prune(**pspec.model_dump())
    full_s, pr_s = graph.scores(), pruned.scores()
    att = None
    if aspec.attention() is not None:
        from .attribution.attention import attention_attribution

        opts = aspec.attention()
        opts.pop("heads")
        att = attention_attribution(model, clt, pruned, **opts)

    print(f"prompt tokens: {graph.meta['token_strs']}")
    print("top logits:")
    for tok, p in zip(graph.meta["logit_tokens"], graph.meta["logit_probs"]):
        print(f"  {model.decode([tok])[0]!r:>16}  p={p:.4f}")
    print(f"graph:  {graph.n_nodes} nodes ({graph.n_features} features), {graph.n_edges} edges   "
          f"replacement={full_s['replacement_score']:.4f} completeness={full_s['completeness_score']:.4f}")
    print(f"pruned: {pruned.n_nodes} nodes ({pruned.n_features} features), {pruned.n_edges} edges   "
          f"replacement={pr_s['replacement_score']:.4f} completeness={pr_s['completeness_score']:.4f}")
    print(f"time: {graph.meta['timings_s']['total']:.2f} s")
    if att is not None:
        _print_attention(att, pruned)
    if args.out:
        from .store.fs import filesystem

        fs, out = filesystem(args.out)
        fs.makedirs(out, exist_ok=True)
        from .attribution.export_files import write_graph

        write_graph(pruned, args.out, args.slug, full=graph, attention=att)  # + graph-metadata.json (circuit-tracer)
        import pyarrow as pa

        from .store.tables import Store

        dest = Store(args.out)  # each file written whole (temporary + rename), never half
        from .attribution.graph import graph_rows

        # the sweep's row types: the full graph's rows with `kept`, and the pruned graph's
        full_nodes, full_edges = graph_rows(graph, pruned, "full")
        for name, table in (("nodes", full_nodes), ("edges", full_edges), ("pruned_nodes", pruned.nodes),
                            ("pruned_edges", pruned.edges()),
                            *((("edge_heads", att.edge_heads), ("qk_attributions", att.qk_rows)) if att else ())):
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            dest.put_bytes(f"{dest.root}/{name}.parquet", buf.getvalue().to_pybytes())
        dest.write_json("summary.json", {"full": {**graph.summary()}, "pruned": {**pruned.summary()}, "meta": graph.meta})
        print(f"wrote {args.out}/{args.slug}.json (graph viewer JSON, listed in graph-metadata.json) and nodes/edges "
              f"Parquet files")
    return 0


def _print_attention(att, pruned) -> None:
    """The heads that carry most of the pruned graph, and the attention scores explained."""
    mass = att.loadings.head_mass.sum(-1)  # [L, H]
    total = float(att.loadings.heads.abs().sum() + att.loadings.direct.abs().sum()) or 1.0
    vals, idx = mass.flatten().topk(min(5, mass.numel()))
    H = mass.shape[1]
    heads = ", ".join(f"L{i // H}.H{i % H} {v / total:.1%}" for v, i in zip(vals.tolist(), idx.tolist()) if v > 0)
    print(f"heads:  {len(att.loadings.edge)} edges split over heads in {att.seconds['heads']:.2f} s; "
          f"most |loading|: {heads}")
    toks = pruned.meta["token_strs"]
    for r in att.qk:
        it = r.item
        top = r.pairs[0] if r.pairs else ("-", "-", 0.0)
        print(f"  QK L{it.layer}.H{it.head} {toks[it.query]!r} -> {toks[it.key]!r}: score {r.score:+.3f} "
              f"(attention {r.pattern:.3f}); top pair {top[0]} x {top[1]} {top[2]:+.3f}")


def _check_clt_size(model, features: int, span: int | None) -> None:
    """A random CLT must fit in memory: `--features 10**12` is one line, not an allocation failure."""
    import os

    from .errors import CTRayError

    L, d = model.n_layers, model.d_model
    spans = sum(min(span or L, L - layer) for layer in range(L))
    need = 4 * features * d * (L + spans) + 12 * features * L  # encoders, decoders, biases and thresholds in fp32
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > ram // 2:
        raise CTRayError(f"a random CLT of {features} features per layer needs {need / 2**30:.1f} GiB, more than half "
                         f"of this machine's {ram / 2**30:.0f} GiB: use fewer --features (or a smaller --span)")


def _check_graph_folder(out: str) -> None:
    """`attribute --out` adds files (graph JSON, nodes/edges Parquet, summary.json) to a folder of graphs: it must be
    absent, empty, or one ct_ray wrote (it has graph-metadata.json), never a folder of the user's own files."""
    import os

    from .errors import CTRayError
    from .store.fs import filesystem, is_local

    fs, path = filesystem(out)
    if is_local(fs) and os.path.lexists(path) and not (
            os.path.isdir(path) and not os.path.islink(path)
            and (not os.listdir(path) or os.path.isfile(os.path.join(path, "graph-metadata.json")))):
        raise CTRayError(f"--out {path} exists and is not a folder of ct_ray graphs (no graph-metadata.json): "
                         f"choose a new path")


def _cmd_clt_random(args) -> int:
    from . import load_model, random_clt, save_clt

    model = load_model(args.model)
    _check_clt_size(model, args.features, args.span)
    clt = random_clt(model, args.features, seed=args.seed, span=args.span)
    save_clt(clt, args.out, extra={"random": True, "seed": args.seed})
    print(f"wrote a random CLT ({args.features} features/layer, {model.n_layers} layers) to {args.out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error (the usage is one `--help` away). Every parser (the
    sub-commands' too) takes --debug, so it goes before or after the sub-command."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of an internal error")

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _ray_init(address: str | None) -> None:
    from .executor import ensure_ray

    ensure_ray(address, training=True, log_to_driver=True)


def _add_spec_command(s, fn, spec_help: str, progress: bool = True) -> None:
    from .cliargs import add_progress_arg

    s.add_argument("spec", help=spec_help)
    s.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    if progress:
        add_progress_arg(s)
    s.set_defaults(fn=fn)


def _add_harvest(s) -> None:
    _add_spec_command(s, _cmd_harvest, "HarvestSpec YAML (its `out:` says where the shards go)")


def _add_train(s) -> None:
    _add_spec_command(s, _cmd_train, "TrainSpec YAML (e.g. workflows/train_smollm2.yaml)")


def _add_demo(s) -> None:
    from .cliargs import add_progress_arg

    s.add_argument("--spec", default="workflows/quickstart.yaml", help="QuickstartSpec YAML (default %(default)s)")
    s.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    add_progress_arg(s)
    s.set_defaults(fn=_cmd_demo)


def _add_clt(s) -> None:
    from .cliargs import add_group, positive_int
    from .ops.cli import add_clt_parsers  # the registry: list, show, runs, register, promote, rollback
    from .specs import RandomCLTSpec
    from .specs.common import DEFAULT_MODEL

    csub = add_group(s, "clt_cmd")
    r = csub.add_parser("random", help="write a seeded random CLT for a model (for tests and demos)")
    r.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, local HF directory or hub id "
                                                         "(default %(default)s)")
    r.add_argument("--features", type=positive_int, default=256, help="features per layer (default %(default)s)")
    r.add_argument("--span", type=positive_int, default=None, help="layers each decoder writes (1 = per-layer transcoder)")
    r.add_argument("--seed", type=int, default=RandomCLTSpec.field_default("seed"), help="seed (default %(default)s)")
    r.add_argument("--out", required=True, help="directory the CLT is written to (circuit-tracer layout)")
    r.set_defaults(fn=_cmd_clt_random)
    add_clt_parsers(csub)


def _cmd_harvest(args) -> int:
    from .harvest.pipeline import harvest_to_store
    from .specs import HarvestSpec, load_yaml

    spec = load_yaml(args.spec, HarvestSpec)
    if not spec.out:
        from .errors import CTRayError

        raise CTRayError(f"{args.spec}: set `out:` (where to persist the shards); streamed harvests feed `ct-ray train`")
    _ray_init(args.address)
    m = harvest_to_store(spec, spec.out, progress=not args.no_progress)
    print(f"harvested {m['n_tokens']} tokens in {len(m['shards'])} shards to {spec.out}")
    return 0


def _cmd_train(args) -> int:
    from .specs import TrainSpec, load_yaml
    from .train.run import train

    spec = load_yaml(args.spec, TrainSpec)
    _ray_init(args.address)
    s = train(spec, progress=not args.no_progress)
    f = s.get("final", {})
    print(f"trained {spec.name}: {s['steps']} steps, fvu={f.get('fvu', float('nan')):.3f} l0={f.get('l0', float('nan')):.1f} "
          f"dead={f.get('dead_frac', float('nan')):.3f} (harvest {s['harvest_s']:.0f} s, train {s['train_s']:.0f} s)")
    if "replacement" in s:
        r = s["replacement"]
        print(f"replacement model on held-out text: top-1 agreement {r['top1_agreement']:.3f}, KL {r['kl']:.3f}, "
              f"CE {r['ce_spliced']:.3f} (real {r['ce_real']:.3f})")
    if "held_out" in s:
        h = s["held_out"]
        print(f"reconstruction on {h['eval_positions']} held-out tokens: fvu={h['fvu']:.3f} l0={h['l0']:.1f} "
              f"dead={h['dead_frac']:.3f}")
    if "canary" in s:
        from .attribution.canary import canary_line

        print(canary_line(s["canary"]))
    print(f"CLT written to {s['out']}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.spec, args.address, progress=not args.no_progress)


# Every command: name -> (module, the function that adds its arguments to its parser, the line `ct-ray --help` shows).
# A command's module is imported only when that command runs (or shows its own --help): `ct-ray sql` never loads the
# modules of `attribute`, and nothing loads torch, transformers or Ray before a command needs them. None: this module.
COMMANDS: dict[str, tuple[str | None, str, str]] = {
    "models": (None, "_add_models", "list the built-in offline models"),
    "attribute": (None, "_add_attribute", "attribution graph of one prompt"),
    "harvest": (None, "_add_harvest", "harvest activations to object storage (Ray Data)"),
    "train": (None, "_add_train", "train a CLT (Ray Train, feature-sharded)"),
    "demo": (None, "_add_demo", "run the embedded end-to-end job (make demo)"),
    "perturb": ("ct_ray.perturb.cli", "add_perturb",
                "validate a graph by perturbing its top nodes (predicted vs measured)"),
    "clt": (None, "_add_clt", "CLT utilities: random, and the registry (list, show, runs, register, promote, "
                              "rollback)"),
    "submit": ("ct_ray.ops.cli", "add_submit", "run a harvest/train/sweep/retrain spec on a Ray cluster as a Ray Job"),
    "jobs": ("ct_ray.ops.cli", "add_jobs", "status / logs / stop of a submitted job, or list them"),
    "retrain": ("ct_ray.ops.cli", "add_retrain",
                "nightly CLT retraining: harvest, train, evaluate, promote, canary sweep"),
    "sweep": ("ct_ray.sweep.cli", "add_sweep",
              "run a prompt sweep from a spec (or: sweep status|repair SWEEP_ID, sweep list)"),
    "sql": ("ct_ray.sweep.cli", "add_sql",
            "SQL over the result tables (DuckDB; views graphs, nodes, edges, perturbations, edge_heads, "
            "qk_attributions, features, train_metrics, feature_stats, circuit_paths, supernodes, graph_diffs)"),
    "features": ("ct_ray.features.cli", "add_features",
                 "feature dashboards of a CLT (density, top contexts) into the features table"),
    "serve": ("ct_ray.explorer.cli", "add_serve", "the graph explorer in the browser (JSON API + page over the tables)"),
    "tables": ("ct_ray.store.cli", "add_tables", "the result tables: list, compact, expire, vacuum, recover, import"),
    "export": ("ct_ray.attribution.export_cli", "add_export",
               "a sweep's graphs as circuit-tracer / Neuronpedia graph JSON files"),
    "analyze": ("ct_ray.analysis.run_cli", "add_analyze",
                "circuits across a sweep's prompts: feature_stats and circuit_paths tables"),
    "diff": ("ct_ray.analysis.diff_cli", "add_diff",
             "how the graphs of the same prompts changed between two sweeps (graph_diffs table)"),
}


def _command_of(argv: list[str]) -> str | None:
    """The command `argv` names: its first word that is not an option (the top-level options take no value)."""
    for a in argv:
        if a == "--":
            return None
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `ct-ray` parser. Given `argv`, only the command it names gets its arguments (the others are listed with
    their help line), so a command imports only its own modules; without, every command is complete."""
    import importlib

    from . import __version__
    from .cliargs import add_group

    p = _Parser(prog="ct-ray", description="Circuit tracing of language models on Ray.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the version of ct_ray and exit")
    p.set_defaults(debug=False)
    sub = add_group(p, "cmd")
    chosen = None if argv is None else _command_of(argv)
    for name, (module, adder, help_) in COMMANDS.items():
        s = sub.add_parser(name, help=help_)
        if argv is None or name == chosen:
            getattr(importlib.import_module(module) if module else sys.modules[__name__], adder)(s)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    for i, a in enumerate(argv, 1):  # undecodable bytes arrive as lone surrogates and break every layer below
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            print(f"ct-ray: error: argument {i} is not valid UTF-8 text", file=sys.stderr)
            return EXIT_USER_ERROR
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as e:  # --help, or a usage error (printed already)
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    from .errors import CTRayError

    try:
        return args.fn(args)
    except CTRayError as e:
        print(f"ct-ray: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `ct-ray sql ... | head`: the reader left; stop quietly like other tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush into the closed pipe at exit
        return 141
    except KeyboardInterrupt:
        print("ct-ray: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the environment (permissions, a full disk, a file where a folder goes), not a bug
        if getattr(args, "debug", False):
            raise
        what = f": {e.filename}" if getattr(e, "filename", None) else ""
        from .errors import one_line

        print(f"ct-ray: error: {e.strerror or one_line(e)}{what}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug: keep it to one line unless --debug
        if getattr(args, "debug", False):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"ct-ray: internal error: {type(e).__name__}: {msg} (rerun with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
