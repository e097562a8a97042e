"""kolm_ray's modules form a graph without cycles, and no module imports another's private names.

The graph is read from the source with `ast`, so a lazy import inside a function counts as much
as one at the top of the file: a cycle that only closes at call time is still two modules that
cannot be understood (or moved) one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kolm_ray

PACKAGE_DIR = Path(kolm_ray.__file__).parent
PACKAGE = "kolm_ray"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (a relative one resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _nearest_module(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` is, or the module it lies in (`kolm_ray.a.f` → `kolm_ray.a`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_private(name: str) -> bool:
    """`_helper` is private; a dunder (`__version__`) is the module's public protocol."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement in the tree (module level and inside functions), minus those
    under `if TYPE_CHECKING:`, which never run."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                for sub in ast.walk(child):
                    skipped.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped:
            yield node


def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` for a chain of names and attributes, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """The kolm_ray → kolm_ray import edges, and every private name one module takes from another:
    `from kolm_ray.a import _helper`, or `a._helper` on a kolm_ray module it imported.

    An edge goes to the module named (or the module a name lies in), not to each package on the
    way: a package's `__init__` that runs on the way is not an edge of the importer's own design.
    """
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        where = path.relative_to(PACKAGE_DIR.parent)
        tree = ast.parse(path.read_text(), filename=str(path))
        bound: dict[str, str] = {}  # local name -> the kolm_ray module it is bound to
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
                for alias in node.names:
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        head = alias.name.partition(".")[0]
                        bound[head] = head
            else:
                source = _resolve(module, is_package, node)
                if not _in_package(source):
                    continue
                targets = []
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in modules:
                        targets.append(submodule)  # `from kolm_ray.pkg import module`
                        bound[alias.asname or alias.name] = submodule
                        continue
                    targets.append(source)
                    owner = _nearest_module(source, modules)
                    if _is_private(alias.name) and owner not in (None, module):
                        private.append(f"{where}:{node.lineno}: from {source} import {alias.name}")
            for target in targets:
                if not _in_package(target):
                    continue
                owner = _nearest_module(target, modules)
                if owner is not None and owner != module:
                    edges[module].add(owner)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            chain = _dotted(node.value)
            if chain is None:
                continue
            head, _, rest = chain.partition(".")
            if head not in bound:
                continue
            target = ".".join(filter(None, [bound[head], rest]))
            if _in_package(target) and target in modules and target != module:
                private.append(f"{where}:{node.lineno}: {chain}.{node.attr}")
    return edges, private


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm),
    each written as a path that returns to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Shortest path back to `start` inside the component: a concrete cycle to read.
        previous: dict[str, str] = {}
        frontier = [start]
        seen = {start}
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v] & members):
                    if w == start:
                        found = v
                        break
                    if w not in seen:
                        seen.add(w)
                        previous[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v is not None and v != start:
            path.insert(1, v)
            v = previous.get(v)
        cycles.append(path + [start])
    return cycles


def test_no_import_cycle_between_kolm_ray_modules():
    edges, _ = import_graph()
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph()
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_the_graph_sees_lazy_imports_and_cycles(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c", "a"]]
    tree = ast.parse("def f():\n    from kolm_ray.x import _y\n")
    assert [type(n).__name__ for n in _imports(tree)] == ["ImportFrom"]
    assert _is_private("_expand") and not _is_private("__version__")
