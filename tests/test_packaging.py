"""conf/ ships inside the wheel: a plain (non-editable) install composes from anywhere."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_built_wheel_runs_from_outside_the_checkout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("runner-*.whl")
    import zipfile

    shipped = {name.split("runner/conf/", 1)[1] for name in zipfile.ZipFile(wheel).namelist() if name.startswith("runner/conf/") and name.endswith(".yaml")}
    expected = {path.relative_to(ROOT / "conf").as_posix() for path in (ROOT / "conf").rglob("*.yaml")}
    assert shipped == expected, sorted(expected - shipped)
    assert "runner/examples/quickstart.ipynb" in zipfile.ZipFile(wheel).namelist()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # the dependencies come from this environment's site-packages (a plain path entry, so
    # its editable install of runner is not activated); runner itself only from the wheel
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import runner, runner.conf; print(runner.__file__); print(runner.conf.__file__)"],
        cwd=elsewhere, check=True, capture_output=True, text=True,
    ).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where
    composed = subprocess.run(
        [str(python), "-m", "runner", "--cfg", "job", "model=resnet", "loss=focal"],
        cwd=elsewhere, capture_output=True, text=True, timeout=120,
    )
    assert composed.returncode == 0, composed.stderr
    assert "_target_: runner.models.ResNet" in composed.stdout
    assert "_target_: runner.losses.FocalLoss" in composed.stdout
    assert "trainer:" in composed.stdout and "max_epochs: 10" in composed.stdout
