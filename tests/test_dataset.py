import pathlib

import pytest

from gmfx import DatasetError, Location, find_recordings
from gmfx.dataset import normalize_participant_label


def _touch(root: pathlib.Path, relative: str, content: bytes = b"x") -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


@pytest.fixture
def bids(tmp_path) -> pathlib.Path:
    _touch(tmp_path, "sub-01/sub-01_task-mini_video.mp4")
    _touch(tmp_path, "sub-01/sub-01_task-mini_frametimes.tsv", b"t\n0\n")
    _touch(tmp_path, "sub-01/sub-01_task-mini_events.tsv", b"onset\tduration\n")
    _touch(tmp_path, "sub-02/ses-1/sub-02_ses-1_task-mini_run-2_video.mov")
    _touch(tmp_path, "sub-02/ses-1/sub-02_ses-1_task-rest_video.webm")
    _touch(tmp_path, "sub-02/ses-1/sub-02_ses-1_task-rest_video.txt")  # not a video extension
    _touch(tmp_path, "sub-03/notes.txt")
    _touch(tmp_path, "derivatives/gmfx/sub-01/sub-01_task-mini_video.mp4")  # never an input
    return tmp_path


def test_finds_recordings_with_entities_and_side_files(bids):
    recordings = find_recordings(bids)
    assert [r.name for r in recordings] == [
        "sub-01_task-mini",
        "sub-02_ses-1_task-mini_run-2",
        "sub-02_ses-1_task-rest",
    ]
    first = recordings[0]
    assert first.video.url.endswith("sub-01/sub-01_task-mini_video.mp4")
    assert first.frametimes.url.endswith("_frametimes.tsv") and first.events.url.endswith("_events.tsv")
    second = recordings[1]
    assert (second.subject, second.session, second.task, second.run) == ("02", "1", "mini", "2")
    assert second.frametimes is None and second.relative_dir == "sub-02/ses-1"


def test_selection_by_participant_and_task(bids):
    assert [r.name for r in find_recordings(bids, participant_label=["sub-02"], task="rest")] == [
        "sub-02_ses-1_task-rest"
    ]
    assert len(find_recordings(bids, participant_label=["01", "sub-02"])) == 3


def test_unknown_participant_lists_what_exists(bids):
    with pytest.raises(DatasetError) as info:
        find_recordings(bids, participant_label="07")
    assert "sub-07" in str(info.value) and "sub-01, sub-02" in str(info.value)


def test_unknown_task_lists_what_exists(bids):
    with pytest.raises(DatasetError, match="mini, rest"):
        find_recordings(bids, task="smile")


@pytest.mark.parametrize("label", ["../01", "sub-01/..", "a\\b", ".."])
def test_participant_label_with_path_parts_is_refused(label):
    with pytest.raises(DatasetError, match="path separator"):
        normalize_participant_label(label)


def test_missing_input_folder(tmp_path):
    with pytest.raises(DatasetError) as info:
        find_recordings(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value) and "does not exist" in str(info.value)


def test_folder_without_recordings(tmp_path):
    _touch(tmp_path, "sub-01/readme.txt")
    with pytest.raises(DatasetError, match="no recording found"):
        find_recordings(tmp_path)


def test_discovery_on_s3(s3_root, bids):
    fs, root = s3_root.filesystem()
    for path in bids.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{root}/study/{path.relative_to(bids)}", path.read_bytes())
    study = Location(f"{s3_root.url}/study", s3_root.storage_options)
    recordings = find_recordings(study)
    assert [r.name for r in recordings] == [r.name for r in find_recordings(bids)]
    assert recordings[0].video.url == f"{s3_root.url}/study/sub-01/sub-01_task-mini_video.mp4"
    assert recordings[0].video.storage_options == s3_root.storage_options
