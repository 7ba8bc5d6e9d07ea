"""The package's shape: layers in data-flow order, no import circles, no
module much over 400 lines (the config schema, which is data, excepted).

Read from the source (no import), so it runs in a second. A change that
breaks a rule here should change the layering on purpose, here and in
CONTRIBUTING.md, not by accident.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent / "finetune_cli"

# Bottom up: each folder may import the ground modules and the folders
# listed for it, nothing above.
LAYERS = {
    "ground": set(),  # errors, console, faults, files, signals, demo_summary
    "data": {"ground"},
    "model": {"ground"},
    "runtime": {"ground"},
    "run": {"ground"},
    "config": {"ground", "data", "model", "runtime", "run"},
    "cache": {"ground", "data", "model", "runtime", "run", "config"},
    "evaluate": {"ground", "data", "model", "run", "config"},
    "train": {
        "ground",
        "data",
        "model",
        "runtime",
        "run",
        "config",
        "cache",
        "evaluate",
    },
    "deploy": {"ground", "data", "model", "run", "config", "evaluate"},
    "search": {
        "ground",
        *("data", "model", "runtime", "run", "config", "cache", "evaluate", "train"),
    },
    "cli": {"ground", *("config", "data", "model", "run", "cache", "evaluate")}
    | {"train"}
    | {"deploy", "search"},
    "entry": {"cli"},  # __main__
}
BIG = 420  # lines; "a module over ~400 lines is asking to be split"
DATA_MODULES = {"config/schema.py"}


def _modules():
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("finetune_cli", *parts)).removesuffix(".__init__")
        mods[name] = p
    return mods


def _edges(mods):
    edges = {}
    for name, path in mods.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "finetune_cli"
            ):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    out.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
        edges[name] = out - {name}
    return edges


def _folder(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 1 and (ROOT / parts[1] / "__init__.py").exists():
        return parts[1]
    return "entry" if parts[-1] == "__main__" else "ground"


def _cycle(graph):
    """A cycle of `graph` (a list of nodes), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_circle_between_modules():
    edges = _edges(_modules())
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_folders_import_only_the_layers_below_them():
    edges = _edges(_modules())
    wrong = []
    folders = {}
    for name, targets in edges.items():
        src = _folder(name)
        assert src in LAYERS, f"{name}: a folder this test does not know"
        for t in targets:
            dst = _folder(t)
            if dst != src:
                folders.setdefault(src, set()).add(dst)
                if dst not in LAYERS[src]:
                    wrong.append(f"{name} imports {t} ({src} -> {dst})")
    assert not wrong, "\n".join(wrong)
    assert _cycle(folders) is None


def test_no_module_is_much_over_400_lines():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in ROOT.rglob("*.py")
    }
    big = {k: v for k, v in sizes.items() if v > BIG and k not in DATA_MODULES}
    assert not big, f"split these by concept: {big}"


def test_the_trainer_class_is_under_350_lines():
    tree = ast.parse((ROOT / "train" / "trainer.py").read_text())
    (cls,) = [
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"
    ]
    assert cls.end_lineno - cls.lineno + 1 < 350


def test_the_cli_is_one_typer_app_per_command_group():
    text = (ROOT / "cli" / "main.py").read_text()
    for group in ("prepare", "train", "evaluate", "deploy", "runs"):
        assert f"app.add_typer({group}.app)" in text
        assert "app = typer.Typer(" in (ROOT / "cli" / f"{group}.py").read_text()
