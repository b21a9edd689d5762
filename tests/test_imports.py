"""The configuration loads no torch, and the package's import graph has no circles and reads as a course:
a chapter imports earlier chapters only (at module level; an import inside a function runs on first use)."""
import ast, json, os, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG, NBS = ROOT / "sewer_ssl", ROOT / "nbs"


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                          cwd=ROOT, timeout=120).stdout.strip()


def test_config_imports_no_torch():
    assert _python("import sys, sewer_ssl.config as c; c.ExperimentConfig(method='mae', backbone='vit_tiny'); "
                   "print(sorted(set(c.METHODS)), 'torch' in sys.modules)") == \
        "['barlow', 'byol', 'dino', 'mae', 'simclr', 'supervised'] False"


def test_grid_list_imports_no_torch():
    out = _python("import runpy, sys; sys.argv = ['grid', 'list']\n"
                  "try: runpy.run_module('sewer_ssl.grid', run_name='__main__')\n"
                  "except SystemExit as e: assert not e.code, e.code\n"
                  "print('torch loaded:', 'torch' in sys.modules)")
    assert "replication" in out and out.endswith("torch loaded: False"), out


def module_imports(path: Path) -> tuple[set, set]:
    """(modules of the package imported at module level, those imported inside functions) by one module,
    read with `ast`; `import x` inside `if TYPE_CHECKING` or `try` at module level counts as module level."""
    tree, here = ast.parse(path.read_text(encoding="utf-8")), path.stem
    top, lazy = set(), set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.ImportFrom):
                if child.level == 1 and child.module: names = [child.module.split(".")[0]]
                elif child.level == 1: names = [a.name for a in child.names]
                elif child.module == "sewer_ssl": names = [a.name for a in child.names]
                elif child.module and child.module.startswith("sewer_ssl."): names = [child.module.split(".")[1]]
            elif isinstance(child, ast.Import):
                names = [a.name.split(".")[1] for a in child.names if a.name.startswith("sewer_ssl.")]
            for n in names:
                if (PKG / f"{n}.py").exists() and n != here: (lazy if in_function else top).add(n)
            visit(child, nested)
    visit(tree, False)
    return top, lazy - top


def import_graph() -> tuple[dict, dict]:
    mods = sorted(p for p in PKG.glob("*.py") if not p.stem.startswith("_"))
    graph = {p.stem: module_imports(p) for p in mods}
    return {m: t for m, (t, _) in graph.items()}, {m: l for m, (_, l) in graph.items()}


def chapter_order() -> dict[str, str]:
    "module -> the notebook that exports it (its `#| default_exp`), e.g. 'config' -> '00_config'."
    order = {}
    for nb in sorted(NBS.glob("*.ipynb")):
        for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
            m = re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(cell["source"]), re.M)
            if m: order[m.group(1)] = nb.stem; break
    return order


def cycles(graph: dict) -> list[list[str]]:
    "Every elementary circle found by depth-first search, each once (rotated to start at its smallest name)."
    found, state = set(), {}

    def dfs(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cyc = path[path.index(nxt):]
                i = cyc.index(min(cyc)); found.add(tuple(cyc[i:] + cyc[:i]))
            elif nxt not in state: dfs(nxt, path + [nxt])
        state[node] = "done"
    for n in sorted(graph):
        if n not in state: dfs(n, [n])
    return [list(c) for c in sorted(found)]


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_has_a_chapter():
    order, (top, _) = chapter_order(), import_graph()
    assert set(top) <= set(order), f"modules without a notebook: {sorted(set(top) - set(order))}"


def test_no_module_level_circles():
    top, _ = import_graph()
    assert "method_settings" in top["methods"] and "methods" not in top["config"]
    assert cycles(top) == [], f"module-level import circles: {cycles(top)}"


def test_chapters_import_only_earlier_chapters():
    order, (top, _) = chapter_order(), import_graph()
    later = sorted(f"{order[m]} imports {order[d]}" for m, ds in top.items() for d in ds if order[d] > order[m])
    assert later == [], "a chapter imports a later chapter at module level:\n" + "\n".join(later)


# the tooling chapters (measurement, GPU checks, the docs build): the course never needs them to run
APPENDIX = {"benchmark", "scale", "cpustep", "gpucheck", "gpu_study", "docs"}


def test_course_chapters_do_not_import_the_appendix():
    top, _ = import_graph()
    assert APPENDIX <= set(top), f"appendix modules that no longer exist: {sorted(APPENDIX - set(top))}"
    crossing = sorted(f"{m} imports {d}" for m, ds in top.items() if m not in APPENDIX for d in ds & APPENDIX)
    assert crossing == [], "a course chapter imports the appendix at module level:\n" + "\n".join(crossing)
