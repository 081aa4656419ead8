"""scripts/gpu_kit.py: the air-gapped GPU node's kit is complete. Always (no network): every module
the GPU suite imports resolves to the node's package list or to a pinned kit distribution, and
the import walk and the resolution rules do what they say on small trees and wheels made here.
When `make gpu-kit` has built .gpu-kit/: its wheels' metadata resolves against the node's list
(no requirement unmet, none duplicating a node package unless a carried wheel forces it), one
version each, within 60 MiB, with the suite's files beside them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_kit.py"
BUILT = ROOT / ".gpu-kit"


@pytest.fixture(scope="module")
def kit():
    spec = importlib.util.spec_from_file_location("gpu_kit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_kit", module)
    spec.loader.exec_module(module)
    return module


def make_wheel(directory: Path, name: str, version: str, requires=(), tag="py3-none-any", modules=None) -> Path:
    """A minimal real wheel: METADATA with Requires-Dist lines and one module per import name."""
    stem = f"{name.replace('-', '_')}-{version}"
    path = directory / f"{stem}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        metadata = [
            "Metadata-Version: 2.1",
            f"Name: {name}",
            f"Version: {version}",
            *(f"Requires-Dist: {r}" for r in requires),
        ]
        archive.writestr(f"{stem}.dist-info/METADATA", "\n".join(metadata) + "\n")
        for module in modules or [name.replace("-", "_")]:
            archive.writestr(f"{module}/__init__.py", "")
    return path


def node(kit, **versions: str | None):
    return {
        name: kit.NodePackage(name, None if v is None else Version(v), (name.replace("-", "_"),))
        for name, v in versions.items()
    }


def test_every_module_the_suite_imports_is_on_the_node_or_pinned_in_the_kit(kit):
    local, third_party = kit.import_closure(kit.suite_files(), ROOT)
    assert {"torch", "transformers", "peft", "pytest", "bitsandbytes", "deepspeed"} <= third_party.keys()
    assert {"benchmarks/overhead_worker.py", "tests/__init__.py", "monte_ds/monteclora/engine.py"} <= {
        p.relative_to(ROOT).as_posix() for p in local
    }  # a script's sibling, a test package's __init__, a package reached through monte_ds/__init__
    pinned = {kit.module_name(name): name for name in kit.KIT}
    needed, unresolved = kit.needed_distributions(third_party, kit.read_node_packages(), pinned)
    assert unresolved == [], {m: sorted(third_party[m]) for m in unresolved}
    assert needed == {"bitsandbytes", "deepspeed", "jsonschema"}


def test_the_node_list_parses_with_versions_and_import_names(kit, tmp_path):
    packages = kit.read_node_packages()
    assert packages["torch"].version == Version("2.11+cu130") and packages["transformers"].version == Version("5.17")
    assert packages["peft"].version is None and packages["pyyaml"].imports == ("yaml",)
    bad = tmp_path / "node.txt"
    bad.write_text("torch 2.11\nnumpy 1 2 3\n")
    with pytest.raises(kit.KitError, match="line 2: want 'name version"):
        kit.read_node_packages(bad)


def test_the_import_walk_follows_what_runs_and_nothing_else(kit, tmp_path):
    files = {
        "pkg/__init__.py": "import alpha\nfrom . import sub\n",
        "pkg/sub.py": "from .deep import thing\n\ndef later():\n    import beta.inner\n",
        "pkg/deep.py": "import os, json\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import gamma\n"
                       "try:\n    import delta\nexcept ImportError:\n    delta = None\nthing = 1\n",
        "bin/script.py": "import helper\nfrom pkg.sub import later\n",
        "bin/helper.py": "from __future__ import annotations\nimport epsilon\n",
        "unused.py": "import zeta\n",
    }  # fmt: skip
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    local, third_party = kit.import_closure([tmp_path / "bin" / "script.py"], tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in local} == set(files) - {"unused.py"}
    assert set(third_party) == {"alpha", "beta", "delta", "epsilon"}  # not TYPE_CHECKING's, not stdlib
    assert third_party["beta"] == {"pkg/sub.py"}


def test_a_node_package_is_carried_only_when_a_carried_wheels_requirement_excludes_the_nodes_version(kit, tmp_path):
    datasets = kit.read_wheel(make_wheel(tmp_path, "datasets", "5.2.0", ["pyarrow>=24.0.0", 'tzdata; sys_platform == "win32"',
                                                                         'pytest; extra == "tests"']))  # fmt: skip
    pyarrow = kit.read_wheel(make_wheel(tmp_path, "pyarrow", "26.0.1", tag="cp312-cp312-manylinux_2_28_x86_64"))
    forced = kit.resolve([datasets, pyarrow], node(kit, pyarrow="23.0"), needed={"datasets"})
    assert forced.problems == []
    assert forced.forced == {"pyarrow": "datasets 5.2.0 requires pyarrow>=24.0.0; the node has 23.0"}
    duplicate = kit.resolve([datasets, pyarrow], node(kit, pyarrow="26.0"), needed={"datasets"})
    assert duplicate.problems == [
        "pyarrow: the node has it (26.0) and no carried wheel's requirement excludes that version"
    ]
    unknown = kit.resolve([datasets, pyarrow], node(kit, pyarrow=None), needed={"datasets"})
    assert unknown.problems == [
        "pyarrow: the node has it (version not known) and no carried wheel's requirement excludes that version"
    ]
    left_to_the_node = kit.resolve([datasets], node(kit, pyarrow=None), needed={"datasets"})
    assert left_to_the_node.problems == [] and left_to_the_node.check_on_node == [
        "datasets 5.2.0 requires pyarrow>=24.0.0"
    ]
    too_old = kit.resolve([datasets], node(kit, pyarrow="23.0"), needed={"datasets"})
    assert too_old.problems == ["datasets 5.2.0 requires pyarrow>=24.0.0: the node has 23.0 and the kit carries none"]


def test_the_resolution_names_every_gap_in_a_kit(kit, tmp_path):
    trl = kit.read_wheel(make_wheel(tmp_path, "trl", "1.16.0", ["transformers>=4.56.2", "dill<0.4.2", "xxhash"]))
    dill = kit.read_wheel(make_wheel(tmp_path, "dill", "0.5.0"))
    stray = kit.read_wheel(make_wheel(tmp_path, "stray", "1.0"))
    old_abi = kit.read_wheel(make_wheel(tmp_path, "oldabi", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64"))
    new_glibc = kit.read_wheel(make_wheel(tmp_path, "newglibc", "1.0", tag="cp312-cp312-manylinux_2_34_x86_64"))
    result = kit.resolve(
        [trl, dill, stray, old_abi, new_glibc],
        node(kit, transformers="5.17"),
        needed={"trl", "oldabi", "newglibc", "bnb"},
    )
    assert sorted(result.problems) == sorted([
        "oldabi-1.0-cp311-cp311-manylinux_2_17_x86_64.whl: not installable on CPython 3.12 x86-64 Linux",
        "newglibc-1.0-cp312-cp312-manylinux_2_34_x86_64.whl: not installable on CPython 3.12 x86-64 Linux",
        "bnb: the suite imports it, the node lacks it, the kit does not carry it",
        "trl 1.16.0 requires dill<0.4.2: the kit carries 0.5.0",
        "trl 1.16.0 requires xxhash: neither the kit nor the node has it",
        "stray: carried, but neither the suite nor a carried wheel needs it",
    ])  # fmt: skip
    assert result.forced == {} and result.check_on_node == []  # transformers 5.17 meets >=4.56.2
    again = kit.read_wheel(make_wheel(tmp_path, "dill", "0.4.1", tag="py2.py3-none-any"))
    assert "dill: two versions carried (0.5.0, 0.4.1)" in kit.resolve([trl, dill, again], {}, needed={"trl"}).problems


def test_a_module_resolves_through_the_import_names_a_wheel_provides(kit, tmp_path):
    cpuinfo = kit.read_wheel(make_wheel(tmp_path, "py-cpuinfo", "9.0.0", modules=["cpuinfo"]))
    assert cpuinfo.imports == ("cpuinfo",)
    result = kit.check_kit([cpuinfo], node(kit, torch="2.11"), ["cpuinfo", "torch", "nowhere"])
    assert result.problems == ["import nowhere: neither on the node's list nor in a carried wheel"]


def test_run_tells_which_requirements_the_nodes_installed_versions_miss(kit, tmp_path):
    bnb = kit.read_wheel(
        make_wheel(tmp_path, "bitsandbytes", "0.50.2", ["torch<3,>=2.4", "numpy>=1.17", "packaging>=20.9"])
    )
    unmet = kit.unmet_on_node([bnb], {"torch": Version("2.11+cu130"), "numpy": Version("1.16")})
    assert unmet == ["bitsandbytes 0.50.2 requires numpy>=1.17: the node has 1.16",
                     "bitsandbytes 0.50.2 requires packaging>=20.9: not installed"]  # fmt: skip


def test_run_refuses_a_python_the_wheels_do_not_install_on_in_one_line(tmp_path):
    (tmp_path / "wheels").mkdir()
    wheel = make_wheel(tmp_path / "wheels", "native", "1.0", tag="cp27-cp27mu-manylinux1_x86_64")
    (tmp_path / "manifest.json").write_text(
        f'{{"built_from": "test", "python": "2.7", "forced": {{}}, "wheels": {{"native": {{"file": "{wheel.name}"}}}}}}'
    )
    process = subprocess.run([sys.executable, str(SCRIPT), "run", "--kit", str(tmp_path), str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [
        f"monte-ds: error: python: {wheel.name} does not install on Python {sys.version.split()[0]} here; "
        "the kit is for CPython 2.7 on x86-64 Linux (set PYTHON)"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(
    not (BUILT / "manifest.json").is_file(), reason="no .gpu-kit/: `make gpu-kit` builds it (needs PyPI)"
)
def test_the_built_kit_resolves_against_the_node_and_fits_a_device_run(kit):
    wheels = [kit.read_wheel(path) for path in sorted((BUILT / "wheels").glob("*.whl"))]
    assert {w.name: str(w.version) for w in wheels} == kit.KIT  # one version of each pin, nothing else
    local, third_party = kit.import_closure(kit.suite_files(), ROOT)
    resolution = kit.check_kit(wheels, kit.read_node_packages(), third_party)
    assert resolution.problems == []
    size = sum(p.stat().st_size for p in BUILT.rglob("*") if p.is_file())
    assert size <= kit.MAX_KIT_BYTES
    missing = [p.relative_to(ROOT) for p in local if not (BUILT / "src" / p.relative_to(ROOT)).is_file()]
    assert missing == [], "the kit predates these imports: rebuild it with `make gpu-kit`"
    assert (BUILT / "src" / "scripts" / "gpu_kit.py").is_file() and (BUILT / "run.sh").stat().st_mode & 0o111
