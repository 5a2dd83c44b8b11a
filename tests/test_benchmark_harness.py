"""The benchmarks' shared harness (JSON beside the printout, one table) and the capacity projection's arithmetic."""

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _common  # noqa: E402
import _table  # noqa: E402
import capacity  # noqa: E402


def test_report_writes_the_figures_with_the_machine_and_the_arguments(tmp_path, capsys):
    report = _common.Report("demo", argparse.Namespace(frames=12, workers=[1, 2]))
    report.add("plain loop", 100.0, "frames/s")
    report.add("gmfx, 2 workers", 150.0, "frames/s", ratio=1.5, baseline="plain loop", target=1.6)
    report.stage_cost("decode", "cpu_s_per_frame", 0.002)
    path = report.write(tmp_path)
    written = json.loads(path.read_text())
    assert path.name == "demo.json" and not list(tmp_path.glob("*.partial"))
    assert written["arguments"] == {"frames": 12, "workers": [1, 2]}
    assert written["machine"]["cores"] >= 1 and written["machine"]["cpu"]
    assert "numpy" in written["versions"] and written["stage_costs"] == {"decode": {"cpu_s_per_frame": 0.002}}
    assert "1.50x plain loop (target >= 1.6x, missed)" in capsys.readouterr().out
    table = _table.table(_common.load_results(tmp_path))
    assert "| demo | gmfx, 2 workers | 150 | frames/s | 1.5x | plain loop | >= 1.6x **missed** | M1 |" in table


def _arguments(**changes) -> argparse.Namespace:
    defaults = {"hours": 10.0, "fps": 30.0, "recording_minutes": 60.0, "cores_per_node": 16, "gpus_per_node": 1,
                "network_gbit": 10.0, "segment_frames": 256, "frames_per_chunk": 64, "frames_per_shard": 0, "frame_variables": 1}  # fmt: skip
    return argparse.Namespace(**{**defaults, **changes})


def test_capacity_counts_the_frames_store_objects_and_the_bottleneck():
    costs = capacity.stage_costs({}, {})
    # 1 hour = 108,000 frames at 99 kB (the planes' default): 64-frame chunks -> 1,688 objects of 6.3 MB;
    # 1,800-frame shards of 3 planes -> 180
    plain = capacity.project(1, _arguments(), costs)
    assert plain["frames_objects_per_hour"] == math.ceil(108_000 / 64) == 1688
    assert plain["one_frame_read_mb"] == pytest.approx(99e3 * 64 / 1e6)
    sharded = capacity.project(1, _arguments(frames_per_shard=1800, frames_per_chunk=1, frame_variables=3), costs)
    assert sharded["frames_objects_per_hour"] == 180 and sharded["one_frame_read_mb"] == pytest.approx(0.099)
    # GPU: 1,080,000 frames x 1 ms on 1 GPU = 1,080 s; CPU: x (4.8 + 3.8 + 2.35) ms / 16 cores = 739 s
    assert plain["demand_s"]["GPU"] == pytest.approx(1080.0)
    assert plain["demand_s"]["CPU"] == pytest.approx(1_080_000 * 10.95e-3 / 16)
    assert plain["bottleneck"] == "GPU"
    many = capacity.project(1, _arguments(recording_minutes=0.5), costs)  # 1,200 recordings x 2.5 s in the client
    assert many["demand_s"]["client"] == pytest.approx(3000.0) and many["bottleneck"] == "client"


def test_capacity_takes_measured_costs_from_the_benchmarks_json():
    results = {"decode": {"stage_costs": {"decode": {"cpu_s_per_frame": 1e-3, "stored_bytes_per_frame": 90e3}}},
               "recon_flame": {"stage_costs": {"recon_flame_gpu": {"wall_s_per_frame_batch_32": 4e-4, "wall_s_per_frame_batch_128": 2e-4}}}}  # fmt: skip
    costs = capacity.stage_costs(results, {"preproc_core_s_per_frame": 5e-3})
    assert costs.values["decode_cpu_s_per_frame"] == 1e-3 and costs.values["frames_bytes_per_frame"] == 90e3
    assert costs.values["gpu_s_per_frame"] == 2e-4 and "recon_flame" in costs.sources["gpu_s_per_frame"]
    assert costs.values["preproc_core_s_per_frame"] == 5e-3 and costs.sources["preproc_core_s_per_frame"] == "command line"
