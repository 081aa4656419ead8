"""The GPU node's kit: what benchmarks/gpu_suite.py needs on an air-gapped node, in one folder.

    .venv/bin/python scripts/gpu_kit.py build --out .gpu-kit      # here (`make gpu-kit`), with PyPI
    .gpu-kit/run.sh OUT_DIR [--budget-s 420] [--smoke]             # on the node, without network

The node (benchmarks/gpu_node_packages.txt) has Python 3.12 with torch, transformers, peft and
more, but not every distribution the suite imports. `build` follows the suite's imports (every
file it runs, every import in them, function-level ones too, since a static walk cannot tell a
ZeRO-3-only import from a live one), pins the cp312 manylinux x86_64 wheels of the distributions
the node lacks and of their requirements (`KIT`), downloads each with --no-deps, checks that the
kit resolves against the node's list, and copies the suite's own files and `run.sh` beside them.
`run` (what run.sh calls) installs the wheels with `pip install --no-index --no-deps --target` into
a temporary folder put on PYTHONPATH, so the node's torch is never touched, prints the versions it
ended up with and any requirement the node does not meet, then runs the suite with what is left
of the budget. docs/performance.md has the steps.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version


ROOT = Path(__file__).resolve().parents[1]
NODE_PACKAGES = ROOT / "benchmarks" / "gpu_node_packages.txt"
# One version of each distribution the kit carries: the suite's imports the node lacks and their
# requirements the node lacks. `build` fails if this and the wheels' metadata disagree.
KIT = {
    "bitsandbytes": "0.50.2",  # nf4 bases: the CUDA tests, overhead-1b-nf4, llama7b-qlora
    "deepspeed": "0.19.8",  # monte_ds imports it under ZeRO-3; a pure-Python wheel built here
    "einops": "0.8.2",  # the rest: deepspeed's requirements
    "hjson": "3.1.0",
    "msgpack": "1.2.4",
    "ninja": "1.13.2",
    "py-cpuinfo": "9.0.0",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "jsonschema": "4.26.0",  # monte_ds.schema: MonteCLoRAConfig's field checks
    "jsonschema-specifications": "2025.9.1",  # the rest: jsonschema's requirements (attrs is on the node)
    "referencing": "0.37.0",
    "rpds-py": "2026.9.1",
}
BUILT_HERE = {"deepspeed"}  # from the sdist, DS_BUILD_OPS=0: no compiled ops, so one py3 wheel
# The node: CPython 3.12 on x86-64 Linux with glibc >= 2.28 (RHEL 8 and later).
PYTHON_TAG = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")
MAX_GLIBC = (2, 28)
NODE_ENV = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip
MAX_KIT_BYTES = 60 * 1024**2  # the device tool carries at most 64 MiB of ignored paths
DEFAULT_BUDGET_S = 420  # run.sh's whole run, installs included
SUITE_START_RESERVE_S = 10  # the suite's own start (importing torch) before its clock runs
EXTRA_SOURCES = ["pyproject.toml", "scripts/gpu_kit.py"]  # pytest's settings; `run` itself
RUN_SH = """#!/bin/sh
# Runs the monte-ds GPU suite on a node without network (docs/performance.md):
#   .gpu-kit/run.sh OUT_DIR [--budget-s 420] [--smoke]        PYTHON=python3.12 to pick the interpreter
KIT="$(cd "$(dirname "$0")" && pwd)"
exec "${PYTHON:-python3}" "$KIT/src/scripts/gpu_kit.py" run --kit "$KIT" "$@"
"""


class KitError(Exception):
    """Bad input or a failed build: one line `monte-ds: error: <key>: <problem>` and exit 2, as
    monte_ds.errors.run_cli does. Not that module: `run` starts on the node where monte_ds (which
    imports torch and peft) may not import yet, and must still say what is wrong in one line."""

    def __init__(self, problem: str, key: str) -> None:
        super().__init__(f"{key}: {problem}")


@dataclass(frozen=True)
class NodePackage:
    name: str
    version: Version | None
    imports: tuple[str, ...]


@dataclass(frozen=True)
class Wheel:
    """What a wheel says about itself: name, version, file tags, import names, requirements."""

    path: Path
    name: str
    version: Version
    tags: frozenset
    imports: tuple[str, ...]
    requires: tuple[Requirement, ...]


@dataclass
class Resolution:
    """The kit checked against the node: what is wrong, what is carried although the node has it
    (and which requirement forces it), and requirements only the node's real versions can settle."""

    problems: list[str] = field(default_factory=list)
    forced: dict[str, str] = field(default_factory=dict)
    check_on_node: list[str] = field(default_factory=list)


def read_node_packages(path: Path = NODE_PACKAGES) -> dict[str, NodePackage]:
    packages = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 3) or (len(fields) == 3 and not fields[2].startswith("import=")):
            raise KitError(f"line {number}: want 'name version|- [import=a,b]', got {line!r}", key=str(path))
        name = canonicalize_name(fields[0])
        imports = tuple(fields[2].removeprefix("import=").split(",")) if len(fields) == 3 else (module_name(name),)
        packages[name] = NodePackage(name, None if fields[1] == "-" else Version(fields[1]), imports)
    return packages


def module_name(distribution: str) -> str:
    return canonicalize_name(distribution).replace("-", "_")


# --- what the suite imports -------------------------------------------------------------------


def imported_modules(tree: ast.Module) -> list[tuple[str, int, str | None]]:
    """(module, level, imported name) of every import statement that runs: at module level, in
    functions, in try blocks; not those under `if TYPE_CHECKING:`."""
    found: list[tuple[str, int, str | None]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            found.extend((node.module or "", node.level, alias.name) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def local_file(module: str, search: Sequence[Path]) -> Path | None:
    parts = module.split(".")
    for base in search:
        for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
    return None


def import_closure(entry_files: Iterable[Path], root: Path) -> tuple[set[Path], dict[str, set[str]]]:
    """The project files `entry_files` reach through imports, and the third-party top-level modules
    they import (each with the files that import it). A module is local if it is a file under
    `root` or beside an entry script (a script's folder is on sys.path); stdlib ones are dropped."""
    entries = [Path(f).resolve() for f in entry_files]
    search = [root.resolve(), *dict.fromkeys(f.parent for f in entries)]
    seen: set[Path] = set()
    third_party: dict[str, set[str]] = {}
    todo = list(entries)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = path.parent
        if package != root.resolve() and (package / "__init__.py").is_file():  # a package's module runs its __init__
            todo.append(package / "__init__.py")
        for module, level, name in imported_modules(ast.parse(path.read_text(), str(path))):
            if level:  # relative: from the file's package
                base = package
                for _ in range(level - 1):
                    base = base.parent
                module = ".".join([*base.relative_to(root.resolve()).parts, *filter(None, [module])])
            target = local_file(module, search)
            if target is None:
                top = module.split(".")[0]
                if top and top not in sys.stdlib_module_names:
                    third_party.setdefault(top, set()).add(str(path.relative_to(root.resolve())))
                continue
            todo.append(target)
            parts = module.split(".")  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            todo += [p for i in range(1, len(parts)) if (p := local_file(".".join(parts[:i]), search))]
            if name and (sub := local_file(f"{module}.{name}", search)):  # `from pkg import submodule`
                todo.append(sub)
    return seen, third_party


def suite_files(root: Path = ROOT) -> list[Path]:
    """The suite and every file it runs (benchmarks/gpu_suite.py's SUITE_FILES)."""
    spec = importlib.util.spec_from_file_location("gpu_suite", root / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, suite)  # dataclasses look their module up there
    spec.loader.exec_module(suite)
    return [root / name for name in suite.SUITE_FILES]


# --- wheels and how they resolve ----------------------------------------------------------------


def read_wheel(path: Path) -> Wheel:
    name, version, _, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata = HeaderParser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        if f"{dist_info}/top_level.txt" in names:
            imports = archive.read(f"{dist_info}/top_level.txt").decode().split()
        else:
            imports = sorted({n.split("/")[0].removesuffix(".py") for n in names
                              if not n.split("/")[0].endswith((".dist-info", ".data")) and (
                                  "/" in n or n.endswith(".py"))})  # fmt: skip
    requires = tuple(Requirement(r) for r in metadata.get_all("Requires-Dist") or [])
    return Wheel(path, canonicalize_name(name), version, frozenset(tags), tuple(imports), requires)


def runtime_requirements(wheel: Wheel) -> list[Requirement]:
    """The wheel's requirements that apply on the node (no extras, markers for CPython 3.12 Linux)."""
    return [r for r in wheel.requires if r.marker is None or r.marker.evaluate(NODE_ENV)]


def fits_node(wheel: Wheel) -> bool:
    """Installable on CPython 3.12, x86-64 Linux with glibc <= MAX_GLIBC."""
    for tag in wheel.tags:
        if tag.interpreter not in {"py3", "py312", "cp312"} or tag.abi not in {"none", "abi3", "cp312"}:
            continue
        if tag.platform == "any":
            return True
        glibc = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", tag.platform)
        if tag.platform == "manylinux2014_x86_64" or (glibc and tuple(map(int, glibc.groups())) <= MAX_GLIBC):
            return True
    return False


def resolve(wheels: Sequence[Wheel], node: dict[str, NodePackage], needed: Iterable[str]) -> Resolution:
    """Check a kit: `needed` (distributions the suite imports that the node lacks) are carried, every
    requirement of a carried wheel is met by the kit or the node, one version of each, no wheel
    carried that nothing needs, and none that the node has unless a carried wheel's requirement
    excludes the node's version (then `forced` names that requirement)."""
    out = Resolution()
    kit: dict[str, Wheel] = {}
    for wheel in wheels:
        if wheel.name in kit:
            out.problems.append(f"{wheel.name}: two versions carried ({kit[wheel.name].version}, {wheel.version})")
        kit[wheel.name] = wheel
        if not fits_node(wheel):
            out.problems.append(f"{wheel.path.name}: not installable on CPython {PYTHON_TAG} x86-64 Linux")
    reached = {canonicalize_name(n) for n in needed}
    for name in sorted(reached - kit.keys()):
        out.problems.append(f"{name}: the suite imports it, the node lacks it, the kit does not carry it")
    todo = sorted(reached & kit.keys())
    while todo:
        wheel = kit[todo.pop()]
        for requirement in runtime_requirements(wheel):
            name = canonicalize_name(requirement.name)
            text = f"{wheel.name} {wheel.version} requires {requirement}"
            on_node = node.get(name)
            if on_node is not None and name not in kit:
                if on_node.version is None:
                    if str(requirement.specifier):
                        out.check_on_node.append(text)
                elif not requirement.specifier.contains(on_node.version, prereleases=True):
                    out.problems.append(f"{text}: the node has {on_node.version} and the kit carries none")
                continue
            if name not in kit:
                out.problems.append(f"{text}: neither the kit nor the node has it")
                continue
            if not requirement.specifier.contains(kit[name].version, prereleases=True):
                out.problems.append(f"{text}: the kit carries {kit[name].version}")
            if (
                on_node is not None
                and on_node.version is not None
                and not requirement.specifier.contains(on_node.version, prereleases=True)
            ):
                out.forced.setdefault(name, f"{text}; the node has {on_node.version}")
            if name not in reached:
                reached.add(name)
                todo.append(name)
    for name in sorted(kit.keys() - reached):
        out.problems.append(f"{name}: carried, but neither the suite nor a carried wheel needs it")
    for name in sorted((kit.keys() & node.keys()) - out.forced.keys()):
        out.problems.append(f"{name}: the node has it ({node[name].version or 'version not known'}) and no "
                            "carried wheel's requirement excludes that version")  # fmt: skip
    return out


def needed_distributions(
    modules: Iterable[str], node: dict[str, NodePackage], kit_imports: dict[str, str]
) -> tuple[set[str], list[str]]:
    """The carried distributions that provide `modules` not on the node, and the modules that
    neither provides. `kit_imports` maps an import name to the kit distribution that has it."""
    on_node = {module for package in node.values() for module in package.imports}
    needed, unresolved = set(), []
    for module in sorted(modules):
        if module in on_node:
            continue
        if module in kit_imports:
            needed.add(kit_imports[module])
        else:
            unresolved.append(module)
    return needed, unresolved


def check_kit(wheels: Sequence[Wheel], node: dict[str, NodePackage], modules: Iterable[str]) -> Resolution:
    """`resolve` for the suite's third-party `modules`, each of which must be on the node or carried."""
    kit_imports = {module: wheel.name for wheel in wheels for module in wheel.imports}
    needed, unresolved = needed_distributions(modules, node, kit_imports)
    resolution = resolve(wheels, node, needed)
    resolution.problems += [f"import {m}: neither on the node's list nor in a carried wheel" for m in unresolved]
    return resolution


# --- build (here) ---------------------------------------------------------------------------------

log = logging.getLogger("gpu_kit")


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    if process.returncode != 0:
        last = process.stderr.strip().splitlines()[-1] if process.stderr.strip() else f"exit {process.returncode}"
        raise KitError(f"{args[0]} failed: {last}", key="pip")


def fetch_wheels(directory: Path) -> list[Wheel]:
    """One wheel per KIT entry in `directory` (downloaded or built only when missing; others removed)."""
    directory.mkdir(parents=True, exist_ok=True)
    present = {}
    for path in directory.glob("*.whl"):
        name, version, *_ = parse_wheel_filename(path.name)
        if KIT.get(name) == str(version):
            present[name] = path
        else:
            path.unlink()  # another version, or no longer carried
    download = [f"{name}=={version}" for name, version in KIT.items() if name not in present and name not in BUILT_HERE]
    if download:
        log.info("downloading %s", " ".join(download))
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        pip("download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_TAG, "--implementation", "cp",
            "--abi", "cp" + PYTHON_TAG.replace(".", ""), *platforms, "--dest", str(directory), *download)  # fmt: skip
    for name in sorted(BUILT_HERE - present.keys()):
        log.info("building %s==%s (DS_BUILD_OPS=0: no compiled ops)", name, KIT[name])
        pip("wheel", "--no-deps", f"--no-binary={name}", "--wheel-dir", str(directory), f"{name}=={KIT[name]}",
            env={**os.environ, "DS_BUILD_OPS": "0"})  # fmt: skip
    wheels = [read_wheel(path) for path in sorted(directory.glob("*.whl"))]
    got = {w.name: str(w.version) for w in wheels}
    if got != KIT:
        raise KitError(f"wheels {got} differ from the pins {KIT}", key=str(directory))
    return wheels


def git_state() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def build(out: Path) -> Path:
    """The kit in `out`: wheels/, src/ (the suite's files), manifest.json and run.sh."""
    local, third_party = import_closure(suite_files(), ROOT)
    node = read_node_packages()
    wheels = fetch_wheels(out / "wheels")
    resolution = check_kit(wheels, node, third_party)
    roots = needed_distributions(third_party, node, {m: w.name for w in wheels for m in w.imports})[0]
    if resolution.problems:
        raise KitError("the kit does not resolve against the node: " + "; ".join(resolution.problems), key=str(out))
    sources = sorted({p.relative_to(ROOT) for p in local} | {Path(p) for p in EXTRA_SOURCES})
    shutil.rmtree(out / "src", ignore_errors=True)
    for relative in sources:
        (out / "src" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, out / "src" / relative)
    manifest = {
        "built_from": git_state(),
        "python": PYTHON_TAG,
        "platforms": list(PLATFORMS),
        "wheels": {
            w.name: {"version": str(w.version), "file": w.path.name, "bytes": w.path.stat().st_size} for w in wheels
        },
        "forced": resolution.forced,
        "check_on_node": resolution.check_on_node,
        "sources": [str(p) for p in sources],
        "roots": {w.name: list(w.imports) for w in wheels if w.name in roots},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "run.sh").write_text(RUN_SH)
    (out / "run.sh").chmod(0o755)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if size > MAX_KIT_BYTES:
        raise KitError(
            f"{size / 1024**2:.1f} MiB, over the {MAX_KIT_BYTES / 1024**2:.0f} MiB a device run carries", key=str(out)
        )
    log.info("%s: %d wheels, %d source files, %.1f MiB; on the node: %s/run.sh OUT_DIR",
             out, len(wheels), len(sources), size / 1024**2, out)  # fmt: skip
    return out


# --- run (on the node) ----------------------------------------------------------------------------


def unmet_on_node(wheels: Sequence[Wheel], installed: dict[str, Version]) -> list[str]:
    """Requirements of the carried wheels that the node's installed versions do not meet."""
    kit = {w.name for w in wheels}
    unmet = []
    for wheel in wheels:
        for requirement in runtime_requirements(wheel):
            name = canonicalize_name(requirement.name)
            if name in kit:
                continue
            if name not in installed:
                unmet.append(f"{wheel.name} {wheel.version} requires {requirement}: not installed")
            elif not requirement.specifier.contains(installed[name], prereleases=True):
                unmet.append(f"{wheel.name} {wheel.version} requires {requirement}: the node has {installed[name]}")
    return unmet


def installed_versions(path: Sequence[str]) -> dict[str, tuple[Version, str]]:
    """Every distribution on `path`, first one wins as for imports: version and folder."""
    found: dict[str, tuple[Version, str]] = {}
    for dist in importlib.metadata.distributions(path=list(path)):
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in found:
            found[name] = (Version(dist.version), str(dist.locate_file("")))
    return found


def broken_roots(target: Path, roots: dict[str, list[str]]) -> dict[str, str]:
    """The carried distributions the suite needs whose modules fail to import from `target` on this
    Python (e.g. a requirement the node's versions miss), each with its error."""
    probe = ("import importlib, json, sys\nfailed = {}\n"
             "for name, modules in json.loads(sys.argv[1]).items():\n"
             "    try:\n        [importlib.import_module(m) for m in modules]\n"
             "    except Exception as err:\n        failed[name] = f'{type(err).__name__}: {err}'\n"
             "print(json.dumps(failed))\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run([sys.executable, "-c", probe, json.dumps(roots)], capture_output=True, text=True, env=env)
    return (
        json.loads(process.stdout.strip().splitlines()[-1])
        if process.returncode == 0
        else {"(probe)": process.stderr[-500:]}
    )


def remove_distribution(target: Path, name: str) -> None:
    dist = next(
        d for d in importlib.metadata.distributions(path=[str(target)]) if canonicalize_name(d.metadata["Name"]) == name
    )
    for top in {Path(file).parts[0] for file in dist.files or []} - {".."}:  # its packages, dist-info, scripts
        path = target / top
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def run(kit: Path, out: Path, budget_s: float, smoke: bool) -> int:
    started = time.monotonic()
    manifest = json.loads((kit / "manifest.json").read_text())
    wheels = [read_wheel(kit / "wheels" / entry["file"]) for entry in manifest["wheels"].values()]
    supported = set(sys_tags())
    for wheel in wheels:
        if not wheel.tags & supported:
            raise KitError(f"{wheel.path.name} does not install on Python {sys.version.split()[0]} here; the kit is "
                            f"for CPython {manifest['python']} on x86-64 Linux (set PYTHON)", key="python")  # fmt: skip
    print(f"monte-ds GPU kit built from {manifest['built_from']}", flush=True)
    for name, why in manifest["forced"].items():
        print(f"carried although the node has {name}: {why}", flush=True)
    target = Path(tempfile.mkdtemp(prefix="monte-ds-gpu-kit-"))
    suite: subprocess.Popen | None = None
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        pip("install", "--no-index", "--no-deps", "--quiet", "--target", str(target), *(str(w.path) for w in wheels))
        for name, error in broken_roots(target, manifest["roots"]).items():
            print(
                f"WARNING: {name} from the kit does not import ({error}); removed, so that nothing imports it "
                "half-working (accelerate imports an installed deepspeed on every save_pretrained)",
                flush=True,
            )
            remove_distribution(target, name)
        installed = installed_versions([str(target), *sys.path])
        kit_names = {w.name for w in wheels}
        for name in ("torch", "transformers", "peft", "accelerate", *sorted(kit_names)):
            version, where = installed.get(name, (None, ""))
            source = "kit" if where.startswith(str(target)) else "node"
            print(f"  {name:<18} {str(version or 'NOT INSTALLED'):<16} ({source if version else '-'})", flush=True)
        unmet = unmet_on_node(
            wheels, {name: version for name, (version, _) in installed.items() if name not in kit_names}
        )
        for line in unmet:
            print(f"WARNING: {line}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        spent = time.monotonic() - started
        (out / "kit.json").write_text(json.dumps({
            "built_from": manifest["built_from"], "install_seconds": spent, "forced": manifest["forced"],
            "unmet_requirements": unmet,
            "versions": {name: str(installed[name][0]) for name in sorted(installed)},
        }, indent=2) + "\n")  # fmt: skip
        left = budget_s - spent - SUITE_START_RESERVE_S
        if left <= 0:
            raise KitError(
                f"{budget_s:g} s leaves nothing for the suite after {spent:.0f} s of installs", key="--budget-s"
            )
        print(f"installed in {spent:.0f} s; the suite gets {left:.0f} s", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(kit / "src"), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1"}  # fmt: skip
        command = [sys.executable, str(kit / "src" / "benchmarks" / "gpu_suite.py"), "--out", str(out.resolve()),
                   "--budget-s", f"{left:.0f}", *(["--smoke"] if smoke else [])]  # fmt: skip
        suite = subprocess.Popen(command, cwd=kit / "src", env=env)
        return suite.wait()
    finally:
        if suite is not None and suite.poll() is None:  # we were stopped: the suite stops its step
            suite.terminate()
            try:
                suite.wait(timeout=15)
            except subprocess.TimeoutExpired:
                suite.kill()
        shutil.rmtree(target, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_kit.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build the kit (here, with PyPI)")
    build_parser.add_argument("--out", type=Path, default=ROOT / ".gpu-kit")
    run_parser = commands.add_parser("run", help="install the kit and run the suite (on the node; run.sh calls this)")
    run_parser.add_argument("--kit", type=Path, required=True)
    run_parser.add_argument("out_dir", type=Path, help="folder for suite.json, suite.md, kit.json")
    run_parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="the whole run, installs included")
    run_parser.add_argument("--smoke", action="store_true", help="the suite at tiny sizes on CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build":
        build(args.out.resolve())
        return 0
    if args.budget_s <= 0:
        raise KitError(f"must be > 0 seconds, got {args.budget_s:g}", key="--budget-s")
    if not (args.kit / "manifest.json").is_file():
        raise KitError("no manifest.json: not a kit made by `make gpu-kit`", key=str(args.kit))
    return run(args.kit.resolve(), args.out_dir, args.budget_s, args.smoke)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KitError as err:
        print(f"monte-ds: error: {err}", file=sys.stderr)
        sys.exit(2)
