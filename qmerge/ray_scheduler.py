"""`qmerge matrix FILE --ray [ADDRESS]`: the matrix's builds as Ray tasks instead of local processes.

Each build is one task that runs exactly what the local scheduler runs, `python -m qmerge pipeline <build>.toml
--quiet --summary-json ...`, as a subprocess of the Ray worker: a crash or a leak stays in that process, and the
summary is the same file. The task asks Ray for `num_cpus` (the cluster's CPUs shared out over the builds, or over
`--jobs`), `memory` (the build's dry-run peak estimate) and one GPU when the build uses CUDA (merge.device "cuda",
or "auto" on a cluster that has GPUs); Ray places it where those are free. Builds are submitted in the matrix's
order (`order_for_sharing`), no more at once than the cluster's CPUs hold, the next when one finishes, as the local
scheduler starts them: given everything at once, Ray starts tasks of different resource shapes (each build asks for
its own memory) round-robin over the shapes, not in submission order, and can leave a long build to run last,
alone, with CPUs idle. The task's result is the exit code, the
summary and the log's tail; a task that raises or whose worker dies gives its build exit 1 with the error, and the
others run on (tasks are not retried: a build that crashed its worker once is reported, not re-run).

Address: ADDRESS, else $RAY_ADDRESS, else a local Ray instance started for this matrix (CPUs: this machine's;
memory: the matrix's budget; no dashboard) and shut down after it. A cluster's nodes must see work_dir and
output.dir at the same paths (a shared filesystem: the builds share stages through it) and have this qmerge
installed. Before anything runs: Ray missing is exit 2 naming the extra, an address that does not answer within
a few seconds is exit 2, a build that needs a GPU on a cluster without one is exit 2.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qmerge.errors import EXIT_GATE_REJECTED, EXIT_INTERNAL, EXIT_OK, BadInputError

CONNECT_TIMEOUT_S = 5.0
OBJECT_STORE_BYTES = 128 * 2**20  # results are a few KB of JSON; Ray's default would reserve 30 % of memory
EXTRA = "pip install 'qmerge[ray]'"


def import_ray():
    """The `ray` module, or exit 2 naming the extra."""
    try:
        import ray
    except ImportError:
        raise BadInputError("--ray needs Ray, which is not installed", fix=EXTRA) from None
    return ray


def resolve_address(address: str | None) -> str | None:
    """The cluster to use: the flag's address, else $RAY_ADDRESS, else None (start a local instance)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Exit 2 when `host:port` (or `ray://host:port`) does not accept a connection within `timeout` seconds:
    ray.init itself retries an unreachable address for minutes. "auto" is left to Ray, which fails at once."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise BadInputError(f"Ray address {address!r} is not host:port (or ray://host:port, or auto)",
                            fix="pass the head node's address, e.g. --ray 10.0.0.5:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise BadInputError(f"Ray address {address} is not reachable within {timeout:g} s ({e})",
                            fix="start the cluster (`ray start --head`) or fix the address; or pass --ray without "
                                "an address (and unset RAY_ADDRESS) to start a local Ray instance") from None


@contextmanager
def ray_session(address: str | None, num_cpus: int, memory: int, quiet: bool = True) -> Iterator[object]:
    """Connected to `address`, or a local Ray instance (`num_cpus` CPUs, `memory` bytes of task memory, no
    dashboard) that is shut down on exit. Yields the `ray` module."""
    ray = import_ray()
    if address is not None:
        check_reachable(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=not quiet, logging_level="WARNING")
    if address is None:
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES, _memory=memory,
                 **kwargs)
    else:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:
            raise BadInputError(f"cannot connect to Ray at {address}: {e}", fix="check the address") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def make_pipeline_task():
    """The Ray task: one build's pipeline as a subprocess of the worker. Made inside a function so that cloudpickle
    sends it to workers by value: a worker needs no qmerge on its import path (the subprocess needs qmerge, found via
    `qmerge_root` when that folder exists on the node, else as installed there)."""

    def pipeline_task(config: str, summary: str, log: str, threads: int, qmerge_root: str | None) -> dict:
        import os
        import subprocess
        import sys
        import time
        from pathlib import Path

        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if qmerge_root and (Path(qmerge_root) / "qmerge" / "__init__.py").is_file():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (qmerge_root, env.get("PYTHONPATH")) if p)
        Path(summary).unlink(missing_ok=True)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "qmerge", "pipeline", config, "--quiet", "--summary-json", summary]
        with open(log, "w") as out:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
        seconds = time.perf_counter() - start
        text = Path(log).read_text(errors="replace").strip().splitlines()
        written = Path(summary).read_text() if Path(summary).is_file() else None
        return {"exit_code": rc, "seconds": seconds, "summary": written, "log_tail": " / ".join(text[-3:]),
                "node": os.uname().nodename}

    return pipeline_task


def _largest_node(ray) -> dict[str, float]:
    """The most of each resource any one alive node offers."""
    best: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for k in ("CPU", "GPU", "memory"):
                best[k] = max(best.get(k, 0.0), float(node.get("Resources", {}).get(k, 0.0)))
    return best


def uses_cuda(config: Path, cluster_gpus: float) -> bool:
    """Whether the build takes a GPU: its merge on merge.device, and quantize and evaluate on CUDA wherever torch
    sees a device (`pick_device("auto")`), so a build with [quantize] or [gate] reserves one on a GPU cluster even
    with merge.device = "cpu" (it would otherwise use a GPU it had not reserved, or run on CPU where the local
    scheduler runs it on the GPU)."""
    from qmerge.config import load_config

    cfg = load_config(config)
    device = cfg.merge.device
    later = cfg.quantize is not None or cfg.gate is not None
    return device == "cuda" or (cluster_gpus > 0 and (device == "auto" or later))


def task_resources(builds: list, ray, jobs: int | None) -> dict[str, dict]:
    """Per build: num_cpus, memory, num_gpus. CPUs are the cluster's shared out over `jobs` (default: every
    build at once), at least 1 and at most one node's; memory is the estimate, capped at the largest node's (such a
    build then runs alone there, as the local scheduler runs an over-budget build alone). Exit 2 when a build needs
    a GPU and no node has one."""
    total = ray.cluster_resources()
    largest = _largest_node(ray)
    node_cpus = max(1, int(largest.get("CPU", 1)))
    cpus = max(1, min(node_cpus, int(total.get("CPU", 1)) // max(1, jobs or len(builds))))
    out = {}
    for b in builds:
        gpus = 1 if uses_cuda(b.config, total.get("GPU", 0.0)) else 0
        if gpus and largest.get("GPU", 0.0) < 1:
            raise BadInputError(f"build {b.name} uses CUDA (merge.device = \"cuda\") but no Ray node has a GPU",
                                path=b.config, fix="add a GPU node to the cluster, or set merge.device = \"auto\"")
        memory = min(b.estimate_bytes, int(largest.get("memory", b.estimate_bytes)))
        out[b.name] = {"num_cpus": cpus, "num_gpus": gpus, **({"memory": memory} if memory > 0 else {})}
    return out


def slots(resources: dict[str, dict], ray, jobs: int | None) -> int:
    """How many builds are in flight at once: as many as the cluster's CPUs hold at the builds' num_cpus (all
    equal), at most `jobs`."""
    cpus = max((r["num_cpus"] for r in resources.values()), default=1)
    fit = max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
    return min(fit, jobs) if jobs else fit


def pipeline_starter(ray, resources: dict[str, dict], quiet: bool):
    """start(build) -> the object ref of that build's pipeline task."""
    import qmerge

    root = str(Path(qmerge.__file__).resolve().parents[1])
    task = ray.remote(make_pipeline_task())

    def start(b):
        r = resources[b.name]
        ref = task.options(max_retries=0, name=f"qmerge {b.name}", **r).remote(
            str(b.config), str(b.config.with_suffix(".summary.json")), str(b.log), r["num_cpus"], root)
        if not quiet:
            print(f"qmerge matrix: submitted {b.name} to Ray ({r['num_cpus']} CPUs, "
                  f"{r.get('memory', 0) / 2**30:.2f} GiB{', 1 GPU' if r['num_gpus'] else ''})", file=sys.stderr,
                  flush=True)
        return ref

    return start


def run_in_order(ray, builds: list, start, slots: int, quiet: bool) -> None:
    """Submits `start(build)` for the builds in their order, at most `slots` in flight, the next as one finishes,
    and fills in each build (exit code, seconds, summary, error) as its task ends. A task that raised or whose
    worker died gives its build exit 1 with the error; the other builds are not affected."""
    waiting, refs = list(builds), {}
    while waiting or refs:
        while waiting and len(refs) < slots:
            b = waiting.pop(0)
            refs[start(b)] = b, time.perf_counter()
        done, _ = ray.wait(list(refs), num_returns=1)
        (ref,) = done
        b, started = refs.pop(ref)
        try:
            result = ray.get(ref)
        except Exception as e:  # RayTaskError, WorkerCrashedError, a lost node...: this build failed, not the matrix
            b.exit_code, b.seconds = EXIT_INTERNAL, time.perf_counter() - started
            lines = str(e).strip().splitlines()
            b.error = f"Ray task failed: {type(e).__name__}: {lines[-1] if lines else ''}"
        else:
            b.exit_code, b.seconds = result["exit_code"], result["seconds"]
            b.summary = json.loads(result["summary"]) if result["summary"] else {}
            if b.exit_code not in (EXIT_OK, EXIT_GATE_REJECTED) or not b.summary:
                b.error = result["log_tail"]
        if not quiet:
            print(f"qmerge matrix: {b.name} finished on Ray, exit {b.exit_code} ({b.seconds:.0f} s)", file=sys.stderr,
                  flush=True)


def run_builds_ray(builds: list, address: str | None, jobs: int | None, budget: int, quiet: bool) -> None:
    """Runs every build as a Ray task (see the module docstring) on the cluster at `address` (None: an instance
    started here)."""
    with ray_session(address, num_cpus=os.cpu_count() or 1, memory=budget, quiet=quiet) as ray:
        resources = task_resources(builds, ray, jobs)
        run_in_order(ray, builds, pipeline_starter(ray, resources, quiet), slots(resources, ray, jobs), quiet)
