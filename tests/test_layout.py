"""
The repository's layout rules (#27): no import cycle among the project's modules, no Python file over 600 lines.
Read with ast, nothing imported, so the whole file runs in well under a second.

An import counts wherever it sits in a file: at the top, inside a function (a lazy import is where a cycle hides),
or as a module named by a string, which is how a registry imports its entries (importlib.import_module("a.b"), or
a table of dotted names that is looked up later). A string counts when it is exactly the dotted name of one of
the project's modules.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nanochat", "scripts", "tiny_experiment", "tasks")  # the import graph's modules
SIZED_DIRS = PACKAGES + ("tests",)  # the files the line limit applies to
MAX_LINES = 600


def project_modules(root, packages):
    """{dotted name: path} of every .py file under root/<package> (a package's __init__.py is the package)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_names(tree, name, is_package):
    """Every dotted name the module's code imports or names by string, anywhere in the file."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from .. import y
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            # `from pkg import mod` imports the module pkg.mod; for an attribute this name is simply not a module
            yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            yield node.value  # a registry names modules dotted; a bare top-level name is a package list, not an import


def import_graph(root, packages=PACKAGES):
    """{module: set of the project's modules it imports} for the modules of project_modules(root, packages)."""
    modules = project_modules(root, packages)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = {m for m in _imported_names(tree, name, path.name == "__init__.py") if m in modules} - {name}
    return graph


def import_cycles(graph):
    """One list per strongly connected component with more than one module: the modules, sorted, then one cycle
    through them (the first module repeated at the end). Tarjan's algorithm; sorted so the report is stable."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(component, _cycle_in(graph, component)) for component in sorted(components)]


def _cycle_in(graph, component):
    """A path from the component's first module back to it, through the component only (breadth-first: shortest)."""
    start, members = component[0], set(component)
    came_from, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])
                    return path[::-1] + [start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")


def long_files(root, dirs=SIZED_DIRS, max_lines=MAX_LINES):
    """[(path relative to root, lines)] of the .py files under root/<dir> longer than max_lines."""
    found = []
    for d in dirs:
        for path in sorted((root / d).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if n > max_lines:
                found.append((str(path.relative_to(root)), n))
    return found


def test_no_import_cycle():
    cycles = import_cycles(import_graph(ROOT))
    assert not cycles, "import cycles among the project's modules:\n" + "\n".join(
        f"  {', '.join(members)}: {' -> '.join(path)}" for members, path in cycles)


def test_no_file_over_the_line_limit():
    found = long_files(ROOT)
    assert not found, f"files over {MAX_LINES} lines:\n" + "\n".join(f"  {p}: {n}" for p, n in found)


def _write(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_import_graph_finds_planted_cycles(tmp_path):
    """A cycle closed by a lazy import inside a function, one by a relative import, one by a registry's string, and
    imports that form no cycle (a module and its package, names that are not modules, another project's module)."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg import b\nfrom pkg.b import helper\n",
        "pkg/b.py": "def helper():\n    import pkg.c as c\n    return c\n",
        "pkg/c.py": "from . import a\n",
        "pkg/reg.py": "import importlib\nKINDS = {'x': 'pkg.model'}\ndef load(k):\n"
                      "    return importlib.import_module(KINDS[k])\n",
        "pkg/model.py": "from pkg.reg import load\n",
        "pkg/leaf.py": "import pkg\nfrom pkg.a import nothing_here\nimport torch.nn\nNOTE = 'see pkg/a.py'\n",
        "other/x.py": "import pkg.a\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg", "pkg.a"} and graph["pkg.reg"] == {"pkg.model"}
    assert graph["pkg.leaf"] == {"pkg", "pkg.a"} and "other.x" not in graph
    assert import_cycles(graph) == [
        (["pkg.a", "pkg.b", "pkg.c"], ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]),
        (["pkg.model", "pkg.reg"], ["pkg.model", "pkg.reg", "pkg.model"]),
    ]
    _write(tmp_path, {"pkg/c.py": "", "pkg/reg.py": "def load(k):\n    pass\n"})  # both cycles broken
    assert import_cycles(import_graph(tmp_path, ("pkg",))) == []


def test_relative_imports_resolve_from_the_package(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .sub import inner\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/inner.py": "from .. import top\nfrom ..sub import sibling\n",
        "pkg/sub/sibling.py": "",
        "pkg/top.py": "",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg"] == {"pkg.sub", "pkg.sub.inner"}
    assert graph["pkg.sub.inner"] == {"pkg", "pkg.top", "pkg.sub", "pkg.sub.sibling"}


def test_long_files_counts_lines(tmp_path):
    _write(tmp_path, {"pkg/ok.py": "x = 1\n" * MAX_LINES, "pkg/deep/long.py": "x = 1\n" * (MAX_LINES + 1),
                      "elsewhere/long.py": "x = 1\n" * 1000})
    assert long_files(tmp_path, ("pkg",)) == [("pkg/deep/long.py", MAX_LINES + 1)]
