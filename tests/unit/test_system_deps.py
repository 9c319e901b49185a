"""tests/system_deps.sh: what `make test` installs before pytest, on machines with and without
root, apt-get or the programs (simulated with stub programs on an otherwise empty PATH)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "system_deps.sh"
ALL_PACKAGES = "openmpi-bin libopenmpi-dev slurmctld slurmd slurm-client munge"


def run_script(tmp_path: Path, *, present: tuple[str, ...] = (), uid: int = 0, apt: bool = True,
               ci: bool = False) -> subprocess.CompletedProcess:
    """The script with ``--dry-run`` on a PATH holding only stubs: ``id`` (printing ``uid``),
    ``apt-get`` (if ``apt``) and the programs in ``present``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = {"id": f"echo {uid}", **({"apt-get": "exit 0"} if apt else {}), **{p: "exit 0" for p in present}}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": str(bin_dir), "SYSTEM_DEPS_SBIN": str(tmp_path / "no-sbin"), "HOME": str(tmp_path)}
    if ci:
        env["CI"] = "true"
    return subprocess.run([shutil.which("bash"), str(SCRIPT), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=30)


def test_everything_missing_as_root_installs_every_package(tmp_path):
    proc = run_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"apt-get install -y -qq --no-install-recommends {ALL_PACKAGES}\n" in proc.stdout
    assert "apt-get update -qq\n" in proc.stdout


def test_only_the_missing_programs_packages_are_installed(tmp_path):
    proc = run_script(tmp_path, present=("mpirun", "munged"))
    assert proc.returncode == 0, proc.stderr
    assert "apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client\n" in proc.stdout
    assert "openmpi" not in proc.stdout and "munge\n" not in proc.stdout


def test_nothing_to_do_when_everything_is_present(tmp_path):
    proc = run_script(tmp_path, present=("mpirun", "slurmctld", "slurmd", "sbatch", "munged"), uid=1000, apt=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "system_deps: Open MPI, SLURM and munge are installed\n"


@pytest.mark.parametrize(("uid", "apt", "why"), [(1000, True, "not root"), (0, False, "no apt-get on this machine")])
def test_without_root_or_apt_it_names_what_is_missing_and_lets_the_tests_skip(tmp_path, uid, apt, why):
    proc = run_script(tmp_path, present=("slurmctld", "slurmd", "sbatch", "munged"), uid=uid, apt=apt, ci=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"system_deps: missing mpirun ({why}, so not installed: as root, apt-get install "
                                  "openmpi-bin libopenmpi-dev);")
    assert "apt-get update" not in proc.stdout


def test_make_test_installs_before_pytest_and_ci_runs_make_test():
    make = shutil.which("make")
    assert make, "make is not installed"
    # -n prints the recipe without running it; the venv stamp is taken as up to date (-o).
    plan = subprocess.run([make, "-n", "-o", ".venv/.installed", "test"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "MAKEFLAGS": ""})
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    deps = lines.index("bash tests/system_deps.sh")
    pytest_line = next(i for i, line in enumerate(lines) if "-m pytest tests" in line)
    assert deps < pytest_line, lines
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().endswith("\nmake test") and "apt-get" not in ci


def test_require_skips_locally_and_fails_under_ci(monkeypatch):
    from tests.helpers import require

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_tool_xyz is not installed"):
        require("no_such_tool_xyz")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no_such_tool_xyz is not installed.*CI=true"):
        require("no_such_tool_xyz")
    with pytest.raises(pytest.fail.Exception, match="mpirun is not installed; as root: bash tests/system_deps.sh"):
        monkeypatch.setenv("PATH", "")
        monkeypatch.setattr("tests.helpers.SBIN", ())
        require("mpirun")
    monkeypatch.undo()
    # Present: a module comes back imported, a program as its path.
    assert require("json").dumps([1]) == "[1]"
    assert require("bash") == shutil.which("bash")
