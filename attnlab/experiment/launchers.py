"""Runs of a comparison as scheduler jobs, through submitit (the job toolbox vision research uses on SLURM).

`SubmititLauncher` is a `attnlab.experiment.runner.Launcher`: each run becomes one job with its own resources, its
folder for submitit's pickles and logs is ``OUT/submitit/``, and the job's id is recorded in the run's folder
(``job.json``). A job trains its run with `train_one`, exactly as `LocalPool` does, so a failed run leaves the same
``failure.txt``; a job that dies outside it (killed, out of memory, a node lost) has the scheduler's account written
there instead. Preemption and timeouts follow submitit's protocol: the engine catches the signal, writes a checkpoint
at the next step boundary and then hands the signal on to submitit's handler, where `TrainJob.checkpoint` hands back
the same run with ``resume=True`` and submitit requeues it, so it continues from that very step, with the engine's
exact resume. ``compare --resume`` waits for a recorded job still pending or
running instead of submitting the run again.

The SLURM path and the local one are the same code. What differs: the executor (``cluster="slurm"`` or ``"local"``
in `make_executor`; the default lets submitit pick SLURM where ``srun`` exists), which receives the ``slurm_``
parameters only on SLURM; `job_state` (``sacct`` through submitit, or the local controller's process); the job class
that re-attaches a recorded job in `SubmititLauncher._start`; and the torch threads of a job (`_threads`: a share of
this machine's cores locally, ``--cpus-per-run`` on a cluster).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AttnlabError, unknown_name
from ..io import read_json, write_json_atomic
from ..train.rundir import RunDir
from .runner import Job, record_failure, train_one
from .tasks import task_of

SUBMITIT_DIR = "submitit"
"""The comparison's folder for submitit's job files (pickles, stdout/stderr logs)."""
JOB_FILE = "job.json"
"""In a run's folder: the id of the job that trains it, and where submitit keeps that job's files."""
CLUSTERS = ("slurm", "local")
ACTIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED"}
)
"""SLURM job states in which a job will still train its run (anything else: it ended, or SLURM forgot it)."""
OWN_FLAGS = {"partition": "--partition", "time": "--timeout-min", "gpus_per_node": "--gpus-per-run"}
OWN_FLAGS |= {"cpus_per_task": "--cpus-per-run", "mem": "--mem-gb", "job_name": "(set per run)"}


def _submitit():
    try:
        import submitit
    except ImportError:
        raise AttnlabError("--launcher submitit needs submitit: pip install 'attnlab[cluster]'") from None
    return submitit


@dataclass(frozen=True)
class Resources:
    """What each run's job asks the scheduler for. ``gpus`` > 1 starts one task per GPU (DDP, as under torchrun);
    ``slurm`` holds any other parameter of submitit's SLURM executor (``--slurm-arg KEY=VALUE``)."""

    gpus: int = 0
    cpus: int | None = None
    partition: str | None = None
    timeout_min: int = 60
    mem_gb: float | None = None
    slurm: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for flag, value, least in (
            ("--gpus-per-run", self.gpus, 0),
            ("--cpus-per-run", self.cpus, 1),
            ("--timeout-min", self.timeout_min, 1),
            ("--mem-gb", self.mem_gb, 0),
        ):
            if value is not None and (isinstance(value, bool) or not value >= least):
                raise AttnlabError(f"{flag} must be ≥ {least}, got {value}")
        if self.partition is not None and not self.partition.strip():
            raise AttnlabError("--partition: empty name")
        valid = _submitit().SlurmExecutor._valid_parameters() if self.slurm else ()
        for key in self.slurm:
            if key in OWN_FLAGS:
                raise AttnlabError(f"--slurm-arg {key}: set it with {OWN_FLAGS[key]}")
            if key not in valid:
                raise unknown_name("--slurm-arg key (a parameter of submitit's SlurmExecutor)", key, valid)

    def parameters(self) -> dict[str, Any]:
        """Arguments of `submitit.AutoExecutor.update_parameters` (the SLURM-only ones prefixed ``slurm_``, which
        the local executor ignores)."""
        values: dict[str, Any] = {"timeout_min": self.timeout_min, "tasks_per_node": max(1, self.gpus), "nodes": 1}
        if self.gpus:
            values["gpus_per_node"] = self.gpus
        if self.cpus is not None:
            values["cpus_per_task"] = self.cpus
        if self.mem_gb is not None:
            values["mem_gb"] = self.mem_gb
        if self.partition is not None:
            values["slurm_partition"] = self.partition
        values.update({f"slurm_{key}": value for key, value in self.slurm.items()})
        return values


def make_executor(folder: Path, cluster: str | None, resources: Resources):
    """submitit's executor for ``cluster`` (None: SLURM where ``srun`` exists, else this machine), with ``resources``.
    This function and `job_state` are all that differ between a cluster and the local test."""
    submitit = _submitit()
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        executor.update_parameters(**resources.parameters())
    except (ValueError, NameError, AssertionError, RuntimeError) as e:
        raise AttnlabError(f"--launcher submitit: {str(e).splitlines()[0]}") from None
    return executor


@dataclass(frozen=True)
class TrainJob:
    """What a job runs: one run, trained by `train_one`. submitit calls `checkpoint` on preemption or timeout and
    requeues what it returns: the same run, resumed from its last checkpoint."""

    name: str
    cfg: dict[str, Any]
    resume: bool
    threads: int | None = None
    task: str = "classify"

    def __call__(self) -> dict[str, Any]:
        submitit = _submitit()
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one task per GPU: the engine joins the process group as under torchrun
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return train_one(self.task, self.cfg, self.resume, False, f"[{self.name}]")

    def checkpoint(self, *args: Any, **kwargs: Any):
        return _submitit().helpers.DelayedSubmission(dataclasses.replace(self, resume=True))


def job_state(record: dict[str, Any]) -> str:
    """The state of the job a run's ``job.json`` records (it will still train the run iff it is in `ACTIVE_STATES`).

    A local job's id is the pid of submitit's controller process: RUNNING while it lives, else ENDED. SLURM is asked
    through submitit (``sacct``): its own state name, or UNKNOWN when it cannot tell."""
    folder, job_id = Path(record["folder"]), str(record["job_id"])
    if record.get("cluster") == "local":
        try:
            command = Path(f"/proc/{int(job_id)}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{int(job_id)}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return "ENDED"
        alive = b"submitit.local._local" in command and str(folder).encode() in command and state not in "ZX"
        return "RUNNING" if alive else "ENDED"
    state = _submitit().SlurmJob(folder, job_id).watcher.get_state(job_id, mode="force")
    return (state.split() or ["UNKNOWN"])[0].upper()  # e.g. "CANCELLED by 1000"


def clear_lock_of_ended_job(run: Path, log: Callable[[str], None]) -> None:
    """Remove the run's lock left by a job that has ended for sure (killed with its node, say): the lock names a
    process on another host, which `RunDir.locked` must respect as long as anything might still hold it."""
    lock = RunDir(run).lock
    try:
        owner = read_json(lock)
    except AttnlabError:
        return  # no lock, or a half-written one, which the engine clears itself
    if owner.get("host") != socket.gethostname():
        lock.unlink(missing_ok=True)
        log(f"compare: {run}: removed the lock of {owner.get('host')}:{owner.get('pid')}, whose job has ended")


@dataclass
class SubmititLauncher:
    """Trains each run as one submitit job (see the module docstring); at most ``jobs`` queued or running at once
    (None: all)."""

    folder: Path
    resources: Resources = field(default_factory=Resources)
    cluster: str | None = None
    jobs: int | None = None
    log: Callable[[str], None] = print
    poll_s: float = 2.0

    def __post_init__(self) -> None:
        if self.cluster is not None and self.cluster not in CLUSTERS:
            raise unknown_name("--cluster", self.cluster, CLUSTERS)
        if self.cluster == "slurm" and shutil.which("srun") is None:
            raise AttnlabError("--cluster slurm: srun is not on PATH (run compare on a SLURM login node)")
        if self.jobs is not None and self.jobs < 1:
            raise AttnlabError(f"--jobs must be ≥ 1, got {self.jobs}")
        _submitit()
        self.folder = Path(self.folder).absolute()

    def results(self, jobs: Sequence[Job], resume: bool) -> Iterator[tuple[str, dict[str, Any]]]:
        executor = make_executor(self.folder, self.cluster, self.resources)
        threads = self._threads(executor, len(jobs))
        waiting = deque(jobs)
        running: dict[str, tuple[Path, Any]] = {}
        try:
            while waiting or running:
                while waiting and (self.jobs is None or len(running) < self.jobs):
                    name, cfg = waiting.popleft()
                    running[name] = (Path(cfg.out), self._start(executor, name, cfg, resume, threads))
                for name, (run, job) in list(running.items()):
                    if self._done(job):
                        del running[name]
                        yield name, self._outcome(run, job)
                if running:
                    time.sleep(self.poll_s)
        finally:
            if running:  # stopped before its jobs ended: the scheduler goes on with them
                self.log(f"compare: {len(running)} job(s) not collected; `compare --resume` collects them")

    def _start(self, executor, name: str, cfg, resume: bool, threads: int | None):
        """The job training ``cfg``: the one its ``job.json`` records if that is still pending or running (with
        ``resume``), else a new one."""
        record_file = Path(cfg.out) / JOB_FILE
        if resume and record_file.is_file():
            record = read_json(record_file)
            state = job_state(record)
            if state in ACTIVE_STATES:
                self.log(f"compare: {name}: job {record['job_id']} is {state}; collecting it, not resubmitting")
                submitit = _submitit()
                job_class = submitit.LocalJob if record.get("cluster") == "local" else submitit.SlurmJob
                return job_class(Path(record["folder"]), str(record["job_id"]))
            if state != "UNKNOWN":
                clear_lock_of_ended_job(Path(cfg.out), self.log)
        executor.update_parameters(name=f"attnlab:{name}")
        job = executor.submit(TrainJob(name, cfg.to_dict(), resume, threads, task_of(cfg).name))
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record = {"job_id": job.job_id, "cluster": executor.cluster, "folder": str(executor.folder)}
        write_json_atomic(record_file, record)
        self.log(f"compare: {name}: submitted job {job.job_id} ({executor.cluster})")
        return job

    def _threads(self, executor, count: int) -> int | None:
        """CPU threads of a job's training: its ``--cpus-per-run``; on this machine, else a share of its cores (as
        `LocalPool` gives its workers), so that jobs running side by side do not fight over them."""
        if self.resources.cpus is not None or executor.cluster != "local":
            return self.resources.cpus
        return max(1, (os.cpu_count() or 1) // max(1, min(self.jobs or count, count)))

    def _done(self, job) -> bool:
        if isinstance(job, _submitit().LocalJob) and job._process is None:  # submitted by an earlier compare
            return job_state({"cluster": "local", "job_id": job.job_id, "folder": self.folder}) == "ENDED"
        return job.done()

    def _outcome(self, run: Path, job) -> dict[str, Any]:
        """The run's summary, or ``{"failed": why}``; why is written to ``failure.txt`` if `train_one` could not."""
        try:
            return job.results()[0]  # a job of several tasks (one per GPU): rank 0 writes and answers
        except Exception as e:  # the job died outside `train_one`: killed, out of memory, node failure, ...
            text = str(e).strip() or type(e).__name__
            return record_failure(run, f"job {job.job_id}: {text.splitlines()[0]}", text)


def check_launcher_options(launcher: str, given: dict[str, Any]) -> None:
    """Refuse submitit's options with the local launcher (they would be silently ignored)."""
    if launcher != "submitit":
        for flag, value in given.items():
            if value not in (None, [], {}):
                raise AttnlabError(f"compare: {flag} needs --launcher submitit")
