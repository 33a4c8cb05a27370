"""What each place may import: the model reads like the paper, the kernels know nothing of the runtime."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Installed subpackages whose folders sit at the top level (pyproject's package-dir).
FOLDERS = {"rg_mlx.kernels": ROOT / "kernels", "rg_mlx.convert": ROOT / "convert", "rg_mlx.app": ROOT / "app"}


def source_of(module: str) -> Path | None:
    """The file of an rg_mlx module (None for modules outside this repository)."""
    for package, folder in {**FOLDERS, "rg_mlx": ROOT / "rg_mlx"}.items():
        if module == package or module.startswith(package + "."):
            base = folder.joinpath(*module[len(package) :].lstrip(".").split(".")) if module != package else folder
            for path in (base.with_suffix(".py"), base / "__init__.py"):
                if path.is_file():
                    return path
            return None
    return None


def module_of(path: Path) -> str:
    for package, folder in {**FOLDERS, "rg_mlx": ROOT / "rg_mlx"}.items():
        if folder in path.parents or path.parent == folder:
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join([package, *parts])
    raise AssertionError(path)


def imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) of every import in `path`, at any depth (also inside functions), resolved."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            name = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            names = tuple(alias.name for alias in node.names)
            # `from . import x` imports the submodule x.
            found += [(f"{name}.{n}", ()) for n in names if source_of(f"{name}.{n}")] or [(name, names)]
    return found


def reachable(start: str) -> set[str]:
    """The rg_mlx modules `start` imports, directly or through each other."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen or source_of(module) is None:
            continue
        seen.add(module)
        todo += [name for name, _ in imports(source_of(module))]
    return seen


def is_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


def test_the_model_imports_only_mlx_its_config_state_and_the_scan():
    allowed = {"mlx.core", "mlx.nn", "mlx.nn.layers.distributed", "mlx_lm.models.cache",
               "rg_mlx.config", "rg_mlx.state", "rg_mlx.kernels"}
    found = imports(ROOT / "rg_mlx" / "model.py")
    outside = {m for m, _ in found if not is_stdlib(m)} - allowed
    assert not outside, f"rg_mlx/model.py imports {outside}"
    scan = {n for m, names in found if m == "rg_mlx.kernels" for n in names}
    assert scan == {"rg_lru"}, "the model calls the one scan entry point"
    # And nothing it imports brings the CPU accelerations (or any other runtime module) in.
    assert reachable("rg_mlx.model") - {"rg_mlx.model"} <= {
        "rg_mlx.config", "rg_mlx.errors", "rg_mlx.paths", "rg_mlx.state",
        *(module_of(p) for p in (ROOT / "kernels").glob("*.py")),
    }


def test_the_kernels_import_nothing_of_the_runtime_but_its_error_type():
    allowed = {"rg_mlx.errors", "rg_mlx.paths"}  # paths: the documented cache-folder helper
    for path in sorted((ROOT / "kernels").glob("*.py")):
        runtime = {m for m, _ in imports(path) if m.startswith("rg_mlx") and not m.startswith("rg_mlx.kernels")}
        assert runtime <= allowed, f"{path.relative_to(ROOT)} imports {runtime - allowed}"


def test_the_walker_sees_imports_inside_functions(tmp_path):
    # A lazy import must not slip past the checks above.
    module = ROOT / "rg_mlx" / "cpu" / "__init__.py"
    assert ("rg_mlx.cpu.ops", ()) in imports(module)
    assert "rg_mlx.kernels" in reachable("rg_mlx.cpu")
