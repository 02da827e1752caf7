"""The house's floors: no module imports from a floor above its own.

Every import under gopd_mega/ (module level and inside functions alike, read with ``ast``, not
by importing) is resolved to the gopd_mega module it names and checked against FLOORS, lowest
first. Modules on one floor may import each other; a module may import any floor below. The map
is derived from the real imports, with no more floors than they support; a new module must be
placed here (the test names any that is not).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOORS: list[tuple[str, list[str]]] = [
    ("kernels", ["kernels"]),  # torch + triton only
    ("foundations", ["gopd_mega$", "gopd_mega.objective", "gopd_mega.platform", "gopd_mega.storage",
                     "gopd_mega.failures", "gopd_mega.metrics", "gopd_mega.config", "gopd_mega.data",
                     # the wire format of the SGLang servers, which config validates against
                     "gopd_mega.rollout.http", "gopd_mega.rollout.protocol"]),
    ("models", ["gopd_mega.parallel", "gopd_mega.model", "gopd_mega.optim", "gopd_mega.models", "gopd_mega.hf",
                "gopd_mega.model_io", "gopd_mega.checkpoint"]),
    ("rollout, verify", ["gopd_mega.rollout", "gopd_mega.verify"]),
    ("eval", ["gopd_mega.eval", "gopd_mega.evaluation", "gopd_mega.oracle"]),
    ("trainer", ["gopd_mega.trainer", "gopd_mega.steps", "gopd_mega.sft"]),
    ("run", ["gopd_mega.run"]),
    ("entry points", ["gopd_mega.cli", "gopd_mega.demo"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("gopd_mega", "kernels"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def floor_of(module: str) -> int:
    """Index into FLOORS of the longest prefix (whole dotted components) that names ``module``
    (a name ending in '$' names only itself)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            exact = p.endswith("$")  # the name itself, not what is under it
            p = p.rstrip("$")
            if (module == p or (not exact and module.startswith(p + "."))) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module} is on no floor of tests/test_layers.py FLOORS: place it")
    return best


def imports_of(module: str, path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported gopd_mega/kernels module) for every import statement of ``path``."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[:len(base) - node.level + is_pkg]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from pkg import submodule`
        else:
            continue
        targets = set()
        for name in names:
            parts = name.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) != module:
                targets.add(".".join(parts))
        found += [(node.lineno, t) for t in sorted(targets)]
    return found


def test_no_import_runs_up_the_house():
    known = _modules()
    violations = []
    for module, path in known.items():
        here = floor_of(module)
        for line, target in imports_of(module, path, known):
            there = floor_of(target)
            if there > here:
                violations.append(f"{path.relative_to(ROOT)}:{line}: {module} (floor '{FLOORS[here][0]}') imports "
                                  f"{target} (floor '{FLOORS[there][0]}', above)")
    assert not violations, "imports running up the house:\n" + "\n".join(violations)


def test_every_floor_is_inhabited_and_the_map_is_exact():
    """Each prefix of FLOORS names a real module (no stale entries)."""
    known = _modules()
    for name, prefixes in FLOORS:
        for p in prefixes:
            assert any(m == p.rstrip("$") or m.startswith(p + ".") for m in known), f"floor '{name}': {p} names no module"


def test_the_check_sees_function_level_imports(tmp_path):
    """A function-level import up the house is caught (the checker is not blind to lazy imports)."""
    known = {"gopd_mega.data.x": tmp_path / "x.py", "gopd_mega.run": ROOT / "gopd_mega" / "run.py"}
    (tmp_path / "x.py").write_text("def f():\n    from gopd_mega.run import build_models\n")
    found = imports_of("gopd_mega.data.x", tmp_path / "x.py", known)
    assert found == [(2, "gopd_mega.run")] and floor_of("gopd_mega.run") > floor_of("gopd_mega.data.x")
