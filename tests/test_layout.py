"""The package's shape, as the README's Architecture section describes it: imports run one way
between layers with no circle and none hidden inside a function, the method is decided in one
module, functions are short enough to read whole, and ``lora.py`` is a table of contents."""

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGE = ROOT / "mlx_dpo"
# Each module's layer; a module may import from its own layer and the ones before it only.
LAYERS = ["_platform", "gguf", "data", "compute", "objectives", "online", "train", "export", "methods", "config", "commands"]
TOP = {"errors": "_platform", "loss_terms": "objectives", "methods": "methods", "config": "config", "loading": "config"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return 0  # mlx_dpo/__init__.py: loads the BLAS before anything imports mlx
    if len(parts) > 2 or (PACKAGE / parts[1]).is_dir():
        return LAYERS.index(parts[1])
    return LAYERS.index(TOP.get(parts[1], "commands"))


def internal_imports(path: Path) -> list[tuple[str, ast.AST]]:
    """(imported mlx_dpo module, node) for every import of the package in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mlx_dpo"):
                continue
            for alias in node.names:  # ``from . import x`` imports the module x
                sub = f"{target}.{alias.name}"
                out.append((sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else target, node))
        elif isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names if a.name.startswith("mlx_dpo")]
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_imports_run_one_way_with_no_circle_and_none_inside_a_function():
    graph, wrong = {}, []
    for path in MODULES:
        name = module_name(path)
        tree = ast.parse(path.read_text())
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
        graph[name] = set()
        for target, node in internal_imports(path):
            if id(node) in nested:
                wrong.append(f"{name} imports {target} inside a function")
            if target != "mlx_dpo":
                graph[name].add(target)
                if layer(target) > layer(name):
                    wrong.append(f"{name} ({LAYERS[layer(name)]}) imports {target} ({LAYERS[layer(target)]}), a later layer")
    assert not wrong, "\n".join(wrong)
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != "open", "import circle: " + " -> ".join(stack + [nxt])
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_trainer_and_the_offline_objectives_do_not_reach_up():
    trainer = {t for t, _ in internal_imports(PACKAGE / "train" / "trainer.py")}
    assert not [t for t in trainer if t.startswith(("mlx_dpo.objectives", "mlx_dpo.online"))]
    for path in (PACKAGE / "objectives").glob("*.py"):
        assert not [t for t, _ in internal_imports(path) if t.startswith("mlx_dpo.online")], path


METHOD_KEYS = {"loss_type", "online", "rounds", "rl"}


def method_keys_tested(test: ast.AST) -> set:
    """The method-choosing keys a condition reads: ``x.online``, ``x.get("rounds")``, ``x["rl"]``."""
    found = set()
    for node in ast.walk(test):
        if isinstance(node, ast.Attribute) and node.attr in METHOD_KEYS:
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and node.value in METHOD_KEYS:
            found.add(node.value)
    return found


def test_only_methods_asks_which_method_runs():
    # Branching on the keys that choose the method is methods.py's job; elsewhere they are data.
    found = []
    for path in MODULES:
        if path == PACKAGE / "methods.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            tests = [node.test] if isinstance(node, (ast.If, ast.IfExp, ast.While)) else []
            tests += list(node.ifs) if isinstance(node, ast.comprehension) else []
            for test in tests:
                if keys := method_keys_tested(test):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} tests {sorted(keys)}")
    assert not found, "\n".join(found)


def functions():
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_functions_are_short_and_take_few_positional_arguments():
    long, wide = [], []
    for path, fn in functions():
        lines = fn.end_lineno - fn.lineno + 1
        limit = 120 if (path.name, fn.name) == ("trainer.py", "train") else 80
        if lines > limit:
            long.append(f"{path.relative_to(ROOT)}:{fn.name} ({lines} lines)")
        positional = [a for a in fn.args.posonlyargs + fn.args.args if a.arg not in ("self", "cls")]
        if len(positional) > 8:
            wide.append(f"{path.relative_to(ROOT)}:{fn.name} ({len(positional)} positional parameters)")
    assert not long and not wide, "\n".join(long + wide)


def test_lora_is_a_table_of_contents():
    source = (PACKAGE / "lora.py").read_text()
    assert len(source.splitlines()) <= 300
    run = next(fn for path, fn in functions() if path.name == "lora.py" and fn.name == "run")
    assert run.end_lineno - run.lineno + 1 <= 40


@pytest.mark.parametrize("path", [p for p in MODULES if p.name == "__init__.py" and p.parent != PACKAGE], ids=lambda p: p.parent.name)
def test_every_folder_says_what_it_holds(path):
    assert ast.get_docstring(ast.parse(path.read_text()))


def test_under_ci_a_skipped_test_fails_with_its_reason(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\ndef test_needs_a_model():\n    pytest.skip('no real model here')\n\n"
        "def test_passes():\n    assert True\n")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.strict_ci", "-p", "no:cacheprovider", str(tmp_path / "test_skips.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    strict = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env={**env, "CI": "true"})
    assert strict.returncode == 1 and "1 failed, 1 passed" in strict.stdout and "no real model here" in strict.stdout
    relaxed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env={**env, "CI": ""})
    assert relaxed.returncode == 0 and "1 passed, 1 skipped" in relaxed.stdout
    if sys.platform.startswith("linux"):
        no_blas = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env={**env, "CI": "true", "MLX_DPO_BLAS": "/nonexistent/libblas.so"})
        assert no_blas.returncode != 0 and "no fast BLAS is loaded" in no_blas.stdout + no_blas.stderr
