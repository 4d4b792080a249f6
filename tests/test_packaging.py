"""`pip install .` (not editable) into a fresh venv: the console scripts and the YAML tree work from
any directory. Marked slow; CI runs it."""
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_runs_from_another_directory(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # Reuse this environment's dependencies (torch & co., and pip and setuptools to build with) rather
    # than installing gigabytes again; the package itself is built from the source tree, offline.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(REPO)],
                   check=True, cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import resnet_train.configs as c; print(c.__file__)"],
                           check=True, capture_output=True, text=True, cwd=elsewhere).stdout
    assert where.startswith(str(site)), where  # the installed copy, not the source tree
    assert (site / "resnet_train" / "configs" / "model" / "resnet18.yaml").is_file()

    help_text = subprocess.run([venv / "bin" / "resnet-train", "--help"], check=True, capture_output=True,
                               text=True, cwd=elsewhere).stdout
    assert "model: resnet101, resnet110, resnet152, resnet18" in help_text and "experiment:" in help_text
    for name in ("resnet-eval", "resnet-export", "resnet-predict"):
        assert "checkpoint=PATH" in subprocess.run([venv / "bin" / name, "--help"], check=True,
                                                   capture_output=True, text=True, cwd=elsewhere).stdout, name
    assert (site / "resnet_train" / "configs" / "augment" / "trivialaugment.yaml").is_file()
    assert (site / "resnet_train" / "data" / "policies.py").is_file()
    assert (site / "resnet_train" / "export" / "parity.py").is_file()
    module = subprocess.run([python, "-m", "resnet_train", "epochs=0"], capture_output=True, text=True, cwd=elsewhere)
    assert module.returncode == 2 and "epochs=0 is invalid" in module.stderr
