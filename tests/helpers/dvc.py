"""Running DVC on a copy of the project."""

from __future__ import annotations

import subprocess


def dvc(root, *args):
    result = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]
