"""The package's import graph: no module imports itself through others, and the maths (sde, guidance, samplers,
ddpm, toy, solvers) imports no Lightning, Hydra or config, directly or through the modules it imports."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dg_lightning"
MATH = ("sde", "guidance", "samplers", "ddpm", "toy", "solvers")
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "dg_lightning.config")


def module_name(path):
    """dg_lightning.<dotted path> of a source file (a package's __init__ is the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports():
    """{module: the modules its top-level code imports} (imports inside functions run later and are left out)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name, found = module_name(path), set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from package import module`
        graph[name] = found
    return {name: {m for m in found if m in graph or not m.startswith("dg_lightning")} for name, found in graph.items()}


def reachable(graph, start):
    """Every module imported from `start`, directly or not."""
    seen, todo = set(), [start]
    while todo:
        for found in graph.get(todo.pop(), ()):
            if found not in seen:
                seen.add(found)
                todo.append(found)
    return seen


def test_no_module_imports_itself_through_others():
    graph = imports()
    cycles = sorted(name for name in graph if name in reachable(graph, name))
    assert not cycles, cycles


def test_the_maths_imports_no_framework_and_no_config():
    graph = imports()
    for name in MATH:
        used = reachable(graph, f"dg_lightning.{name}")
        assert not [m for m in used if m.startswith(FRAMEWORKS)], name
