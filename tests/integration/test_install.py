"""A plain ``pip install .`` (no extras) is enough to train: every runtime dependency is declared.

The test extras pull in packages (accelerate, peft) that the runtime also needs or that
would hide a missing declaration, so the suite's own venv cannot show this.
"""

from __future__ import annotations

import subprocess
import venv

import pytest

from tests.helpers import ROOT, proc_env, step_metrics

pytestmark = pytest.mark.slow


def test_plain_install_trains_two_steps(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt")]
    for args in (["torch==2.13.0"], [str(ROOT)]):
        proc = subprocess.run(pip + args, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-4000:]
    extras = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    assert "peft==" not in extras and "pytest==" not in extras  # no test extras crept in
    out = tmp_path / "run"
    # -P: the checkout (the working directory, for the config's relative paths) is not put on
    # sys.path, so the installed package is what runs.
    code = ("import sys; from dude_dist.config_loader import load_config; from dude_dist.trainer import main; "
            "print('package:', __import__('dude_dist').__file__); "
            "main(load_config('configs/tiny_cpu.yaml', sys.argv[1:]), resume='none')")
    proc = subprocess.run([py, "-P", "-c", code, f"output_dir={out}", "train.max_steps=2", "train.save_every=0"],
                          cwd=ROOT, env=proc_env(PYTHONPATH=""), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"package: {env_dir}" in proc.stdout, proc.stdout
    assert sorted(step_metrics(out)) == [1, 2]
