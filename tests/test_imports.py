"""No import cycles inside bnfast: the data path reads top to bottom.

Walks every bnfast/**/*.py with ast, module-level and function-level imports
alike (a lazy import still ties two modules together), and fails on any cycle.
An import of bnfast.a.b also imports the package bnfast.a (its __init__), so
that edge is counted too, except for packages the importer is itself inside
(they are initialised before it). ``from bnfast import name`` is an edge to the
submodule bnfast.name when there is one, else to bnfast's __init__.
"""
import ast
import pathlib

import bnfast

ROOT = pathlib.Path(bnfast.__file__).parent


def _module_name(path):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        names[_module_name(path)] = path
    for path in sorted(ROOT.rglob("*.pyx")):   # compiled modules import nothing of bnfast
        names.setdefault(_module_name(path), None)
    for path in sorted(ROOT.rglob("*.so")):
        names.setdefault(_module_name(path).split(".cpython")[0].split(".abi3")[0], None)
    return names


def _packages(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _imports(name, path, modules):
    """The bnfast modules `name` imports (directly, anywhere in the file)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
    targets = {t for t in targets if t == "bnfast" or t.startswith("bnfast.")}
    ancestors = _packages(name) | ({name} if is_package else set())
    for target in list(targets):
        targets |= _packages(target) - ancestors
    targets.discard(name)
    return {t for t in targets if t in modules}


def _import_graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()
            if path is not None}


def _cycles(graph):
    """One cycle (as a list of modules) per strongly connected component."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_imports_at_module_and_function_level():
    graph = _import_graph()
    assert "bnfast._kernels" in graph["bnfast.functional"]         # module level
    assert "bnfast.nn" in graph["bnfast.onnx.export"]              # inside a function
    assert "bnfast.nn" not in graph["bnfast.nn.modules"]           # its own package
    assert "bnfast" in graph["bnfast.onnx.export"]                 # from bnfast import __version__


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_bnfast_has_no_import_cycles():
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles inside bnfast: " + "; ".join(
        " <-> ".join(c) for c in cycles)
