"""How far one value travels through the code: the training config from `softfine.train.train`, and
the search's flags (argparse's Namespace, and the SearchFlags that carry them on) from `tune/search.py`'s
`main`. A reader follows a value best when it goes down and does not come back (issue 28's measure).

Two ways. Read: from the start, every call that passes the value on by name is followed, on every path
(CUDA, resume, errors), depth first in the order of the code; then again following its fields too
(`resolve_device(config.device)`). Run: a small training and a small search
run traced, noting each function of the project that receives the value as an argument (or a list of
them) in the order of the first calls. Each function counts once. The figures are over the functions'
modules in that order: `visits` (consecutive functions of one module are one visit), `modules` (distinct
ones), `returns` (visits to a module left before).

    python benchmarks/value_paths.py                 # this checkout
    python benchmarks/value_paths.py --root OTHER    # another checkout of the repository (git worktree)

The search runs 2 grid points of the tiny encoder on a local Ray instance (the trials' own processes
are not traced: only the driver holds the flags); all of it took 1.5 minutes on 2 CPUs."""

from __future__ import annotations

import argparse
import ast
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# The smallest run of the tests' searches (tests/tune_fixtures.small_search_flags), one epoch.
SMALL = dict(
    model="tiny", tiny_layers=1, tiny_hidden=64, limit_train=24, limit_eval=24, batch_size=2, epochs=1
)
SEARCH = (
    "--gpus-per-trial 0 --cpus-per-trial 1 --alphas 0.1,0.1 --beta 2 3 --gamma 2 --name paths"  # 2 points
)


def import_from(root: Path) -> dict[str, str]:
    """The project's packages as the traced code's file names start, each with the folder it is shown
    as: the installed ones when they are `root`'s; another checkout's (--root) through links put ahead
    of them on sys.path, as no installed package can be another commit's."""
    import importlib.util

    installed = Path(importlib.util.find_spec("softfine").origin).parent
    if installed == root / "softfine":
        return {f"{root / 'softfine'}{os.sep}": "softfine/", f"{root / 'tune'}{os.sep}": "tune/"}
    links = Path(tempfile.mkdtemp(prefix="value-paths-"))
    atexit.register(shutil.rmtree, links, ignore_errors=True)
    (links / "softfine").symlink_to(root / "softfine")
    (links / "softfine_tune").symlink_to(root / "tune")
    sys.path.insert(0, str(links))
    return {f"{links / 'softfine'}{os.sep}": "softfine/", f"{links / 'softfine_tune'}{os.sep}": "tune/"}


def kind_of(value, kinds: tuple[str, ...]) -> str | None:
    """The name in `kinds` of the value's type (or of its first item's, for a list or tuple)."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    name = type(value).__name__
    return name if name in kinds else None


def traced(run, kinds: tuple[str, ...], packages: dict[str, str]) -> list[tuple[str, str]]:
    """(module:function, type name) for each function of the project (import_from's `packages`) that
    received a value of a type named in `kinds` as an argument, once per function and type, in the order
    of the first calls. Types are matched by name: the checkout traced has classes of its own."""
    folders = tuple(packages)
    seen, path = set(), []

    def profile(frame, event, _arg):
        code = frame.f_code
        if event != "call" or not code.co_filename.startswith(folders):
            return
        local = frame.f_locals  # at a call: its arguments
        for name in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
            if name == "self":  # the value's own methods (config.tiny_shape()) are no journey
                continue
            kind = kind_of(local.get(name), kinds)
            if kind and (code, kind) not in seen:
                seen.add((code, kind))
                folder = next(f for f in folders if code.co_filename.startswith(f))
                module = packages[folder] + code.co_filename[len(folder) :]
                path.append((f"{module}:{code.co_qualname}", kind))

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return path


# -- Read, not run: every call that passes the value on, on every path (CUDA, resume, errors) ---------


def read_modules(root: Path) -> dict[str, ast.Module]:
    return {
        f"{folder}/{path.name}": ast.parse(path.read_text(encoding="utf-8"))
        for folder in ("softfine", "tune")
        for path in sorted((root / folder).glob("*.py"))
    }


def definitions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """The module's functions and methods by qualified name (Class.method)."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}.{item.name}"] = item
    return found


def imported(module: str, tree: ast.Module) -> dict[str, tuple[str, str]]:
    """Names the module imports from the project (at its top or inside functions): name -> (module, name)."""
    names = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # relative: the importing module's own package
            source = f"{module.split('/')[0]}/{node.module}.py"
        elif node.module and node.module.split(".")[0] in ("softfine", "softfine_tune"):
            package, _, rest = node.module.partition(".")
            source = f"{'tune' if package == 'softfine_tune' else 'softfine'}/{rest}.py"
        else:
            continue
        for alias in node.names:
            names[alias.asname or alias.name] = (source, alias.name)
    return names


def read_path(
    root: Path, start: tuple[str, str], names: set[str], fields: bool = False
) -> list[tuple[str, str]]:
    """(module:function, "") for each function a value reaches from `start` (its parameters `names`),
    by the calls that pass it on by name (with `fields`, or one of its fields: `config.device`), each
    function once, depth first in the order of the code."""
    trees = read_modules(root)
    defs = {m: definitions(t) for m, t in trees.items()}
    imports = {m: imported(m, t) for m, t in trees.items()}
    seen, path = set(), []

    def callee(module: str, owner: str, func: ast.expr) -> tuple[str, str] | None:
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
            return (module, f"{owner}.{func.attr}") if f"{owner}.{func.attr}" in defs[module] else None
        if not isinstance(func, ast.Name):
            return None
        local = func.id in defs[module] or f"{func.id}.__init__" in defs[module]
        target = (module, func.id) if local else imports[module].get(func.id)
        if target and target[0] in defs:
            if target[1] in defs[target[0]]:
                return target
            if f"{target[1]}.__init__" in defs[target[0]]:  # a class: its __init__
                return target[0], f"{target[1]}.__init__"
        return None

    def visit(module: str, qualname: str, tracked: set[str]) -> None:
        if (module, qualname) in seen:
            return
        seen.add((module, qualname))
        path.append((f"{module}:{qualname}", ""))
        node, owner = defs[module][qualname], qualname.partition(".")[0]
        tracked = aliases(node, tracked, fields)
        calls = sorted(
            (n for n in ast.walk(node) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset)
        )
        for call in calls:  # in the order of the code (ast.walk goes breadth first)
            target = callee(module, owner, call.func)
            if target is None:
                continue
            params = [a.arg for a in defs[target[0]][target[1]].args.args]
            params = params[1:] if params[:1] == ["self"] else params
            passed = [(params[i], a) for i, a in enumerate(call.args) if i < len(params)]
            passed += [(k.arg, k.value) for k in call.keywords if k.arg]
            bound = {name for name, value in passed if carried(value, tracked, fields)}
            if bound:
                visit(*target, bound)

    visit(*start, set(names))
    return path


def carried(node: ast.expr, names: set[str], fields: bool = False) -> bool:
    """Whether an expression is the value: its name, a list of it, an item of it, a replace() of it;
    with `fields`, one of its fields (config.device) too."""
    if isinstance(node, ast.Name):
        return node.id in names
    if isinstance(node, ast.Attribute):  # kept on an object under its name: self.config, plan.args
        return node.attr in names or (fields and carried(node.value, names, fields))
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(carried(item, names, fields) for item in node.elts)
    if isinstance(node, (ast.Subscript, ast.Starred)):
        return carried(node.value, names, fields)
    if isinstance(node, ast.Call) and node.args:  # dataclasses.replace(config, ...): a config too
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        return name == "replace" and carried(node.args[0], names, fields)
    return False


def aliases(function: ast.AST, names: set[str], fields: bool = False) -> set[str]:
    """`names` and the local names bound to the value (`c = config`, `for c in configs`; with
    `fields`, `device = config.device` too)."""
    names = set(names)
    for _ in range(3):  # an alias of an alias
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and carried(node.value, names, fields):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, (ast.For, ast.comprehension)) and carried(node.iter, names, fields):
                names |= {t.id for t in ast.walk(node.target) if isinstance(t, ast.Name)}
    return names


def figures(path: list[tuple[str, str]], kinds: set[str]) -> dict:
    """Visits, distinct modules and returns of the path of the values of `kinds`."""
    modules = [where.partition(":")[0] for where, kind in path if kind in kinds]
    visits = [m for i, m in enumerate(modules) if i == 0 or modules[i - 1] != m]
    returns = sum(m in visits[:i] for i, m in enumerate(visits))
    return {"visits": len(visits), "modules": len(set(visits)), "returns": returns}


def train_run(data: str | None, out: Path):
    from softfine.config import make_config
    from softfine.train import train

    config = make_config(
        {**SMALL, "dataset": "resume", "out": str(out), **({"data_dir": data} if data else {})}
    )
    return lambda: train(config)


def search_run(data: str | None, folder: Path):
    from softfine_tune.search import main

    argv = [
        *("--dataset", "resume", *(["--data-dir", data] if data else [])),
        *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()),
        *SEARCH.split(),
        *("--mlflow-uri", f"sqlite:///{folder / 'mlflow.db'}", "--storage-path", str(folder / "ray")),
    ]

    def run():
        code = main(argv)
        if code != 0:
            raise SystemExit(f"the search failed (exit {code})")

    return run


def measure(root: Path, packages: dict[str, str], data: str | None, no_search: bool) -> dict:
    """{what: (path, the kinds of value counted)}: the read paths, then the traced runs."""
    measures = {
        "read: config from softfine/train.py:train": (
            read_path(root, ("softfine/train.py", "train"), {"config"}),
            {""},
        ),
        "read: args from tune/search.py:main": (read_path(root, ("tune/search.py", "main"), {"args"}), {""}),
        "read: config and its fields from softfine/train.py:train": (
            read_path(root, ("softfine/train.py", "train"), {"config"}, fields=True),
            {""},
        ),
        "read: args and its fields from tune/search.py:main": (
            read_path(root, ("tune/search.py", "main"), {"args"}, fields=True),
            {""},
        ),
    }
    with tempfile.TemporaryDirectory(prefix="value-paths-") as tmp:
        tmp = Path(tmp)
        measures["run: config through train()"] = (
            traced(train_run(data, tmp / "run"), ("TrainConfig",), packages),
            {"TrainConfig"},
        )
        if not no_search:
            flags = traced(search_run(data, tmp), ("Namespace", "SearchFlags"), packages)
            measures["run: the search's flags as argparse.Namespace"] = (flags, {"Namespace"})
            measures["run: the search's flags as Namespace or SearchFlags"] = (
                flags,
                {"Namespace", "SearchFlags"},
            )
    return measures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="the repository checkout whose code is traced (default: this one)",
    )
    parser.add_argument("--data-dir", help="the data folder (softfine's default: $SOFTFINE_DATA_DIR, ...)")
    parser.add_argument("--no-search", action="store_true", help="trace train() only (seconds)")
    parser.add_argument("--show", action="store_true", help="print each path's functions in order too")
    args = parser.parse_args()
    root = args.root.resolve()
    if not all((root / folder).is_dir() for folder in ("softfine", "tune")):
        parser.exit(
            2,
            f"{parser.prog}: error: --root {args.root}: no softfine/ and tune/ folders there (give a "
            "checkout of this repository)\n",
        )
    packages = import_from(root)
    commit = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from softfine.errors import SoftFiNEError  # the checkout's own (after import_from)

    try:
        measures = measure(root, packages, args.data_dir, args.no_search)
    except SoftFiNEError as err:  # missing data, say: one line, as the softfine command ends
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    for what, (path, kinds) in measures.items():
        found = figures(path, kinds)
        print(
            f"{commit or root}: {what}: {found['visits']} visits to {found['modules']} modules, "
            f"{found['returns']} returns to a module left before",
            flush=True,
        )
        if args.show:
            print("  " + " > ".join(where for where, kind in path if kind in kinds))


if __name__ == "__main__":
    main()
