"""The package's layout: production code does not depend on test support.

``kolm_ray/testing/`` (fake servers, seeded synthetic corpora, artifact builders) is for tests,
benchmarks and examples; nothing else under ``kolm_ray/`` may import it, at module level or
inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kolm_ray"
TESTING = "kolm_ray.testing"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) for every import in ``tree``, relative ones resolved against ``module``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from kolm_ray import testing` imports kolm_ray.testing as much as `import kolm_ray.testing`.
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def imports_of_test_support(root: Path = PACKAGE) -> list[str]:
    """``path:line: module`` for each import of ``kolm_ray.testing`` from outside it."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if (root / "testing") in path.parents:
            continue
        module = _module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in _imported(tree, module, path.name == "__init__.py"):
            if name == TESTING or name.startswith(TESTING + "."):
                found.append(f"{path.relative_to(root.parent)}:{line}: {name}")
    return sorted(set(found))


def test_no_production_module_imports_the_test_support():
    assert imports_of_test_support() == []


def test_the_check_finds_absolute_relative_and_function_level_imports(tmp_path):
    pkg = tmp_path / "kolm_ray"
    (pkg / "testing").mkdir(parents=True)
    (pkg / "train").mkdir()
    for d in (pkg, pkg / "testing", pkg / "train"):
        (d / "__init__.py").write_text("")
    (pkg / "testing" / "corpus.py").write_text("from kolm_ray.testing import cluster\n")  # allowed there
    (pkg / "train" / "base.py").write_text("def f():\n    from kolm_ray.testing.corpus import tldr_rows\n")
    (pkg / "train" / "fit.py").write_text("from ..testing import corpus\n")
    (pkg / "train" / "__init__.py").write_text("from ..testing.corpus import Row\n")
    (pkg / "cli.py").write_text("import kolm_ray.testing.cluster as c\nfrom kolm_ray import testing\n")
    (pkg / "ok.py").write_text("from kolm_ray.train import base\nimport kolm_ray.testing_notes\n"
                               "# python -m kolm_ray.testing.messages_api\n")
    assert imports_of_test_support(pkg) == [
        "kolm_ray/cli.py:1: kolm_ray.testing.cluster",
        "kolm_ray/cli.py:2: kolm_ray.testing",
        "kolm_ray/train/__init__.py:1: kolm_ray.testing.corpus",
        "kolm_ray/train/__init__.py:1: kolm_ray.testing.corpus.Row",
        "kolm_ray/train/base.py:2: kolm_ray.testing.corpus",
        "kolm_ray/train/base.py:2: kolm_ray.testing.corpus.tldr_rows",
        "kolm_ray/train/fit.py:1: kolm_ray.testing",
        "kolm_ray/train/fit.py:1: kolm_ray.testing.corpus",
    ]
