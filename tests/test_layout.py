"""The package's shape (README, Layout): imports flow one way, no circles, short files and functions."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "sftmix_jax"
MODULES = {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in PKG.rglob("*.py")}


def imports(path) -> set[str]:
    """The sftmix_jax modules a file imports, at any depth (imports inside functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sftmix_jax"):
            for alias in node.names:  # `from pkg import module` names a module; else the module itself
                out.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sftmix_jax")}
    return out - {"sftmix_jax"}


GRAPH = {m: imports(p) for m, p in MODULES.items()}


def test_no_import_circles():
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(GRAPH.get(m, ())):
            assert state.get(n) != "open", f"import circle: {' -> '.join(stack + [m, n])}"
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("low", ["sftmix_jax.model", "sftmix_jax.ops"])
def test_model_and_ops_import_nothing_above_them(low):
    above = ("sftmix_jax.data", "sftmix_jax.trainer", "sftmix_jax.stages", "sftmix_jax.main", "sftmix_jax.losses",
             "sftmix_jax.scoring", "sftmix_jax.checkpoints", "sftmix_jax.config", "sftmix_jax.hf")
    for m, deps in GRAPH.items():
        if m.startswith(low):
            assert not [d for d in deps if d.startswith(above)], (m, deps)


def test_no_stage_imports_another_stage():
    for m, deps in GRAPH.items():
        if m.startswith("sftmix_jax.stages."):
            others = [d for d in deps if d.startswith("sftmix_jax.stages.") and d != m]
            # the evaluate stage's own parts: multiple-choice scoring and the report
            if m == "sftmix_jax.stages.evaluate":
                others = [d for d in others if d not in ("sftmix_jax.stages.multiple_choice", "sftmix_jax.stages.report")]
            assert not others, (m, others)


def test_short_files_and_functions():
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        assert len(lines) <= 400, f"{path}: {len(lines)} lines"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                why = "long:" in lines[node.lineno - 1]  # `def f(...):  # long: <reason>`
                assert n <= 60 or why, f"{path}:{node.lineno} {node.name} is {n} lines"


def test_the_wheel_imports_no_torch():
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "torch"], f"{m} imports torch"
