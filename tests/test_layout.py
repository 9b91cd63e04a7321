"""The package's folders are floors: a module imports only from its own floor or the ones below."""

import ast
import pathlib

FLOORS = ["model", "weights", "drafting", "decode", "train", "bench"]  # bottom to top
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
