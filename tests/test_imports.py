"""The package's layering: no import cycle between ct_ray's packages, counting imports inside functions."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ct_ray"


def package_edges() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> where (file:line), for every `import`/`from` of ct_ray code in any scope."""
    edges: dict[str, dict[str, list[str]]] = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT).with_suffix("").parts
        if len(rel) < 2:
            continue  # modules of the root itself (cli.py, errors.py, ...) are the top, not a layer
        src, here = rel[0], ["ct_ray", *rel[:-1]]  # the module's package (relative imports start there)
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - (node.level - 1)]
                targets = [".".join(base + [node.module])] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ct_ray."):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("ct_ray.")]
            for t in targets:
                parts = t.split(".")
                if len(parts) < 2 or not (ROOT / parts[1]).is_dir() or parts[1] == src:
                    continue
                edges.setdefault(src, {}).setdefault(parts[1], []).append(f"{f.relative_to(ROOT.parent)}:{node.lineno}")
    return edges


def find_cycle(edges: dict) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in edges.get(n, {}):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in list(edges):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_between_packages():
    edges = package_edges()
    assert "attribution" in edges and "store" in edges["attribution"]  # the scan sees imports at all
    cycle = find_cycle(edges)
    where = [f"{a} -> {b}: {edges[a][b][:2]}" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "import cycle: " + "; ".join(where)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}}) is None
