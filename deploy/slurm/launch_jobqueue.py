"""Run gmfx on SLURM GPU workers started by dask-jobqueue.

Run it on a login node (or any host the compute nodes can reach) in the gmfx environment, with
dask-jobqueue installed (``pip install dask-jobqueue``)::

    python deploy/slurm/launch_jobqueue.py --jobs 4 -- /data/bids --out /data/derivatives/gmfx --device cuda

The scheduler lives in this process. ``--jobs`` SLURM jobs are submitted, each one Dask worker with one
GPU and the resource ``GPU=1`` (settings in ``jobqueue.yaml`` next to this file, or ``--config``).
Once they have joined, ``gmfx run`` is started with ``--scheduler`` set to this scheduler and every
argument after ``--``. The worker jobs are cancelled when gmfx ends, however it ends.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import dask.config
import yaml

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        split = argv.index("--")
        own, gmfx_args = argv[:split], argv[split + 1 :]
    else:
        own, gmfx_args = argv, []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1, help="SLURM jobs, i.e. GPU workers (default 1)")
    parser.add_argument(
        "--config", type=Path, default=HERE / "jobqueue.yaml", help="dask-jobqueue YAML (default: jobqueue.yaml here)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the workers (default 3600)")
    args = parser.parse_args(own)
    if not gmfx_args:
        parser.error("give the gmfx run arguments after --, e.g. -- /data/bids --out /data/out --device cuda")
    if any(a == "--scheduler" or a.startswith("--scheduler=") for a in gmfx_args):
        parser.error("do not pass --scheduler to gmfx: this launcher provides it")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args, gmfx_args


def main(argv: list[str] | None = None) -> int:
    args, gmfx_args = parse_args(sys.argv[1:] if argv is None else argv)

    # Imported here so that `--help` works without dask-jobqueue; importing it loads its defaults,
    # which the file below then overrides.
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    with open(args.config) as f:
        dask.config.update(dask.config.config, yaml.safe_load(f), priority="new")

    with SLURMCluster() as cluster, Client(cluster) as client:
        print(cluster.job_script(), flush=True)
        cluster.scale(jobs=args.jobs)
        client.wait_for_workers(args.jobs, timeout=args.timeout)
        command = ["gmfx", "run", *gmfx_args, "--scheduler", cluster.scheduler_address]
        print("running:", " ".join(command), flush=True)
        return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
