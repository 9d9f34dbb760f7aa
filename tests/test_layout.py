"""The code's layout holds: pipeline/stages/ holds the DVC stages, crawl/ filter/ train/ are libraries that never
import a stage, nothing imports in a cycle, and every stage's deps in dvc.yaml cover every project module it imports,
directly or not, so that an edit to any of them marks the stage changed in `dvc status`."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dextra.pipeline.cli import STAGES
from tests.helpers import REPO

PACKAGES = {"dextra.pipeline": "pipeline", "dextra.crawl": "crawl", "dextra.filter": "filter", "dextra.train": "train"}
LIBRARIES = ("dextra.crawl", "dextra.filter", "dextra.train")


def module_file(name: str) -> Path | None:
    """The repository file a `dextra.…` module lives in (pyproject maps each subpackage to a top-level folder)."""
    if name == "dextra":
        return Path("dextra/__init__.py")
    for package, folder in PACKAGES.items():
        if name == package or name.startswith(package + "."):
            base = Path(folder, *name[len(package) + 1 :].split(".")) if name != package else Path(folder)
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if (REPO / candidate).is_file():
                    return candidate
    return None


def imported(path: Path) -> set[str]:
    """The dextra modules a file imports, at any depth of its code (`from a import b` may name module a.b)."""
    names = set()
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] == "dextra" and module_file(n) is not None}


def graph() -> dict[Path, set[Path]]:
    files = [p.relative_to(REPO) for folder in ("dextra", *PACKAGES.values()) for p in (REPO / folder).rglob("*.py")]
    return {f: {module_file(n) for n in imported(f)} - {f} for f in files}


def closure(start: str) -> set[Path]:
    """Every file Python executes when importing `start`: its imports, theirs, and the packages above each."""
    edges, seen, todo = graph(), set(), [module_file(start)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += list(edges[path])
        todo += [parent / "__init__.py" for parent in path.parents if (REPO / parent / "__init__.py").is_file()]
    return seen | {Path("dextra/__init__.py")}


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(dep) or Path(dep) in path.parents for dep in deps)


def test_every_cli_stage_is_a_dvc_stage_with_its_own_module():
    assert set(STAGES) == set(dvc_stages())
    for name, (module, _) in STAGES.items():
        assert module == f"dextra.pipeline.stages.{name}"
        assert dvc_stages()[name]["cmd"] == f"dextra {name}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_every_module_it_imports(stage):
    needed = closure(f"dextra.pipeline.stages.{stage}") | closure("dextra.pipeline.cli")
    deps = dvc_stages()[stage]["deps"]
    missing = sorted(str(p) for p in needed if not covered(p, deps))
    assert not missing, f"dvc.yaml: stage {stage} imports these but does not depend on them: {missing}"


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node: Path, stack: list[Path]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, [" -> ".join(map(str, c)) for c in cycles]


def test_libraries_never_import_a_stage_or_the_cli():
    stages = {module_file("dextra.pipeline.cli")} | {p for p in graph() if p.parts[:2] == ("pipeline", "stages")}
    for path, targets in graph().items():
        if path.parts[0] in ("crawl", "filter", "train"):
            assert not (targets & stages), f"{path} imports stage code {sorted(map(str, targets & stages))}"


def test_stage_modules_are_thin():
    """Stage modules read params and inputs, call the libraries and write outputs; the work is in the libraries."""
    for path in (REPO / "pipeline" / "stages").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 250, path


@pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc is not installed")
def test_an_edited_library_module_marks_every_stage_importing_it_changed(tmp_path):
    """With a dvc.lock recorded for the code as it is, a comment appended to every module of the project leaves each
    stage listing, among its changed deps, one that covers each module it imports: nothing stays "up to date"."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked + untracked:
        source = REPO / name
        if (
            source.is_file()
            and not name.startswith(("data/", "models/", "dvclive/", "metrics/"))
            and name != "dvc.lock"
        ):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tmp_path / name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for spec in dvc_stages().values():  # stand-ins for the data, so DVC can hash every dep and uncached out
        for entry in spec["deps"] + spec.get("metrics", []):
            target = tmp_path / (entry if isinstance(entry, str) else next(iter(entry)))
            if not target.exists():
                if target.suffix:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text("{}")
                else:
                    target.mkdir(parents=True)
    script = (
        "from dvc.repo import Repo\n"
        "repo = Repo('.')\n"
        "with repo.lock:\n"
        "    for stage in repo.index.stages:\n"
        "        stage.save(allow_missing=True)\n"
        "        stage.dump(update_pipeline=False)\n"
    )
    subprocess.run(["python", "-c", script], cwd=tmp_path, check=True, capture_output=True)
    modules = sorted(graph())
    for module in modules:
        with open(tmp_path / module, "a") as f:
            f.write("\n# an edit\n")
    result = subprocess.run(["dvc", "status", "--json"], cwd=tmp_path, capture_output=True, text=True, check=True)
    status = json.loads(result.stdout)
    for stage in STAGES:
        changed = [dep for entry in status.get(stage, []) for dep in entry.get("changed deps", {})]
        needed = closure(f"dextra.pipeline.stages.{stage}") | closure("dextra.pipeline.cli")
        stale = sorted(str(p) for p in needed if not covered(p, changed))
        assert not stale, f"dvc status: stage {stage} does not see edits to {stale}"
