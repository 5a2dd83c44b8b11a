"""The deploy/ recipes parse, agree with each other and hold the settings their READMEs promise.

Static checks only (no cluster, no docker daemon, no SLURM): YAML is parsed, shell scripts go through
``bash -n``, the launcher through ``py_compile``, the Dockerfile is split into instructions, and every
``gmfx`` / ``dask`` command line shown in deploy/ is checked against the options those commands have.
"""

from __future__ import annotations

import json
import py_compile
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
IMAGE = "ghcr.io/gmfx/gmfx:0.1.0"
IMAGE_CUDA = "ghcr.io/gmfx/gmfx:0.1.0-cuda"
CLUSTER = "gmfx"  # DaskCluster name; its scheduler Service is f"{CLUSTER}-scheduler"

# The gmfx command-line interface the recipes may use (the lead's CLI contract).
GMFX_COMMANDS = {"run", "decode", "recon", "align", "interpolate", "filter", "epoch", "preproc"}
GMFX_VALUE_OPTIONS = {
    "--out",
    "--participant-label",
    "--task",
    "--scheduler",
    "--workers",
    "--device",
    "--model",
    "--storage-option",
}
GMFX_FLAG_OPTIONS = {"--overwrite"}
GMFX_DEVICES = {"cpu", "cuda", "auto"}

SHELL_SEPARATORS = {"|", "||", "&&", ";", "&", ")", ">", ">>", "2>&1", "2>", "<"}
COMMAND_PREFIXES = {"exec", "then", "do", "else", "time", "nohup", "(", "!"}


def read(rel: str) -> str:
    return (DEPLOY / rel).read_text()


def yaml_docs(rel: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(read(rel)) if d is not None]
    assert docs, f"{rel} holds no YAML document"
    return docs


def one_doc(rel: str, kind: str) -> dict:
    docs = [d for d in yaml_docs(rel) if d.get("kind") == kind]
    assert len(docs) == 1, f"{rel}: expected one {kind}, found {len(docs)}"
    return docs[0]


def all_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def pod_containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def k8s_pod_specs() -> dict[str, dict]:
    cluster = one_doc("kubernetes/daskcluster.yaml", "DaskCluster")
    group = one_doc("kubernetes/gpu-workergroup.yaml", "DaskWorkerGroup")
    job = one_doc("kubernetes/job.yaml", "Job")
    return {
        "scheduler": cluster["spec"]["scheduler"]["spec"],
        "cpu-worker": cluster["spec"]["worker"]["spec"],
        "gpu-worker": group["spec"]["worker"]["spec"],
        "job": job["spec"]["template"]["spec"],
    }


def argv(container: dict) -> list[str]:
    return [str(a) for a in container.get("command", [])] + [str(a) for a in container.get("args", [])]


# ---------------------------------------------------------------- shell command extraction


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
        else:
            out.append(buf + line)
            buf = ""
    if buf:
        out.append(buf)
    return out


def tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # a line inside a multi-line quoted string
        return line.split("#", 1)[0].split()


def shell_sources() -> list[tuple[str, str]]:
    """(name, shell text): whole scripts, and every fenced code block of the READMEs."""
    sources = [
        ("multi-gpu/start-cluster.sh", read("multi-gpu/start-cluster.sh")),
        ("slurm/gmfx-slurm.sbatch", read("slurm/gmfx-slurm.sbatch")),
    ]
    for readme in sorted(DEPLOY.rglob("README.md")):
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```", readme.read_text(), flags=re.S | re.M)
        sources += [(f"{readme.relative_to(DEPLOY)} (code block {i})", b) for i, b in enumerate(blocks)]
    return sources


def gmfx_invocations(text: str) -> list[list[str]]:
    """Every gmfx command in ``text``, as [subcommand, args...] up to the next shell separator.

    Recognised: ``gmfx SUB ...``; ``docker run ... IMAGE SUB ...`` (the image's entrypoint is gmfx);
    ``gmfx-slurm.sbatch ARGS`` and ``start-cluster.sh ... -- ARGS`` / ``launch_jobqueue.py ... -- ARGS``,
    whose ARGS are handed to ``gmfx run``.
    """
    found = []
    for line in logical_lines(text):
        toks = tokens(line)
        for i, tok in enumerate(toks):
            prev = toks[i - 1] if i else None
            starts_command = prev is None or prev in SHELL_SEPARATORS | COMMAND_PREFIXES or re.fullmatch(
                r"[A-Za-z_][A-Za-z0-9_]*=.*", prev
            )
            rest: list[str] | None = None
            if tok == "gmfx" and starts_command and i + 1 < len(toks):
                rest = toks[i + 1 :]
            elif tok in (IMAGE, IMAGE_CUDA) and "run" in toks[:i] and "--entrypoint" not in toks[:i]:
                rest = toks[i + 1 :]
            elif tok.endswith("gmfx-slurm.sbatch") and prev not in (None, "bash", "-n") and i + 1 < len(toks):
                rest = ["run", *toks[i + 1 :]]
            elif tok.endswith(("start-cluster.sh", "launch_jobqueue.py")) and "--" in toks[i:]:
                rest = ["run", *toks[toks.index("--", i) + 1 :]]
            if rest:
                end = next((k for k, t in enumerate(rest) if t in SHELL_SEPARATORS), len(rest))
                found.append(rest[:end])
    return found


def gmfx_problems(invocation: list[str]) -> list[str]:
    """What is wrong with one gmfx invocation, against the CLI contract above."""
    sub, args = invocation[0], invocation[1:]
    problems = [] if sub in GMFX_COMMANDS else [f"unknown gmfx command {sub!r}"]
    k = 0
    while k < len(args):
        arg = args[k]
        name, eq, value = arg.partition("=")
        if arg.startswith("--"):
            if name in GMFX_FLAG_OPTIONS and not eq:
                pass
            elif name in GMFX_VALUE_OPTIONS:
                if not eq:
                    k += 1
                    value = args[k] if k < len(args) else ""
                if not value or value.startswith("-"):
                    problems.append(f"{name} needs a value")
                if name == "--device" and value not in GMFX_DEVICES:
                    problems.append(f"--device {value!r} is not one of {sorted(GMFX_DEVICES)}")
                if name == "--scheduler" and not (value.startswith("tcp://") or value.startswith("$")):
                    problems.append(f"--scheduler {value!r} is not a tcp:// address")
            else:
                problems.append(f"unknown option {name}")
        elif arg.startswith("-") and arg != "-":
            problems.append(f"short option {arg} (use the long names)")
        k += 1
    return problems


def all_gmfx_invocations() -> list[tuple[str, list[str]]]:
    found = [(name, inv) for name, text in shell_sources() for inv in gmfx_invocations(text)]
    for role, spec in k8s_pod_specs().items():
        for c in pod_containers(spec):
            cmd = argv(c)
            if cmd and cmd[0] == "gmfx":
                found.append((f"kubernetes {role}", cmd[1:]))
    return found


def dask_invocations(text: str) -> list[tuple[str, list[str]]]:
    """(scheduler|worker, args) for each ``dask scheduler`` / ``dask worker`` command. The environment
    assignments in front of it come first, as ``ENV:NAME=VALUE``, and a docker ``--gpus`` as ``GPUS:VALUE``."""
    found = []
    for line in logical_lines(text):
        toks = tokens(line)
        for i, tok in enumerate(toks[:-1]):
            if tok == "dask" and toks[i + 1] in ("scheduler", "worker"):
                pre = [f"ENV:{t}" for t in toks[:i] if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", t)]
                pre += [f"GPUS:{b}" for a, b in zip(toks[:i], toks[1:i]) if a == "--gpus"]
                rest = toks[i + 2 :]
                end = next((k for k, t in enumerate(rest) if t in SHELL_SEPARATORS), len(rest))
                found.append((toks[i + 1], pre + rest[:end]))
    return found


def all_dask_invocations() -> list[tuple[str, str, list[str]]]:
    found = [(name, kind, args) for name, text in shell_sources() for kind, args in dask_invocations(text)]
    for role, spec in k8s_pod_specs().items():
        for c in pod_containers(spec):
            cmd = argv(c)
            if cmd[:1] == ["dask"]:
                found.append((f"kubernetes {role}", cmd[1], cmd[2:]))
    return found


def has_pair(args: list[str], option: str, value: str) -> bool:
    return any(a == option and b == value for a, b in zip(args, args[1:])) or f"{option}={value}" in args


# ---------------------------------------------------------------- everything parses


def test_every_deploy_file_is_known_and_parses():
    expected = {
        "README.md",
        "container/Dockerfile",
        "container/Dockerfile.dockerignore",
        "container/README.md",
        "kubernetes/README.md",
        "kubernetes/daskcluster.yaml",
        "kubernetes/gpu-workergroup.yaml",
        "kubernetes/job.yaml",
        "multi-gpu/README.md",
        "multi-gpu/start-cluster.sh",
        "slurm/README.md",
        "slurm/gmfx-slurm.sbatch",
        "slurm/jobqueue.yaml",
        "slurm/launch_jobqueue.py",
    }
    assert {str(p.relative_to(DEPLOY)) for p in all_files()} == expected
    for p in DEPLOY.rglob("*.yaml"):
        yaml_docs(str(p.relative_to(DEPLOY)))


@pytest.mark.parametrize("script", ["multi-gpu/start-cluster.sh", "slurm/gmfx-slurm.sbatch"])
def test_shell_scripts_parse_and_are_strict(script):
    bash = shutil.which("bash")
    assert bash, "bash is needed to syntax-check the deploy scripts"
    result = subprocess.run([bash, "-n", str(DEPLOY / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = read(script)
    assert text.startswith("#!"), f"{script} has no shebang"
    assert re.search(r"^set -euo pipefail$", text, re.M), f"{script} must `set -euo pipefail`"
    assert re.search(r"^trap cleanup EXIT$", text, re.M), f"{script} must stop what it started on exit"
    assert (DEPLOY / script).stat().st_mode & 0o111, f"{script} is not executable"


def test_launcher_compiles_and_never_needs_dask_jobqueue_at_import(tmp_path):
    path = DEPLOY / "slurm/launch_jobqueue.py"
    py_compile.compile(str(path), cfile=str(tmp_path / "launch.pyc"), doraise=True)
    text = path.read_text()
    top_level = [line for line in text.splitlines() if re.match(r"(import|from) ", line)]
    assert not any("dask_jobqueue" in line for line in top_level), "import dask_jobqueue inside main()"
    assert "SLURMCluster(" in text and "jobqueue.yaml" in text
    assert '"--scheduler", cluster.scheduler_address' in text
    assert "wait_for_workers" in text


# ---------------------------------------------------------------- Kubernetes


def test_daskcluster_scheduler_and_service():
    cluster = one_doc("kubernetes/daskcluster.yaml", "DaskCluster")
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    assert cluster["metadata"]["name"] == CLUSTER
    spec = cluster["spec"]
    assert set(spec) == {"worker", "scheduler"}
    assert set(spec["scheduler"]) == {"spec", "service"}
    (scheduler,) = spec["scheduler"]["spec"]["containers"]
    assert argv(scheduler)[:2] == ["dask", "scheduler"]
    assert has_pair(argv(scheduler), "--port", "8786")
    container_ports = {p["name"]: p["containerPort"] for p in scheduler["ports"]}
    assert container_ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    assert scheduler["readinessProbe"]["httpGet"] == {"port": "http-dashboard", "path": "/health"}
    service = spec["scheduler"]["service"]
    assert service["selector"] == {"dask.org/cluster-name": CLUSTER, "dask.org/component": "scheduler"}
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]}
    assert ports == {"tcp-comm": (8786, "tcp-comm"), "http-dashboard": (8787, "http-dashboard")}


def test_default_worker_group_is_cpu_only():
    worker = one_doc("kubernetes/daskcluster.yaml", "DaskCluster")["spec"]["worker"]
    assert worker["replicas"] >= 1
    (c,) = worker["spec"]["containers"]
    cmd = argv(c)
    assert cmd[:2] == ["dask", "worker"], "the image's entrypoint is gmfx: workers must set command"
    assert has_pair(cmd, "--name", "$(DASK_WORKER_NAME)")
    assert "--resources" not in cmd and not any(a.startswith("--resources=") for a in cmd)
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in c["resources"].get(section, {})
    assert {"name": "CUDA_VISIBLE_DEVICES", "value": ""} in c.get("env", [])


def test_gpu_worker_group():
    group = one_doc("kubernetes/gpu-workergroup.yaml", "DaskWorkerGroup")
    assert group["apiVersion"] == "kubernetes.dask.org/v1"
    assert group["spec"]["cluster"] == CLUSTER
    worker = group["spec"]["worker"]
    assert worker["replicas"] >= 1
    (c,) = worker["spec"]["containers"]
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    cmd = argv(c)
    assert cmd[:2] == ["dask", "worker"]
    assert has_pair(cmd, "--name", "$(DASK_WORKER_NAME)")
    assert has_pair(cmd, "--dashboard-address", "8788")
    assert has_pair(cmd, "--resources", "GPU=1")
    assert has_pair(cmd, "--nthreads", "1")
    # the operator passes the scheduler in DASK_SCHEDULER_ADDRESS: no address on the command line
    assert not any(a.startswith("tcp://") for a in cmd)


def test_job_runs_gmfx_against_the_cluster_scheduler():
    job = one_doc("kubernetes/job.yaml", "Job")
    assert job["apiVersion"] == "batch/v1"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    cmd = argv(c)
    assert cmd[:2] == ["gmfx", "run"]
    assert cmd[2].startswith("s3://")
    assert has_pair(cmd, "--scheduler", f"tcp://{CLUSTER}-scheduler:8786")
    assert has_pair(cmd, "--device", "cuda")
    out = cmd[cmd.index("--out") + 1]
    assert out.startswith("s3://")
    assert not gmfx_problems(cmd[1:])
    # the init container waits on the same scheduler
    (init,) = pod["initContainers"]
    assert f"tcp://{CLUSTER}-scheduler:8786" in " ".join(argv(init))


def test_kubernetes_credentials_only_from_the_secret():
    for role, spec in k8s_pod_specs().items():
        for c in pod_containers(spec):
            for env in c.get("env", []):
                assert not env["name"].startswith("AWS_"), f"{role}: {env['name']} must come from the Secret"
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            if role in ("cpu-worker", "gpu-worker") or (role == "job" and c in spec["containers"]):
                assert refs == ["gmfx-aws"], f"{role}/{c['name']} needs envFrom secretRef gmfx-aws"
            if role == "scheduler":
                assert not refs, "the scheduler touches no data and needs no credentials"
    assert "kubectl create secret generic gmfx-aws" in read("kubernetes/README.md")


def test_kubernetes_pods_share_one_image_and_run_as_non_root():
    for role, spec in k8s_pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True, role
        for c in pod_containers(spec):
            assert c["image"] == IMAGE_CUDA, f"{role}/{c['name']} uses {c['image']}"


# ---------------------------------------------------------------- SLURM

# Settings dask-jobqueue's SLURMCluster reads (dashes and underscores are the same to dask.config).
JOBQUEUE_SLURM_KEYS = {
    "name", "cores", "memory", "processes", "python", "interface", "death-timeout", "local-directory",
    "shared-temp-directory", "extra", "worker-command", "worker-extra-args", "shebang", "queue",
    "account", "walltime", "env-extra", "job-script-prologue", "job-cpu", "job-mem", "job-extra",
    "job-extra-directives", "job-directives-skip", "log-directory", "scheduler-options", "nanny",
    "protocol", "security", "scheduler-cls", "submit-command-extra", "cancel-command-extra",
}  # fmt: skip


def test_jobqueue_yaml():
    (doc,) = yaml_docs("slurm/jobqueue.yaml")
    slurm = {k.replace("_", "-"): v for k, v in doc["jobqueue"]["slurm"].items()}
    assert set(slurm) <= JOBQUEUE_SLURM_KEYS, f"unknown keys: {set(slurm) - JOBQUEUE_SLURM_KEYS}"
    assert slurm["processes"] == 1
    assert slurm["cores"] == 1, "one thread per GPU worker"
    assert isinstance(slurm["job-cpu"], int) and slurm["job-cpu"] >= 1
    assert re.fullmatch(r"\d+(GiB|GB|G)", slurm["memory"])
    assert re.fullmatch(r"\d+:\d\d:\d\d", slurm["walltime"])
    assert slurm["job-extra-directives"] == ["--gres=gpu:1"]
    assert has_pair(slurm["worker-extra-args"], "--resources", "GPU=1")
    assert slurm["local-directory"]
    assert any("bin/activate" in line for line in slurm["job-script-prologue"])


def sbatch_directives() -> dict[str, str]:
    directives = {}
    for m in re.finditer(r"^#SBATCH\s+(--[a-z-]+)(?:[= ](\S+))?", read("slurm/gmfx-slurm.sbatch"), re.M):
        directives[m.group(1)] = m.group(2) or ""
    return directives


def test_sbatch_directives():
    d = sbatch_directives()
    gpus = re.fullmatch(r"gpu:(\d+)", d["--gres"])
    assert gpus, d["--gres"]
    assert d["--ntasks"] == gpus.group(1), "one task (worker) per GPU"
    assert int(d["--cpus-per-task"]) >= 1
    assert re.fullmatch(r"\d+:\d\d:\d\d", d["--time"])
    assert d["--nodes"] == "1"


def test_sbatch_starts_scheduler_workers_and_gmfx():
    text = read("slurm/gmfx-slurm.sbatch")
    sched = [args for kind, args in dask_invocations(text) if kind == "scheduler"]
    (sched_args,) = sched
    assert "--scheduler-file" in sched_args
    assert 'GMFX_SCHEDULER_PORT="${GMFX_SCHEDULER_PORT:-8786}"' in text
    (worker_args,) = [args for kind, args in dask_invocations(text) if kind == "worker"]
    assert "--scheduler-file" in worker_args
    assert has_pair(worker_args, "--resources", "GPU=1")
    assert has_pair(worker_args, "--nthreads", "1")
    assert re.search(r"^srun --ntasks=\"\$n_workers\"", text, re.M), "workers are started with srun"
    assert 'export CUDA_VISIBLE_DEVICES="${gpus[$SLURM_LOCALID]}"' in text
    assert "wait_for_workers" in text
    assert '["address"]' in text, "the address is read from the scheduler file"
    assert re.search(r'^gmfx run "\$@" --scheduler "\$scheduler_address"$', text, re.M)


# ---------------------------------------------------------------- multi-GPU


def test_multi_gpu_script():
    text = read("multi-gpu/start-cluster.sh")
    assert "nvidia-smi -L" in text
    assert "port=8786" in text
    workers = [args for kind, args in dask_invocations(text) if kind == "worker"]
    gpu = [a for a in workers if 'ENV:CUDA_VISIBLE_DEVICES=$i' in a]
    cpu = [a for a in workers if "ENV:CUDA_VISIBLE_DEVICES=" in a]
    assert len(gpu) == 1 and len(cpu) == 1 and len(workers) == 2
    assert has_pair(gpu[0], "--resources", "GPU=1") and has_pair(gpu[0], "--nthreads", "1")
    assert "--resources" not in cpu[0]
    assert "--cpu-workers)" in text
    assert re.search(r'^gmfx run "\$@" --scheduler "\$scheduler_address"$', text, re.M)


# ---------------------------------------------------------------- all recipes: workers and commands


def test_gpu_resource_only_on_gpu_workers():
    """A worker that offers GPU=1 has one thread and sees one GPU; a CPU worker never offers it."""
    workers = [(name, args) for name, kind, args in all_dask_invocations() if kind == "worker"]
    assert len(workers) >= 6
    n_gpu = 0
    for name, args in workers:
        offers_gpu = has_pair(args, "--resources", "GPU=1")
        cpu_only = "ENV:CUDA_VISIBLE_DEVICES=" in args or any(a.startswith("cpu-") for a in args)
        if cpu_only or name == "kubernetes cpu-worker":
            assert not offers_gpu, f"{name}: CPU worker offers the GPU resource: {args}"
        if not offers_gpu:
            continue
        n_gpu += 1
        assert has_pair(args, "--nthreads", "1"), f"{name}: GPU worker needs one thread: {args}"
        if name == "kubernetes gpu-worker":
            continue  # one nvidia.com/gpu per pod: test_gpu_worker_group
        if name == "slurm/gmfx-slurm.sbatch":
            continue  # CUDA_VISIBLE_DEVICES exported per task: test_sbatch_starts_scheduler_workers_and_gmfx
        pinned = [a for a in args if re.fullmatch(r"ENV:CUDA_VISIBLE_DEVICES=\S+|GPUS:device=\d+", a)]
        assert pinned, f"{name}: GPU worker not pinned to one GPU: {args}"
    assert n_gpu >= 5


def test_dask_command_options_exist():
    from distributed.cli import dask_scheduler, dask_worker

    known = {
        "scheduler": {o for p in dask_scheduler.main.params for o in p.opts},
        "worker": {o for p in dask_worker.main.params for o in p.opts},
    }
    for name, kind, args in all_dask_invocations():
        for a in args:
            if a.startswith("--"):
                assert a.split("=")[0] in known[kind], f"{name}: dask {kind} has no option {a}"


def test_gmfx_command_lines_use_real_options():
    found = all_gmfx_invocations()
    # every recipe shows at least one gmfx command; the extraction is not vacuous
    names = {name.split(" ")[0].split("/")[0] for name, _ in found}
    assert {"README.md", "container", "kubernetes", "multi-gpu", "slurm"} <= names, names
    assert len(found) >= 12
    for name, inv in found:
        assert not gmfx_problems(inv), f"{name}: gmfx {' '.join(inv)}: {gmfx_problems(inv)}"


def test_gmfx_command_checker_rejects_bad_lines():
    assert gmfx_problems(["run", "/data", "--out", "/o", "--device", "cuda"]) == []
    assert gmfx_problems(["run", "/data", "--overwrite", "--storage-option", "anon=true"]) == []
    assert gmfx_problems(["run", "/data", "--gpus", "2"])
    assert gmfx_problems(["run", "/data", "--device", "gpu"])
    assert gmfx_problems(["train", "/data"])
    assert gmfx_problems(["run", "/data", "-x"])
    assert gmfx_problems(["run", "/data", "--scheduler", "localhost:8786"])
    text = "docker run --rm ghcr.io/gmfx/gmfx:0.1.0 run /data --bogus\nsbatch x/gmfx-slurm.sbatch /d --out /o"
    assert gmfx_invocations(text) == [["run", "/data", "--bogus"], ["run", "/d", "--out", "/o"]]


def test_gmfx_command_lines_match_the_installed_cli():
    """Where the real CLI already has the command, it accepts every option the recipes use."""
    cli = pytest.importorskip("gmfx.cli")
    typer_main = pytest.importorskip("typer.main")
    group = typer_main.get_command(cli.app)
    checked = 0
    for name, inv in all_gmfx_invocations():
        command = group.commands.get(inv[0]) if hasattr(group, "commands") else None
        if command is None:
            continue
        options = {o for p in command.params for o in p.opts + p.secondary_opts}
        for a in inv[1:]:
            if a.startswith("--"):
                assert a.split("=")[0] in options, f"{name}: `gmfx {inv[0]}` has no option {a}"
        checked += 1
    assert checked, "no recipe command matched the installed CLI"


# ---------------------------------------------------------------- container


def dockerfile_instructions() -> list[tuple[str, str]]:
    out = []
    for line in logical_lines(read("container/Dockerfile")):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, rest = stripped.partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
    return out


def test_dockerfile():
    ins = dockerfile_instructions()
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "USER", "WORKDIR", "ENTRYPOINT", "CMD"}
    assert {k for k, _ in ins} <= known
    assert ins[0][0] == "FROM" and ins[0][1].startswith("python:3.11-slim")
    args = {v.split("=")[0]: v.split("=", 1)[1] for k, v in ins if k == "ARG" and "=" in v}
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = [v for k, v in ins if k == "RUN"]
    apt = next(r for r in runs if "apt-get install" in r)
    assert {"libgl1", "libglib2.0-0"} <= set(apt.split())
    torch_step = next(i for i, r in enumerate(runs) if 'pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"' in r)
    gmfx_step = next(i for i, r in enumerate(runs) if re.search(r"pip install (/src|\.)(\s|$)", r))
    assert torch_step < gmfx_step, "torch must be installed before gmfx"
    assert "torch.__version__.startswith('2.13.0')" in runs[gmfx_step]
    copy_at = next(i for i, (k, _) in enumerate(ins) if k == "COPY")
    torch_at = next(i for i, (k, v) in enumerate(ins) if k == "RUN" and "torch==2.13.0" in v)
    assert torch_at < copy_at, "torch layer first, so code changes do not reinstall torch"
    users = [v for k, v in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "numeric USER, so runAsNonRoot can be verified"
    assert json.loads(next(v for k, v in ins if k == "ENTRYPOINT")) == ["gmfx"]
    for k, v in ins:
        assert not (k in ("ENV", "ARG") and "AWS_" in v), f"credentials baked into the image: {k} {v}"


def test_dockerignore_allows_only_the_package():
    lines = [ln.strip() for ln in read("container/Dockerfile.dockerignore").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!gmfx"} <= set(lines)


def test_container_readme_build_commands():
    text = "\n".join(logical_lines(read("container/README.md")))
    assert f"docker build -f deploy/container/Dockerfile -t {IMAGE} ." in text
    gpu = re.search(
        r"docker build -f deploy/container/Dockerfile\s+--build-arg TORCH_INDEX_URL=(\S+)\s+-t (\S+) \.", text
    )
    assert gpu and re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", gpu.group(1))
    assert gpu.group(2) == IMAGE_CUDA
    assert gpu.group(1) in read("container/Dockerfile"), "the Dockerfile header shows the same CUDA index"
    assert f"docker push {IMAGE}" in text and f"docker push {IMAGE_CUDA}" in text


def test_one_image_name_everywhere():
    for p in all_files():
        for ref in re.findall(r"ghcr\.io/[\w./-]+(?::[\w.-]+)?", p.read_text()):
            assert ref in (IMAGE, IMAGE_CUDA), f"{p.relative_to(DEPLOY)} names image {ref}"


def test_torch_pin_installed_before_gmfx_in_readmes():
    for p in DEPLOY.rglob("README.md"):
        lines = logical_lines(p.read_text())
        torch_at = [i for i, ln in enumerate(lines) if "pip install torch==2.13.0 --index-url" in ln]
        gmfx_at = [i for i, ln in enumerate(lines) if re.search(r"pip install (\.|/path/to/gmfx)(\s|$)", ln)]
        for g in gmfx_at:
            assert any(t < g for t in torch_at), f"{p.relative_to(DEPLOY)}: gmfx installed before torch"


# ---------------------------------------------------------------- credentials


CREDENTIAL_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",  # an AWS access key id
    r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+]{20,}",
    r"(?i)(AWS_[A-Z_]+)=(?![\"']?\$|\s)",  # a literal value assigned to an AWS_* variable
    r"(?i)\b(key|secret|token|password)\s*=\s*[\"']?[A-Za-z0-9/+]{16,}",
]


def test_no_literal_credentials_anywhere():
    for p in all_files():
        text = p.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            m = re.search(pattern, text)
            assert not m, f"{p.relative_to(DEPLOY)} holds what looks like a credential: {m.group(0)!r}"


def test_credential_scan_is_not_vacuous():
    assert re.search(CREDENTIAL_PATTERNS[0], "AKIAABCDEFGHIJKLMNOP")
    assert re.search(CREDENTIAL_PATTERNS[2], "--from-literal=AWS_SECRET_ACCESS_KEY=abc123")
    assert not re.search(CREDENTIAL_PATTERNS[2], '--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"')
