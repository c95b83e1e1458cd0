"""Every third-party module the library imports is installed by `pip install -e ".[demo]"` (the README's first
command), not only by the test extra: torch pulls in jinja2, so the test stack alone never notices one missing."""

import ast
import importlib.metadata as md
import pathlib
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIONAL = {"wandb"}  # imported only when the user turns W&B logging on


def _closure(reqs: list[str], extras: frozenset[str] = frozenset()) -> set[str]:
    seen: set[str] = set()
    todo = [(Requirement(r), extras) for r in reqs]
    while todo:
        req, ext = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (ext or {""})):
            continue
        name = canonicalize_name(req.name)
        if name == "jaxrl-llm":
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            sub = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        todo.extend((Requirement(s), frozenset(req.extras)) for s in sub)
    return seen


def _imported_top_modules() -> set[str]:
    mods: set[str] = set()
    for path in (ROOT / "jaxrl_llm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != "jaxrl_llm" and m not in OPTIONAL}


def test_demo_install_provides_every_imported_module():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = _closure(project["dependencies"] + project["optional-dependencies"]["demo"])
    dists = md.packages_distributions()
    missing = {}
    for mod in sorted(_imported_top_modules()):
        names = {canonicalize_name(d) for d in dists.get(mod, [])}
        if not names & installed:
            missing[mod] = sorted(names)
    assert not missing, f"imported by jaxrl_llm but not installed by .[demo]: {missing}"
