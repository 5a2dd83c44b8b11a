"""Every example in the README runs as written, on the example dataset.

The ```bash blocks run first, line by line, as a shell would (they write the example dataset and run
the pipeline on it, as ``make demo`` does), then the ```python blocks in order, in the same folder.
```sh blocks are installation steps (make, pip) and are not run here.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_runnable_examples():
    assert len(_blocks("python")) >= 2 and len(_blocks("bash")) >= 1


@pytest.mark.slow
def test_every_readme_example_runs(tmp_path, monkeypatch, dask_client):
    bin_dir = pathlib.Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "GMFX_SCHEDULER": dask_client.scheduler.address,  # one cluster for every command (no start-up each)
    }
    env.pop("GMFX_OUT", None)
    for block in _blocks("bash"):
        for line in block.splitlines():
            command = line.split(" #")[0].strip()
            if not command:
                continue
            result = subprocess.run(
                ["bash", "-c", f"set -e; {command} --no-progress" if _takes_dataset(command) else command],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    monkeypatch.chdir(tmp_path)
    for block in _blocks("python"):
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def _takes_dataset(command: str) -> bool:
    """Commands with the shared dataset options: progress bars are switched off in the test's log."""
    words = shlex.split(command)
    return words[0] == "gmfx_recon" or (words[0] == "gmfx" and words[1] not in {"example", "models"})
