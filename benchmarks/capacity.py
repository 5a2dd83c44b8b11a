"""Scale on paper: wall time, bytes stored, object-store objects and requests of a whole study on N GPU nodes.

    python benchmarks/capacity.py                                  # 1,000 h on 8 and 64 nodes
    python benchmarks/capacity.py --frames-per-shard 0 --frames-per-chunk 64 --frame-variables 1  # the RGB layout
    python benchmarks/capacity.py --hours 1000 --nodes 8 64 --cores-per-node 16 --gpus-per-node 1

Per-frame costs come from the benchmarks' JSON (``benchmarks/results/<name>.json``, ``stage_costs``) when
it is there, else from the defaults below (each says where its number comes from); the printout says
which was used. The frames-store layout (frames per chunk and per shard, variables per frame) is an
input, so the decode benchmark's layouts drop in. The model:

* work per frame: decode (CPU), the GPU model (GPU) and its CPU side (face detection and crops), preproc
  (CPU, FLAME-sized vertices); a node has ``--cores-per-node`` cores and ``--gpus-per-node`` GPUs;
* stage by stage (what ``gmfx run`` does today: each stage waits for the previous one over the whole
  study) the wall time is the sum of each stage's own limit; overlapped (decode of one recording while
  another is reconstructed), it is the largest demand on any one resource: CPU, GPU, the nodes' network
  (every byte written is read back once by the next stage), the Dask scheduler (per-task cost) or the
  client process, which plans, writes templates and finalizes each recording's stores one after another;
* objects: every chunk, or every shard when sharded, is one object per variable; requests: one PUT per
  object (5 MiB multipart parts above 5 MiB) and one GET per chunk read (plus one shard-index GET per
  shard and reading task when sharded), per stage that writes or reads it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from _common import Report, load_results

HOUR_FRAMES_AT = 3600  # seconds of an hour: frames in an hour = HOUR_FRAMES_AT * fps

#: defaults when no benchmark JSON says otherwise: (value, where it comes from)
DEFAULTS = {
    "decode_cpu_s_per_frame": (4.8e-3, "issue 17: gmfx decode at 1 worker, 640x360, 2-core box (before YUV planes)"),
    "frames_bytes_per_frame": (99e3, "README decode.py: YUV planes, zstd level 2, 640x360"),
    "gpu_s_per_frame": (1e-3, "issue 17's aim for FLAME/BFM backends on one GPU (1,000 frames/s); not measured here"),
    "gpu_model_cpu_s_per_frame": (3.8e-3, "DECA's CPU side, MediaPipe's face mesh: README recon.py plain loop 266 frames/s"),
    "preproc_core_s_per_frame": (2.35e-3, "README preproc.py: 1 h of 5,023 vertices in 127 s on 2 cores"),
    "recon_bytes_per_frame": (1.2e3, "FLAME codes (~300 float32) + pose matrix, codes-only store"),
    "preproc_bytes_per_frame": (50e3, "5,023 x 3 float32 vertices + motion, byte-shuffled LZ4 at ~84%"),
    "scheduler_s_per_task": (1e-3, "Dask's documented overhead per task (~1 ms)"),
    "client_s_per_recording": (2.5, "the example pipeline, 1 worker: 5.2 s of stages, 2.7 s of it in tasks (loaded 2-core box)"),
}


@dataclass
class Costs:
    values: dict[str, float]
    sources: dict[str, str]


def stage_costs(results: dict[str, dict], overrides: dict[str, float | None]) -> Costs:
    """The per-frame costs: command-line overrides, then the benchmarks' JSON, then the defaults."""
    values = {key: value for key, (value, _) in DEFAULTS.items()}
    sources = {key: f"default: {source}" for key, (_, source) in DEFAULTS.items()}

    def found(key: str, value: float | None, where: str) -> None:
        if value is not None and value > 0:
            values[key], sources[key] = float(value), where

    costs = {name: result.get("stage_costs", {}) for name, result in results.items()}
    decode = costs.get("decode", {}).get("decode", {})
    found("decode_cpu_s_per_frame", decode.get("cpu_s_per_frame"), "benchmarks/results/decode.json")
    found("frames_bytes_per_frame", decode.get("stored_bytes_per_frame"), "benchmarks/results/decode.json")
    gpu = costs.get("recon_flame", {}).get("recon_flame_gpu", {})
    if gpu:  # the best batch size's wall time per frame of one GPU worker (its feeding included)
        found("gpu_s_per_frame", min(gpu.values()), "benchmarks/results/recon_flame.json (cuda)")
    feeding = costs.get("gpu_feeding", {}).get("gpu_feeding", {})
    found("gpu_s_per_frame", feeding.get("gpu_s_per_frame"), "benchmarks/results/gpu_feeding.json")
    found("preproc_core_s_per_frame", costs.get("preproc", {}).get("preproc", {}).get("core_s_per_frame"),
          "benchmarks/results/preproc.json")  # fmt: skip
    found("client_s_per_recording", costs.get("pipeline", {}).get("pipeline", {}).get("client_s_per_recording"),
          "benchmarks/results/pipeline.json")  # fmt: skip
    for key, value in overrides.items():
        found(key, value, "command line")
    return Costs(values, sources)


def objects_and_requests(frames: float, recordings: float, *, bytes_per_frame: float, frames_per_chunk: int,
                         frames_per_shard: int, variables: int, read_passes: int, frames_per_read: int) -> dict[str, float]:  # fmt: skip
    """Objects and PUT/GET requests of one store kind over the study (each recording one store)."""
    per_recording = frames / recordings
    chunks = math.ceil(per_recording / frames_per_chunk) * variables
    if frames_per_shard:
        objects = math.ceil(per_recording / frames_per_shard) * variables
        object_bytes = bytes_per_frame / variables * min(frames_per_shard, per_recording)
    else:
        objects = chunks
        object_bytes = bytes_per_frame / variables * min(frames_per_chunk, per_recording)
    part = 5 * 2**20
    puts_per_object = 1 if object_bytes <= part else math.ceil(object_bytes / part) + 2  # create, parts, complete
    reads = math.ceil(per_recording / max(frames_per_read, 1))  # reading tasks per recording and pass
    index_gets = reads * variables if frames_per_shard else 0
    return {
        "objects": objects * recordings,
        "object_mb": object_bytes / 1e6,
        "puts": objects * puts_per_object * recordings,
        "gets": (chunks + index_gets) * read_passes * recordings,
    }


def project(nodes: int, args: argparse.Namespace, costs: Costs) -> dict[str, object]:
    c = costs.values
    frames = args.hours * HOUR_FRAMES_AT * args.fps
    recordings = max(1.0, args.hours * 60 / args.recording_minutes)
    cores, gpus = nodes * args.cores_per_node, nodes * args.gpus_per_node
    cpu_work = {"decode": c["decode_cpu_s_per_frame"], "recon (CPU side)": c["gpu_model_cpu_s_per_frame"],
                "preproc": c["preproc_core_s_per_frame"]}  # fmt: skip
    stored = {"frames": c["frames_bytes_per_frame"], "recon": c["recon_bytes_per_frame"], "preproc": c["preproc_bytes_per_frame"]}
    bytes_moved = 2 * sum(stored.values()) * frames  # written once, read once by the next stage
    network = nodes * args.network_gbit * 1e9 / 8
    tasks = frames / args.segment_frames * 3 + recordings * 10  # a task per segment and stage, ~10 per store (templates, finalizing)
    demand = {
        "CPU": frames * sum(cpu_work.values()) / cores,
        "GPU": frames * c["gpu_s_per_frame"] / gpus,
        "network": bytes_moved / network,
        "scheduler": tasks * c["scheduler_s_per_task"],
        "client": recordings * c["client_s_per_recording"],  # one gmfx process plans, writes templates, finalizes
    }
    stage_by_stage = {
        "decode": frames * cpu_work["decode"] / cores,
        "recon": max(frames * c["gpu_s_per_frame"] / gpus, frames * cpu_work["recon (CPU side)"] / cores),
        "preproc": frames * cpu_work["preproc"] / cores,
        "client (between stages)": recordings * c["client_s_per_recording"],
    }
    store = objects_and_requests(frames, recordings, bytes_per_frame=c["frames_bytes_per_frame"],
                                 frames_per_chunk=args.frames_per_chunk, frames_per_shard=args.frames_per_shard,
                                 variables=args.frame_variables, read_passes=1, frames_per_read=args.segment_frames)  # fmt: skip
    mesh_chunk = args.segment_frames  # recon and preproc stores: one chunk per segment and variable
    for name, variables in (("recon", 6), ("preproc", 4)):
        other = objects_and_requests(frames, recordings, bytes_per_frame=stored[name], frames_per_chunk=mesh_chunk,
                                     frames_per_shard=0, variables=variables, read_passes=1, frames_per_read=mesh_chunk)  # fmt: skip
        for key in ("objects", "puts", "gets"):
            store[key] += other[key]
    overlapped = max(demand.values())
    return {
        "nodes": nodes, "frames": frames, "recordings": recordings,
        "stage_by_stage_s": sum(stage_by_stage.values()), "stages_s": stage_by_stage,
        "overlapped_s": overlapped, "bottleneck": max(demand, key=demand.get), "demand_s": demand,
        "stored_tb": sum(stored.values()) * frames / 1e12, "frames_tb": stored["frames"] * frames / 1e12,
        "objects": store["objects"], "frames_object_mb": store["object_mb"], "puts": store["puts"], "gets": store["gets"],
        "frames_objects_per_hour": math.ceil(HOUR_FRAMES_AT * args.fps / (args.frames_per_shard or args.frames_per_chunk)) * args.frame_variables,
        "one_frame_read_mb": c["frames_bytes_per_frame"] * args.frames_per_chunk / 1e6,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=1000, help="hours of video in the study")
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 64], help="GPU nodes")
    parser.add_argument("--cores-per-node", type=int, default=16)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--network-gbit", type=float, default=10, help="each node's network to the object store")
    parser.add_argument("--fps", type=float, default=30)
    parser.add_argument("--recording-minutes", type=float, default=10, help="length of one recording (one store per stage)")
    parser.add_argument("--segment-frames", type=int, default=256, help="frames per recon task (gmfx's SEGMENT_FRAMES)")
    layout = parser.add_argument_group("frames-store layout")
    # defaults: the decode stage's layout at 640x360 (gmfx/stages/decode.py)
    layout.add_argument("--frames-per-chunk", type=int, default=4, help="frames per chunk (the unit one read decompresses)")
    layout.add_argument("--frames-per-shard", type=int, default=776, help="frames per shard object (0: no sharding)")
    layout.add_argument("--frame-variables", type=int, default=3, help="arrays per frame (1: RGB, 3: Y, U, V planes)")
    costs = parser.add_argument_group("per-frame costs (override the JSON and the defaults)")
    for key in DEFAULTS:
        costs.add_argument(f"--{key.replace('_', '-')}", type=float, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only (no benchmarks/results/capacity.json)")
    args = parser.parse_args()

    overrides = {key: getattr(args, key) for key in DEFAULTS}
    known = stage_costs({name: r for name, r in load_results().items() if name != "capacity"}, overrides)
    report = Report("capacity", args)
    report.note(f"study: {args.hours:g} h at {args.fps:g} fps, {args.recording_minutes:g}-minute recordings; "
                f"nodes of {args.cores_per_node} cores and {args.gpus_per_node} GPU(s), {args.network_gbit:g} Gbit/s each")  # fmt: skip
    report.note(f"frames store: {args.frames_per_chunk} frames a chunk, "
                f"{args.frames_per_shard or 'no'} frames a shard, {args.frame_variables} variable(s) a frame")  # fmt: skip
    for key, value in known.values.items():
        report.note(f"  {key:28s} {value:10.4g}   ({known.sources[key]})")
    for nodes in args.nodes:
        p = project(nodes, args, known)
        hours = 3600
        report.note(f"\n{nodes} nodes: {p['frames']:.3g} frames in {p['recordings']:.0f} recordings")
        report.note("  stage by stage: " + ", ".join(f"{k} {v / hours:.1f} h" for k, v in p["stages_s"].items())
                    + f" = {p['stage_by_stage_s'] / hours:.1f} h")  # fmt: skip
        report.note("  demand if stages overlap: " + ", ".join(f"{k} {v / hours:.1f} h" for k, v in p["demand_s"].items())
                    + f" -> {p['overlapped_s'] / hours:.1f} h, bottleneck: {p['bottleneck']}")  # fmt: skip
        report.note(f"  stored {p['stored_tb']:.1f} TB (frames {p['frames_tb']:.1f} TB, {p['frames_object_mb']:.1f} MB a frames "
                    f"object); {p['objects']:.3g} objects; {p['puts']:.3g} PUT and {p['gets']:.3g} GET requests")  # fmt: skip
        report.note(f"  frames store: {p['frames_objects_per_hour']} objects per hour of video (target <= 2,000), "
                    f"{p['one_frame_read_mb']:.2f} MB read for one frame (target <= 2 MB)")  # fmt: skip
        report.add(f"{nodes} nodes: wall, stage by stage", p["stage_by_stage_s"] / hours, "h", echo=False)
        report.add(f"{nodes} nodes: wall, stages overlapped", p["overlapped_s"] / hours, "h", bottleneck=p["bottleneck"], echo=False)
        report.add(f"{nodes} nodes: bytes stored", p["stored_tb"], "TB", echo=False)
        report.add(f"{nodes} nodes: objects", float(p["objects"]), "objects", echo=False)
        report.add(f"{nodes} nodes: requests", float(p["puts"] + p["gets"]), "requests", puts=p["puts"], gets=p["gets"], echo=False)
        report.rows[-1]["projection"] = p
    if not args.no_write:
        report.write()


if __name__ == "__main__":
    main()
