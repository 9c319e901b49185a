"""docker/: the image's versions agree with pyproject.toml, and the files are well formed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import require

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
BASE_IMAGE = re.compile(r"^FROM\s+pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)-cudnn\d+-devel\s*$", re.M)


def _pyproject_requirements() -> dict[str, Requirement]:
    # Python 3.10 has no tomllib; the test extras install tomli there.
    tomllib = require("tomllib" if sys.version_info >= (3, 11) else "tomli")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    return {r.name.lower(): r for r in reqs}


def _dockerfile_pins(text: str) -> dict[str, str]:
    """``ARG DEEPSPEED_VERSION=0.19.8`` -> ``{"deepspeed": "0.19.8"}``."""
    return {name.lower().replace("_", "-"): version for name, version in re.findall(r"^ARG\s+(\w+)_VERSION=(\S+)\s*$", text, re.M)}


def test_base_image_is_a_pinned_cuda_pytorch_that_pyproject_and_constraints_allow():
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) == 1, f"expected one FROM, got {froms}"
    match = BASE_IMAGE.search(text)
    assert match, f"FROM {froms[0]} is not a pinned pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-devel tag"
    torch_version = match["torch"]
    reqs = _pyproject_requirements()
    assert reqs["torch"].specifier.contains(torch_version), f"image torch {torch_version} outside pyproject {reqs['torch']}"
    pinned = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned, "constraints.txt pins no torch"
    assert Version(pinned[1]) == Version(torch_version), (
        f"image torch {torch_version} != constraints.txt torch {pinned[1]}: the CPU tests and the image would differ")
    assert Version(match["cuda"]) >= Version("12.0"), "H100s need CUDA >= 12"


def test_pip_pins_lie_inside_pyproject_ranges_and_are_installed():
    text = DOCKERFILE.read_text()
    pins = _dockerfile_pins(text)
    reqs = _pyproject_requirements()
    for must in ("deepspeed", "transformers"):
        assert must in pins, f"the Dockerfile does not pin {must} (ARG {must.upper()}_VERSION=...)"
    for name, version in pins.items():
        assert name in reqs, f"the Dockerfile pins {name}, which pyproject.toml does not depend on"
        assert reqs[name].specifier.contains(version), f"{name}=={version} outside pyproject's {reqs[name]}"
        arg = name.upper().replace("-", "_") + "_VERSION"
        assert f'"{name}==${{{arg}}}"' in text, f"ARG {arg} is declared but no pip install uses it"


def test_package_installs_with_the_image_torch_pinned_and_entrypoint_is_wired():
    text = DOCKERFILE.read_text()
    assert re.search(r"torch\.__version__.*>\s*(\S+constraint\S*)", text), "the image's torch is not written to a constraints file"
    installs = re.findall(r"pip install[^\n]*-c\s+(\S+)[^\n]*\s\.\s*$", text, re.M)
    assert installs, "no `pip install -c <constraints> .` of the package"
    assert re.search(r"apt-get install[^\n]*\bopenmpi-bin\b[^\n]*\blibopenmpi-dev\b", text), "Open MPI is not installed"
    assert "COPY docker/entrypoint.sh /usr/local/bin/entrypoint.sh" in text
    assert re.search(r'^ENTRYPOINT \["/usr/local/bin/entrypoint.sh"\]', text, re.M)
    for path in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for src in path.split():
            assert (ROOT / src).exists(), f"COPY source {src} does not exist in the project"


def test_entrypoint_script_is_executable_valid_bash_and_passes_commands_through(tmp_path):
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh is not executable"
    text = ENTRYPOINT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    out = subprocess.run([str(ENTRYPOINT), "python", "-c", "import sys; print(sys.argv[1:])", "a b"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['a b']"
    # The .yaml shorthand runs deepspeed; a stub on PATH records the arguments it got.
    stub = tmp_path / "deepspeed"
    stub.write_text('#!/usr/bin/env bash\necho "deepspeed $*"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run([str(ENTRYPOINT), "configs/qwen32b.yaml", "--set", "train.max_steps=1"],
                         capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "deepspeed launch/train.py --config configs/qwen32b.yaml --set train.max_steps=1"


def test_hadolint_is_clean():
    result = subprocess.run([require("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


SHELL_SHEBANGS = ("#!/bin/bash", "#!/usr/bin/env bash", "#!/bin/sh", "#!/usr/bin/env sh")


def shell_scripts() -> list[Path]:
    """Every shell script of the project: *.sh, *.sbatch and files with a shell shebang."""
    found = []
    for folder in (".ci", "benchmarks", "docker", "launch", "tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.suffix in (".sh", ".sbatch"):
                found.append(path)
            elif not path.suffix:
                with path.open("rb") as f:
                    if f.readline().decode(errors="replace").strip() in SHELL_SHEBANGS:
                        found.append(path)
    return found


def test_every_shell_script_is_found():
    names = {str(p.relative_to(ROOT)) for p in shell_scripts()}
    assert {".ci/run", "docker/entrypoint.sh", "launch/slurm/train.sbatch", "benchmarks/gpu_step.sh",
            "tests/system_deps.sh"} <= names, sorted(names)


def test_shellcheck_is_clean():
    scripts = [str(p) for p in shell_scripts()]
    result = subprocess.run([require("shellcheck"), "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
