"""Every third-party module the code imports is declared in pyproject.toml where it is used: in the base
`dependencies`, or for the few modules only the benchmark needs, in an extra. A dependency that an extra
merely happens to bring in (torch brought jinja2 for the chat templates) would pass every test run with the
extras installed; this catches it statically, and .ci/base_smoke.sh in a venv with `pip install -e .` alone."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _base_imports():
    spec = importlib.util.spec_from_file_location("base_imports", ROOT / ".ci" / "base_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _names(requirements) -> set[str]:
    """Normalised distribution names of requirement strings ('jinja2>=3.1' -> 'jinja2')."""
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", r).group()).lower() for r in requirements}


def _distributions(module: str) -> set[str]:
    return {re.sub(r"[-_.]+", "-", d).lower() for d in importlib.metadata.packages_distributions().get(module, [])}


def test_every_import_is_declared_where_it_is_used():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    base = _names(project["dependencies"])
    extras = set().union(*(_names(v) for v in project["optional-dependencies"].values()))
    bi = _base_imports()
    undeclared = []
    for module, where in sorted(bi.imported_modules().items()):
        if module == "vllm":  # the serve tests' own venv (.ci/serve_venv.sh)
            continue
        dists = _distributions(module)
        declared = extras | base if module in bi.EXTRAS_ONLY else base
        if not dists & declared:
            undeclared.append(f"{module} (imported by {where}; distributions {sorted(dists) or '?'})")
    for module, why in bi.RUNTIME.items():
        if not _distributions(module) & base:
            undeclared.append(f"{module} (needed by {why})")
    assert not undeclared, "declare in pyproject.toml [project] dependencies: " + "; ".join(undeclared)
