"""`compare --launcher submitit` through submitit's local executor: the same results.csv as the local launcher, a
preempted job requeued by submitit's protocol and a killed one resubmitted both continue from their checkpoint to
the same weights as an uninterrupted run, ``--resume`` collects a job still running instead of submitting it again,
and bad launcher options are one-line errors. The SLURM path (same code, another executor) is checked as far as the
sbatch script it would submit."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

from tiny_runs import same_weights  # noqa: E402

from attnlab.cli import main  # noqa: E402
from attnlab.experiment import LocalPool, make_plan, run_compare  # noqa: E402
from attnlab.experiment.launchers import (  # noqa: E402
    ACTIVE_STATES,
    JOB_FILE,
    SUBMITIT_DIR,
    Resources,
    SubmititLauncher,
    TrainJob,
    job_state,
    make_executor,
)
from attnlab.report import build_report  # noqa: E402
from attnlab.train import train  # noqa: E402

SYNTH = {"shape": [1, 12, 12], "size": 256, "test_size": 64, "num_classes": 4}
RECIPE = {"epochs": 1, "batch_size": 64, "val_size": 64, "lr": 0.05}
TIMING = {"train_img_per_s", "train_time_s", "latency_ms", "wall_time_s", "device"}


def plan(models="resnet20,fmm_resnet20[merge=gate]", seeds=2, **recipe):
    return make_plan(
        models=models,
        datasets=["synthetic"],
        seeds=seeds,
        recipe={**RECIPE, **recipe},
        dataset_options=SYNTH,
        analyses=[],
    )


def launcher(out: Path, log=lambda _: None, **kwargs) -> SubmititLauncher:
    resources = Resources(timeout_min=10)
    return SubmititLauncher(out / SUBMITIT_DIR, resources, cluster="local", log=log, poll_s=0.2, **kwargs)


def results_csv(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def task_pid(controller: int, timeout: float = 300) -> int:
    """The training process of a local submitit job (the child of its controller, whose pid is the job id)."""
    children = Path(f"/proc/{controller}/task/{controller}/children")
    wait_for(lambda: children.read_text().split(), "the job's task to start", timeout)
    return int(children.read_text().split()[0])


def job_ids(out: Path) -> dict[str, str]:
    return {p.parent.relative_to(out).as_posix(): json.loads(p.read_text())["job_id"] for p in out.rglob(JOB_FILE)}


# --------------------------------------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gpus-per-run", "1"], "compare: --gpus-per-run needs --launcher submitit"),
        (["--slurm-arg", "qos=high"], "compare: --slurm-arg needs --launcher submitit"),
        (["--launcher", "slurm"], "argument --launcher: invalid choice: 'slurm'"),
        (["--launcher", "submitit", "--cluster", "pbs"], "unknown --cluster 'pbs'"),
        (["--launcher", "submitit", "--cluster", "slurm"], "--cluster slurm: srun is not on PATH"),
        (["--launcher", "submitit", "--timeout-min", "0"], "--timeout-min must be ≥ 1, got 0"),
        (["--launcher", "submitit", "--gpus-per-run", "-1"], "--gpus-per-run must be ≥ 0, got -1"),
        (["--launcher", "submitit", "--jobs", "0"], "--jobs must be ≥ 1, got 0"),
        (["--launcher", "submitit", "--slurm-arg", "partition=gpu"], "--slurm-arg partition: set it with --partition"),
        (["--launcher", "submitit", "--slurm-arg", "qso=high"], "did you mean qos"),
    ],
)
def test_bad_launcher_options_are_one_line_errors(tmp_path, capsys, flags, message):
    if "srun" in message and shutil.which("srun"):
        pytest.skip("this machine has SLURM")
    out = tmp_path / "out"
    args = ["compare", "--models", "resnet20", "--seeds", "1", "--dataset", "synthetic", "--out", str(out)]
    assert main(args + flags) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # refused before anything was written


def test_the_slurm_script_asks_for_each_runs_resources(tmp_path, monkeypatch):
    """The SLURM executor gets the same parameters as the local one; its sbatch script carries them."""
    fake_command(tmp_path, monkeypatch, "srun", "exit 1")  # submitit's SLURM executor looks for srun
    resources = Resources(gpus=2, cpus=8, partition="gpu", timeout_min=30, mem_gb=32, slurm={"qos": "high"})
    executor = make_executor(tmp_path, "slurm", resources)
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=2", "--ntasks-per-node=2", "--cpus-per-task=8", "--time=30"):
        assert f"#SBATCH {line}" in script, line
    assert "#SBATCH --mem=32GB" in script and "#SBATCH --qos=high" in script
    assert "--signal=USR2@" in script  # the preemption/timeout signal that triggers TrainJob.checkpoint
    local = make_executor(tmp_path, "local", resources)  # SLURM-only parameters do not reach the local executor
    assert local.parameters["timeout_min"] == 30 and "partition" not in local.parameters


def fake_command(tmp_path: Path, monkeypatch, name: str, script: str) -> None:
    """Put a shell script called ``name`` first on PATH (a stand-in for a SLURM command this machine lacks)."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{script}\n")
    (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_a_recorded_slurm_job_is_alive_while_sacct_says_so(tmp_path, monkeypatch):
    states = {"101": "PENDING", "102": "RUNNING", "103": "REQUEUED", "104": "COMPLETED", "105": "CANCELLED by 7"}
    answer = "\n".join(f"echo '{i}|{state}|node1'" for i, state in states.items())
    fake_command(tmp_path, monkeypatch, "sacct", f"echo 'JobID|State|NodeList'\n{answer}")
    alive = {i: job_state({"cluster": "slurm", "job_id": i, "folder": str(tmp_path)}) for i in states}
    assert alive == {"101": "PENDING", "102": "RUNNING", "103": "REQUEUED", "104": "COMPLETED", "105": "CANCELLED"}
    assert {i for i, state in alive.items() if state in ACTIVE_STATES} == {"101", "102", "103"}


def test_a_requeued_job_resumes_and_a_dead_job_is_not_waited_for(tmp_path):
    job = TrainJob("r", {"out": str(tmp_path)}, resume=False, threads=1)
    again = job.checkpoint()
    assert again.function == TrainJob("r", {"out": str(tmp_path)}, resume=True, threads=1)
    assert job_state({"cluster": "local", "job_id": os.getpid(), "folder": str(tmp_path)}) == "ENDED"  # not a job


# -------------------------------------------------------------------------------------------------------------- grids


def test_submitit_grid_gives_the_local_launchers_results(tmp_path):
    """2 models × 1 seed, 1 epoch: the same results.csv (timing aside) through submitit jobs as trained here."""
    grid = plan(seeds=1)
    local, jobs = tmp_path / "local", tmp_path / "submitit"
    run_compare(grid, local, launcher=LocalPool(log=lambda _: None), log=lambda _: None)
    build_report(grid, local)
    outcome = run_compare(grid, jobs, launcher=launcher(jobs, jobs=2), log=lambda _: None)
    build_report(grid, jobs)
    assert len(outcome.trained) == 2 and not outcome.failed
    assert results_csv(jobs) == results_csv(local)
    assert len(job_ids(jobs)) == 2 and (jobs / SUBMITIT_DIR).is_dir()


def reference(tmp_path: Path, seed: int, epochs: int) -> Path:
    """resnet20's run of seed ``seed`` in `plan`, trained here without interruption; its folder."""
    grid = plan(models="resnet20", seeds=seed + 1, epochs=epochs)
    cfg = grid.run_config("synthetic", grid.entries[0], seed, tmp_path / "reference")
    train(cfg, log=lambda _: None)
    return Path(cfg.out)


@pytest.mark.slow
def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    """submitit's preemption signal (USR2, what SLURM sends before it preempts or times out a job) after the first
    epoch: the engine checkpoints at the next step, then TrainJob.checkpoint has the run requeued with
    ``resume=True``; it continues from that step and ends with the uninterrupted run's weights."""
    out, grid = tmp_path / "preempted", plan(models="resnet20", seeds=1, epochs=3)
    cfg = grid.run_config("synthetic", grid.entries[0], 0, out)
    job = make_executor(out / SUBMITIT_DIR, "local", Resources()).submit(TrainJob("r", cfg.to_dict(), False, 1))
    wait_for(lambda: (Path(cfg.out) / "checkpoints/epoch-0001.json").exists(), "the first checkpoint")
    os.kill(task_pid(int(job.job_id)), signal.SIGUSR2)
    summary = job.result()
    log = job.stdout() + (job.stderr() or "")
    assert "Requeued job" in log and "resuming" in log and "at step" in log, log
    assert summary["epochs"] == 3 and not (Path(cfg.out) / "failure.txt").exists()
    assert same_weights(Path(cfg.out) / "model.safetensors", reference(tmp_path, 0, 3) / "model.safetensors")


@pytest.mark.slow
def test_killed_job_resumes_from_checkpoint_and_running_job_is_collected(tmp_path):
    """A comparison dies; one job was SIGKILLed after its first epoch, another is still running (stopped, so that it
    surely is). ``--resume`` resubmits the dead one, which continues from its checkpoint to the uninterrupted run's
    weights, and collects the running one without submitting it again."""
    out, grid = tmp_path / "killed", plan(models="resnet20", seeds=2, epochs=3)
    dead, alive = "runs/synthetic/resnet20/seed0", "runs/synthetic/resnet20/seed1"
    first = launcher(out).results(
        [(name, grid.run_config("synthetic", grid.entries[0], seed, out)) for seed, name in enumerate((dead, alive))],
        resume=False,
    )
    ids: dict[str, str] = {}

    def stop_and_kill() -> None:
        wait_for(lambda: len(job_ids(out)) == 2, "both jobs")
        ids.update(job_ids(out))
        os.kill(task_pid(int(ids[alive])), signal.SIGSTOP)
        wait_for(lambda: (out / dead / "checkpoints/epoch-0001.json").exists(), "the first checkpoint")
        os.kill(task_pid(int(ids[dead])), signal.SIGKILL)

    killer = threading.Thread(target=stop_and_kill)
    killer.start()
    name, summary = next(first)  # submits both jobs, then waits for one to end: the killed one
    killer.join()
    first.close()  # the comparison dies; the stopped job lives on
    assert name == dead and "failed" in summary and (out / dead / "failure.txt").exists()

    lock = out / dead / ".lock"  # as if its node had died with it: a lock the engine must respect
    lock.write_text(json.dumps({"pid": 1, "host": "node-lost-with-the-job"}))

    def log(line: str) -> None:
        if "collecting it" in line:
            os.kill(task_pid(int(ids[alive])), signal.SIGCONT)

    lines: list[str] = []
    try:
        outcome = run_compare(grid, out, resume=True, launcher=launcher(out, lambda s: (lines.append(s), log(s))))
    finally:
        with contextlib.suppress(OSError, AssertionError):
            os.kill(task_pid(int(ids[alive]), timeout=0), signal.SIGCONT)  # never leave a stopped job behind
    assert sorted(outcome.trained) == [dead, alive] and not outcome.failed, lines
    assert f"compare: {alive}: job {ids[alive]} is RUNNING; collecting it, not resubmitting" in lines
    assert any("removed the lock of node-lost-with-the-job:1, whose job has ended" in line for line in lines)
    after = job_ids(out)
    assert after[alive] == ids[alive] and after[dead] != ids[dead]
    assert "after epoch" in (out / SUBMITIT_DIR / f"{after[dead]}_0_log.out").read_text()
    assert not (out / dead / "failure.txt").exists()
    assert same_weights(out / dead / "model.safetensors", reference(tmp_path, 0, 3) / "model.safetensors")


@pytest.mark.slow
def test_a_job_of_several_tasks_trains_one_run_with_ddp(tmp_path):
    """``gpus`` > 1 starts one task per GPU; the tasks join one process group as under torchrun (gloo on this CPU
    machine: the GPU count only sets the task count here) and rank 0 writes the run."""
    out, grid = tmp_path / "ddp", plan(models="resnet20", seeds=1)
    resources = Resources(gpus=2, cpus=1, timeout_min=10)
    ddp = SubmititLauncher(out / SUBMITIT_DIR, resources, cluster="local", log=lambda _: None, poll_s=0.2)
    outcome = run_compare(grid, out, launcher=ddp, log=lambda _: None)
    assert outcome.trained == ["runs/synthetic/resnet20/seed0"] and not outcome.failed
    summary = json.loads((out / "runs/synthetic/resnet20/seed0/summary.json").read_text())
    assert summary["world_size"] == 2
