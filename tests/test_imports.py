"""The import picture of `ecomcap`: no circles (imports inside functions count too: a lazy import
hides a circle, it does not remove it) and the model layer never imports training."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ecomcap"


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE, with_packages: bool = False) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports anywhere in its body. Package `__init__`s
    are left out for the cycle check (importing `ecomcap.x.y` runs `ecomcap.x` first, which is not
    a dependency of ours), kept with `with_packages` (`from ecomcap import training` is one)."""
    root = package.parent
    modules = {_module_name(p, root): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name
                         and (with_packages or modules[t].name != "__init__.py"))
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for f, text in {"__init__.py": "", "sub/__init__.py": "X = 1\n", "a.py": "from .sub import b\n",
                    "sub/b.py": "def f():\n    from ..a import g\n", "c.py": "from pkg import sub\n"}.items():
        (pkg / f).write_text(text)
    synthetic = import_graph(pkg)
    assert synthetic["pkg.a"] == {"pkg.sub.b"} and synthetic["pkg.sub.b"] == {"pkg.a"}
    assert cycles(synthetic) == [["pkg.a", "pkg.sub.b"]]
    assert import_graph(pkg, with_packages=True)["pkg.c"] == {"pkg.sub"}
    real = import_graph()
    assert "ecomcap.inference.beam" in real["ecomcap.inference.decode"]  # a top-level import
    assert "ecomcap.inference.rerank" in real["ecomcap.inference.generate"]  # one inside a function


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_model_layer_never_imports_training():
    graph = import_graph(with_packages=True)
    upward = {m: sorted(t for t in targets if t.startswith("ecomcap.training"))
              for m, targets in graph.items() if m.startswith("ecomcap.modeling")}
    assert {m: t for m, t in upward.items() if t} == {}


def test_the_retrieval_model_layer_imports_neither_training_nor_serving():
    """The second job's layers: model below train, evaluate, index and serve."""
    graph = import_graph(with_packages=True)
    above = ("ecomcap.training", "ecomcap.retrieval.train", "ecomcap.retrieval.serve", "ecomcap.retrieval.evaluate",
             "ecomcap.retrieval.index_job", "ecomcap.retrieval.workflow")
    upward = {m: sorted(t for t in targets if t.startswith(above))
              for m, targets in graph.items() if m.startswith("ecomcap.retrieval.model")}
    assert {m: t for m, t in upward.items() if t} == {}
