"""The package's folders are floors: a module imports only from its own floor or the ones below."""

import ast
import pathlib

FLOORS = ["model", "weights", "drafting", "decode", "train", "cli", "bench"]  # bottom to top
ROOT = pathlib.Path(__file__).resolve().parents[1] / "clp_jax"


def _imported_floors(path: pathlib.Path) -> set[str]:
    floors = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "clp_jax" and len(parts) > 1 and parts[1] in FLOORS:
                floors.add(parts[1])
    return floors


def test_every_module_lives_in_a_floor():
    loose = [p.name for p in ROOT.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the floors {FLOORS}: {loose}"


def test_imports_never_climb():
    climbing = []
    for floor in FLOORS:
        for path in sorted((ROOT / floor).glob("*.py")):
            for other in _imported_floors(path):
                if FLOORS.index(other) > FLOORS.index(floor):
                    climbing.append(f"{path.relative_to(ROOT)} imports clp_jax.{other}")
    assert not climbing, "\n".join(climbing)


def _module_imports() -> dict[str, set[str]]:
    """clp_jax module -> the clp_jax modules it imports anywhere in its file (function bodies included)."""
    modules = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module:  # `from pkg import mod` or `from mod import x`
                targets = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets = targets or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_import_circle():
    """No module imports (directly or through others, at the top or inside a function) one that imports it."""
    graph, state, circles = _module_imports(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles:\n" + "\n".join(circles)
