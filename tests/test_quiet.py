"""``gmfx`` is quiet by default (progress bars, warnings that matter, the summary) and says everything with ``--verbose``."""

import os
import pathlib
import subprocess
import sys

import pytest

from gmfx._logs import filtered_child_stderr

NOISE = [
    "W0000 00:00:1795302964.138470   26550 inference_feedback_manager.cc:114] Feedback manager requires a model",
    "I0000 00:00:1795302964.1   7 gl_context.cc:357] GL version: 3.2",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
]
KEPT = ["E0000 00:00:1795302964.2   9 calculator_graph.cc:887] a real error", "Traceback: from a worker"]


def _child_writes(lines: list[str]) -> None:
    code = "import sys; sys.stderr.write(sys.argv[1]); import warnings; from google.protobuf import symbol_database"
    subprocess.run([sys.executable, "-c", code, "".join(line + "\n" for line in lines)], check=True)


@pytest.mark.parametrize("verbose", [False, True])
def test_child_stderr_drops_native_noise_unless_verbose(capfd, verbose):
    with filtered_child_stderr(verbose) as started:
        _child_writes([NOISE[0], KEPT[0], *NOISE[1:], KEPT[1]])
        started()
        print("parent after start", file=sys.stderr, flush=True)
    err = capfd.readouterr().err.splitlines()
    assert err[-1] == "parent after start"
    assert err[:-1] == ([NOISE[0], KEPT[0], *NOISE[1:], KEPT[1]] if verbose else KEPT)


def test_children_started_later_write_directly(capfd):
    with filtered_child_stderr(False) as started:
        started()
        _child_writes(NOISE[:1])
    assert capfd.readouterr().err.splitlines() == NOISE[:1]


@pytest.mark.slow
def test_gmfx_run_prints_progress_and_summary_only(tmp_path):
    bin_dir = pathlib.Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "120"}
    for name in ("GMFX_SCHEDULER", "GMFX_OUT", "PYTHONWARNINGS"):
        env.pop(name, None)

    def gmfx(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(["gmfx", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    gmfx("example", "ex")
    quiet = gmfx("run", "ex", "--workers", "1")
    assert "time per stage" in quiet.stdout and "sub-01_task-faces_epochs.zarr" in quiet.stdout
    stages = ["decode", "recon", "preproc (align, interpolate)", "preproc (filter)", "epochs"]
    bars = [line for line in quiet.stderr.splitlines() if line.split("━")[0].strip() in stages]
    assert len(bars) >= len(stages)
    for line in quiet.stderr.splitlines():  # a shared machine may add real warnings (a busy dashboard port, a slow worker)
        assert not line.startswith(("INFO", "W0000", "I0000")), quiet.stderr
        assert "absl::InitializeLog" not in line and "TensorFlow Lite" not in line and "GetPrototype" not in line, quiet.stderr
    verbose = gmfx("run", "ex", "--workers", "1", "--verbose")  # everything done: resumes, nothing to compute
    assert "INFO distributed.scheduler" in verbose.stderr
