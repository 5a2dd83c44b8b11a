import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gmfx.cli import app

runner = CliRunner()


def test_help_lists_commands_with_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("decode", "recon", "run", "example", "models"):
        assert command in result.output
    decode_help = runner.invoke(app, ["decode", "--help"]).output
    assert "gmfx decode /data/study -p 01 -p 02 --task mini" in decode_help
    assert "--participant-label" in decode_help and "--storage-option" in decode_help


def test_missing_input_folder_exits_non_zero_with_the_reason(tmp_path):
    result = runner.invoke(app, ["decode", str(tmp_path / "missing"), "--no-progress"])
    assert result.exit_code == 1
    assert "error: the input dataset folder does not exist" in result.output
    assert str(tmp_path / "missing") in result.output and "how to fix" in result.output


def test_path_in_participant_label_is_refused(tmp_path):
    result = runner.invoke(app, ["decode", str(tmp_path), "-p", "../../etc"])
    assert result.exit_code == 1 and "path separator or '..'" in result.output


def test_unknown_participant_lists_the_existing_ones(tmp_path):
    from gmfx._example import write_example_dataset

    write_example_dataset(tmp_path / "ds")
    result = runner.invoke(app, ["decode", str(tmp_path / "ds"), "-p", "02"])
    assert result.exit_code == 1 and "sub-02 has no recording" in result.output and "sub-01" in result.output


def test_malformed_storage_option(tmp_path):
    result = runner.invoke(app, ["decode", str(tmp_path), "-s", "anon"])
    assert result.exit_code == 1 and "KEY=VALUE" in result.output


def test_secret_storage_options_are_redacted_from_errors(s3_endpoint):
    result = runner.invoke(
        app,
        ["decode", "s3://no-such-bucket/study", "-s", "key=AKIDEXAMPLE1", "-s", "secret=very-secret-value",
         "-s", f"client_kwargs.endpoint_url={s3_endpoint}"],
    )
    assert result.exit_code == 1
    assert "very-secret-value" not in result.output and "AKIDEXAMPLE1" not in result.output
    assert "s3://no-such-bucket/study" in result.output


def test_example_dataset_is_written(tmp_path):
    result = runner.invoke(app, ["example", str(tmp_path / "demo")])
    assert result.exit_code == 0
    files = sorted(p.name for p in (tmp_path / "demo" / "sub-01").iterdir())
    assert files == ["sub-01_task-faces_events.tsv", "sub-01_task-faces_frametimes.tsv", "sub-01_task-faces_video.mp4"]


@pytest.mark.parametrize("script", ["gmfx_decode", "gmfx_recon"])
def test_original_tool_names_are_installed(script):
    executable = subprocess.run([sys.executable, "-c", "import shutil,sys; print(shutil.which(sys.argv[1]) or '')", script],
                                capture_output=True, text=True).stdout.strip()
    bindir = __import__("pathlib").Path(sys.executable).parent
    path = executable or str(bindir / script)
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--participant-label" in result.stdout
