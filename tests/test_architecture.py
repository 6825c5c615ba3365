"""The architecture rules, read from the source: one-way imports, no cycle-dodging imports, small modules.

Layers: cli -> runs -> analysis -> models -> data (errors is a leaf every layer may import;
viz draws and may import data only). See DEVELOPERS.md, "Architecture".
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mechicl"
ALLOWED = {  # layer -> the mechicl layers its modules may import
    "errors": set(),
    "data": {"errors", "data"},
    "models": {"errors", "data", "models"},
    "analysis": {"errors", "data", "models", "analysis"},
    "viz": {"errors", "data", "viz"},
    "runs": {"errors", "data", "models", "analysis", "viz", "runs"},
    "cli": {"errors", "data", "models", "analysis", "runs", "cli"},
}
LAZY_OK: set[str] = set()  # layers allowed function-level mechicl imports: none (the CLI loads commands by name)
LAZY_LOADER = PKG / "cli" / "dispatch.py"  # the one module that imports a command's module lazily (importlib)
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.stat().st_size)


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0].removesuffix(".py") if rel[0] != "__init__.py" else "mechicl"


def _mechicl_imports(tree: ast.AST) -> list[tuple[ast.AST, str, bool]]:
    """(node, imported module, inside a function) for every import of a mechicl module."""
    out: list[tuple[ast.AST, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        nonlocal out
        for child in ast.iter_child_nodes(node):
            hidden = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)  # also hides a cycle
            inner = in_function or hidden or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("mechicl"):
                names = [child.module] if child.module != "mechicl" else [f"mechicl.{a.name}" for a in child.names]
                out += [(child, n, in_function) for n in names]
            elif isinstance(child, ast.Import):
                out += [(child, a.name, in_function) for a in child.names if a.name.startswith("mechicl")]
            visit(child, inner)

    visit(tree, False)
    return out


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_one_way(path):
    layer = _layer(path)
    if layer == "mechicl":
        return
    tree = ast.parse(path.read_text())
    for node, name, in_function in _mechicl_imports(tree):
        target = name.split(".")[1]
        assert target in ALLOWED[layer], f"{path.name}:{node.lineno} ({layer}) imports {name} ({target})"
        assert not in_function or layer in LAZY_OK, f"{path.name}:{node.lineno}: function-level import of {name}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_modules_and_functions_are_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name} has {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            assert n <= MAX_FUNCTION_LINES or "Long because" in doc, (
                f"{path.name}:{node.lineno} {node.name} has {n} lines; split it or say why in its docstring "
                f"('Long because ...')"
            )


def _import_module_calls(tree: ast.AST) -> list[int]:
    """Lines that call ``importlib.import_module`` or ``__import__`` (an import by name, at run time)."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            or (isinstance(node.func, ast.Name) and node.func.id in {"import_module", "__import__"})
        )
    ]


def test_one_lazy_loader():
    """Commands are imported by name in ``cli/dispatch.py`` only; no other module imports by name at run time."""
    loaders = [p for p in _modules() if _import_module_calls(ast.parse(p.read_text()))]
    assert loaders == [LAZY_LOADER], [str(p.relative_to(PKG)) for p in loaders]
    assert _layer(LAZY_LOADER) == "cli"
    assert _import_module_calls(ast.parse("import importlib\nm = importlib.import_module('x')\n")) == [2]


def test_the_layer_checker_catches_an_upward_import(tmp_path):
    tree = ast.parse("def f():\n    from mechicl.analysis.engine.hooks import capture\n")
    [(node, name, in_function)] = _mechicl_imports(tree)
    assert name == "mechicl.analysis.engine.hooks" and in_function and "analysis" not in ALLOWED["data"]
    [(_, _, hidden)] = _mechicl_imports(ast.parse("if TYPE_CHECKING:\n    from mechicl.runs.report import X\n"))
    assert hidden


def test_task_catalogue_imports_no_model_code():
    """Importing the task module (and building a prompt batch's inputs) loads no model code and no TransformerLens."""
    code = (
        "import sys, mechicl.data.tasks, mechicl.data.prompts, mechicl.data.pairs, mechicl.data.batches; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'transformer_lens' or "
        "m.startswith(('mechicl.models', 'mechicl.analysis', 'mechicl.runs', 'mechicl.viz'))); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


CONSTRUCTORS = {"zeros", "ones", "full", "empty", "arange", "eye", "tensor", "rand", "randn", "randint", "linspace"}


def _hook_body_constructors(tree: ast.AST) -> list[int]:
    """Lines of bare tensor constructors (no ``device=``) inside hook bodies: functions with an argument ``hook``.

    A hook runs on every forward on the activation's device; a tensor it builds without ``device=`` lands on
    the CPU and either fails to meet a CUDA activation or costs a host-to-device copy per call."""
    lines = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and "hook" in [a.arg for a in fn.args.args]:
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in CONSTRUCTORS
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)
                ):
                    lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_hooks_build_tensors_on_the_activations_device(path):
    lines = _hook_body_constructors(ast.parse(path.read_text()))
    assert not lines, f"{path.name}: lines {lines} build a tensor inside a hook without device= (use device=act.device)"


def test_the_device_checker_catches_a_bare_arange_in_a_hook():
    src = "def hook(act, hook):\n    r = torch.arange(3)\n    ok = torch.arange(3, device=act.device)\n    return act\n"
    assert _hook_body_constructors(ast.parse(src)) == [2]


RESAMPLERS = {"integers", "randint", "multinomial"}  # draws with replacement; "choice" too unless replace=False
STATS_CORE = PKG / "analysis" / "stats"


def _resample_draws(tree: ast.AST) -> list[int]:
    """Lines that draw resamples (``.integers(``, ``.randint(``, ``.multinomial(``, ``.choice(`` without
    ``replace=False``). Draws of distinct items (``permutation``, ``choice(..., replace=False)``) are allowed."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            no_replace = any(
                k.arg == "replace" and isinstance(k.value, ast.Constant) and k.value.value is False
                for k in node.keywords
            )
            if name in RESAMPLERS or (name == "choice" and not no_replace):
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize(
    "path",
    [p for p in _modules() if _layer(p) in ("analysis", "runs", "viz") and STATS_CORE not in p.parents],
    ids=lambda p: str(p.relative_to(PKG)),
)
def test_only_the_statistics_core_draws_resamples(path):
    lines = _resample_draws(ast.parse(path.read_text()))
    assert not lines, (
        f"{path.name}: lines {lines} draw resamples; call mechicl.analysis.stats (bootstrap_indices, "
        "bootstrap_counts, mean_ci, ratio_ci, sign_flip_p, ...) instead"
    )


def test_the_resample_checker_catches_a_bootstrap_loop():
    src = (
        "rows = rng.integers(0, n, size=n)\n"
        "signs = rng.choice([-1.0, 1.0], size=(99, n))\n"
        "heads = rng.choice(len(pool), size=3, replace=False)\n"
        "donor = rng.permutation(n)\n"
        "idx = np.random.randint(0, n, 5)\n"
    )
    assert _resample_draws(ast.parse(src)) == [1, 2, 5]
