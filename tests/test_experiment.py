"""`attnlab compare` and `attnlab report` end to end on tiny synthetic runs: the CSV files and the report equal the
runs' own summary.json files, resume never retrains or duplicates, a killed comparison resumes cleanly, parallel
jobs give the same numbers, and the report is rebuilt byte for byte."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from tiny_runs import forked

from attnlab.analysis import headlines
from attnlab.cli import main
from attnlab.errors import AttnlabError
from attnlab.experiment import (
    INCONCLUSIVE,
    PRESETS,
    AnalysisSpec,
    Plan,
    load_preset,
    make_plan,
    parse_entries,
    parse_entry,
    preset_of,
)
from attnlab.experiment import run_compare as run_runs
from attnlab.experiment.plan import check_buildable, parse_seeds
from attnlab.experiment.presets import CLUTTERED, FMM_GATED, FMM_PLAIN, check_analyses, on_networks_it_reads
from attnlab.experiment.results import RESULT_FIELDS, collect_results
from attnlab.experiment.tasks import task_of
from attnlab.experiment.verdicts import HOLDS, Evidence, decide_claims
from attnlab.report import build_report
from attnlab.stats import describe, paired_test

SYNTH = {"shape": [1, 12, 12], "size": 256, "test_size": 64, "num_classes": 4}
RECIPE = {"epochs": 1, "batch_size": 64, "val_size": 64, "lr": 0.05}
MODELS = "resnet20,fmm_resnet20[merge=gate]"
TIMING = {"train_img_per_s", "train_time_s", "latency_ms", "wall_time_s", "device"}


def tiny_plan(**overrides) -> Plan:
    values = dict(models=MODELS, datasets=["synthetic"], seeds=2, recipe=RECIPE, dataset_options=SYNTH)
    values.update(overrides)
    return make_plan(**values)


def quiet(_: str) -> None:
    pass


def run_compare(plan: Plan, out: Path, **kwargs):
    """What `attnlab compare` does: train and analyse (`attnlab.experiment.run_compare`), then write the report."""
    outcome = run_runs(plan, out, **kwargs)
    build_report(plan, out)
    return outcome


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summaries(out: Path) -> dict[str, dict]:
    return {
        p.parent.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.glob("runs/*/*/*/summary.json")
    }


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    outcome = run_compare(tiny_plan(), out, log=quiet)
    assert len(outcome.trained) == 4 and not outcome.skipped and not outcome.failed
    return out


# -------------------------------------------------------------------------------------------------------------- entries


def test_entries_parse_options_and_names():
    e = parse_entry("fmm_resnet20[merge=gate]")
    assert (e.name, e.model, e.model_kwargs, e.train) == (
        "fmm_resnet20[merge=gate]",
        "fmm_resnet20",
        {"merge": "gate"},
        {},
    )
    assert e.slug == "fmm_resnet20-merge=gate"
    e = parse_entry("cram_resnet20[cram.equivariance=0.1,attn_where=last,epochs=3]")
    assert e.train == {"mechanisms": {"cram": {"equivariance": 0.1}}, "epochs": 3}
    assert (
        e.model_kwargs == {"attn_where": "last"}
        and e.slug == "cram_resnet20-cram.equivariance=0.1-attn_where=last-epochs=3"
    )
    names = [x.name for x in parse_entries("resnet20, fmm_resnet20[merge=gate,zero_init_last=false],se_resnet20")]
    assert names == ["resnet20", "fmm_resnet20[merge=gate,zero_init_last=false]", "se_resnet20"]
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("0,4,7") == [0, 4, 7] and parse_seeds(2) == [0, 1]
    e = parse_entry("fmm_resnet20[merge=gate_shortcut,merge_args.residual_bias=1,post_act=false]")
    assert e.model_kwargs == {"merge": "gate_shortcut", "merge_args": {"residual_bias": 1}, "post_act": False}
    assert e.slug == "fmm_resnet20-merge=gate_shortcut-merge_args.residual_bias=1-post_act=false"
    braces = parse_entry("fmm_resnet20[merge=mul_bn,merge_args={residual_bias: 1, shortcut_bias: 1}]")
    assert braces.model_kwargs["merge_args"] == {"residual_bias": 1, "shortcut_bias": 1}
    with pytest.raises(AttnlabError, match="not an option of a model option"):
        parse_entry("resnet20[epochs.x=1]")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("resnt20", "unknown model 'resnt20'; did you mean resnet20"),
        ("resnet20,resnet20", "given twice"),
        ("resnet20[merge=gate", "unbalanced"),
        ("resnet20[seed=1]", "'seed' is set by the comparison"),
        ("resnet20[merge]", "not key=value"),
        ("resnet20[]", "empty brackets"),
    ],
)
def test_bad_entries_are_one_line_errors(text, message):
    with pytest.raises(AttnlabError, match=message.replace("[", r"\[")):
        parse_entries(text)


def test_train_and_detect_take_an_entry_as_their_model(tmp_path, capsys):
    """A report names a run by its entry; `attnlab train --model ENTRY` (and `detect train`) trains that entry's
    network and recipe, the flags given beside it winning."""
    from attnlab.cli import build_parser
    from attnlab.cli.common import config_from_args
    from attnlab.detection.config import DetectConfig
    from attnlab.train.config import TrainConfig

    parse = build_parser().parse_args
    entry = "fmm_resnet20[merge=mul_bn,merge_args.residual_bias=1,merge_args.shortcut_bias=1,cram.equivariance=0.1]"
    cfg = config_from_args(parse(["train", "--model", entry, "--model-arg", "post_act=false"]), TrainConfig)
    assert cfg.model == "fmm_resnet20" and cfg.mechanisms == {"cram": {"equivariance": 0.1}}
    assert cfg.model_kwargs == {
        "merge": "mul_bn",
        "merge_args": {"residual_bias": 1, "shortcut_bias": 1},
        "post_act": False,
    }
    argv = ["train", "--model", entry, "--mechanism", "cram.equivariance=0", "--model-arg", "merge=gate"]
    cfg = config_from_args(parse(argv), TrainConfig)
    assert cfg.mechanisms == {"cram": {"equivariance": 0}} and cfg.model_kwargs["merge"] == "gate"  # the flags win
    cfg = config_from_args(parse(["detect", "train", "--model", "se_resnet20[attn_where=last,epochs=2]"]), DetectConfig)
    assert (cfg.model, cfg.model_kwargs, cfg.epochs) == ("se_resnet20", {"attn_where": "last"}, 2)
    assert main(["train", "--model", "resnet20[merge", "--out", str(tmp_path / "run")]) != 0
    assert not (tmp_path / "run").exists()
    assert "expected NAME or NAME[key=value" in capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_plans_are_refused():
    with pytest.raises(AttnlabError, match="unknown baseline entry 'vgg'"):
        tiny_plan(baseline="vgg")
    with pytest.raises(AttnlabError, match="fixes the models"):
        make_plan(preset="quick", models="resnet20")
    with pytest.raises(AttnlabError, match="unknown preset 'quik'; did you mean quick"):
        make_plan(preset="quik")
    with pytest.raises(AttnlabError, match="epochs must be ≥ 1"):
        tiny_plan(recipe={"epochs": 0})
    with pytest.raises(AttnlabError, match=r"model entry 'fmm_resnet20\[merge=sum\]': unknown merge 'sum'"):
        tiny_plan(models="resnet20,fmm_resnet20[merge=sum]")
    with pytest.raises(AttnlabError, match="unknown analysis 'smoothnes'; did you mean smoothness"):
        tiny_plan(analyses=["smoothnes"])
    with pytest.raises(AttnlabError, match="analysis smoothness: unknown option 'pair'; did you mean pairs"):
        check_analyses([AnalysisSpec("smoothness", options={"pair": 3})])
    with pytest.raises(AttnlabError, match="--preset cram runs on cluttered-fashion-mnist; --dataset fashion-mnist is"):
        make_plan(preset="cram", datasets=["fashion-mnist"])
    for name in PRESETS:  # every preset names real models, options and analyses
        assert make_plan(preset=name).preset == name


def test_a_preset_can_run_on_one_of_its_datasets():
    """Each dataset of a preset can get its own budget (one --out per dataset)."""
    assert make_plan(preset="fmm", datasets=["cluttered-fashion-mnist"]).datasets == ["cluttered-fashion-mnist"]
    assert make_plan(preset="fmm").datasets == ["fashion-mnist", "cluttered-fashion-mnist"]


def test_an_analysis_of_attention_runs_on_the_networks_that_have_it():
    """consistency reads gates, localization spatial attention: asked of every entry, each runs on the entries that
    have what it reads; an entry named without it, or no entry with it, is refused before any training."""
    models = "resnet20,se_resnet20,spatial_resnet20,fmm_resnet20"
    plan = tiny_plan(models=models, analyses=["consistency", "localization", "smoothness"])
    assert [(s.name, s.entries) for s in plan.analyses] == [
        ("consistency", ("se_resnet20", "spatial_resnet20")),
        ("localization", ("spatial_resnet20",)),
        ("smoothness", ()),  # every network
    ]
    with pytest.raises(AttnlabError, match=r"^analysis consistency: resnet20, fmm_resnet20 have no attention gates"):
        tiny_plan(models="resnet20,fmm_resnet20", analyses=["consistency"])
    named = AnalysisSpec("localization", ("se_resnet20", "spatial_resnet20"))
    with pytest.raises(AttnlabError, match=r"^analysis localization: se_resnet20 has no spatial attention \(spatial,"):
        on_networks_it_reads(named, check_buildable(parse_entries(models)))


def test_a_failing_run_is_recorded_and_the_others_finish(tmp_path):
    plan = tiny_plan(models="resnet20,resnet20[lr=1e12]", seeds=1)
    outcome = run_compare(plan, tmp_path, log=quiet)
    assert outcome.trained == ["runs/synthetic/resnet20/seed0"]
    assert outcome.failed == ["runs/synthetic/resnet20-lr=1e12/seed0"]
    failure = (tmp_path / outcome.failed[0] / "failure.txt").read_text()
    assert failure.startswith("non-finite")
    report = (tmp_path / "report.md").read_text()
    assert f"**Failed**: `{outcome.failed[0]}`: {failure.splitlines()[0]}" in report
    assert [r["model"] for r in read_csv(tmp_path / "results.csv")] == ["resnet20"]


# -------------------------------------------------------------------------------------------------------------- compare


def test_results_equal_the_runs_summaries(compared):
    rows = read_csv(compared / "results.csv")
    runs = summaries(compared)
    assert [(r["model"], r["seed"]) for r in rows] == [
        ("resnet20", "0"),
        ("resnet20", "1"),
        ("fmm_resnet20[merge=gate]", "0"),
        ("fmm_resnet20[merge=gate]", "1"),
    ]
    for row in rows:
        s = runs[row["run"]]
        for key in RESULT_FIELDS:
            if key in s and key != "model":
                assert type(s[key])(row[key]) == s[key], key  # floats round-trip exactly
        assert s["model"] == row["arch"]
    config = (compared / "runs/synthetic/fmm_resnet20-merge=gate/seed0/config.yaml").read_text()
    assert "merge: gate" in config


def test_summary_equals_statistics_of_the_runs(compared):
    runs = summaries(compared)
    acc = {
        m: [runs[f"runs/synthetic/{slug}/seed{s}"]["test_acc"] for s in (0, 1)]
        for m, slug in (("resnet20", "resnet20"), ("fmm_resnet20[merge=gate]", "fmm_resnet20-merge=gate"))
    }
    table = {r["model"]: r for r in read_csv(compared / "summary.csv")}
    for model, values in acc.items():
        d = describe(values)
        assert float(table[model]["test_acc_mean"]) == d.mean
        assert float(table[model]["test_acc_std"]) == d.std
        assert float(table[model]["test_acc_ci_low"]) == d.ci_low
    fmm = table["fmm_resnet20[merge=gate]"]
    test = paired_test(acc["fmm_resnet20[merge=gate]"], acc["resnet20"])
    assert float(fmm["delta_vs_baseline"]) == test.mean_diff and fmm["shared_seeds"] == "2"
    assert fmm["t_p"] == str(test.t_p)


def test_report_shows_the_runs_numbers(compared):
    report = (compared / "report.md").read_text()
    for s in summaries(compared).values():
        assert f"| {100 * s['val_acc']:.2f} | {100 * s['test_acc']:.2f} | {s['test_loss']:.4f} |" in report
    table = {r["model"]: r for r in read_csv(compared / "summary.csv")}
    mean, std = float(table["resnet20"]["test_acc_mean"]), float(table["resnet20"]["test_acc_std"])
    assert f"| 2 | {100 * mean:.2f} ± {100 * std:.2f} |" in report
    assert "**Runs finished**: 4 of 4" in report and "**Seeds**: 0, 1 (2)" in report
    assert "Small budget" not in report  # only presets that declare it
    html = (compared / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and 'src="figures/' not in html
    for png in (compared / "figures").glob("*.png"):
        assert png.stat().st_size < 100_000


def test_report_command_rebuilds_the_same_files(compared, capsys):
    before = {
        name: (compared / name).read_bytes() for name in ("report.md", "report.html", "results.csv", "summary.csv")
    }
    for name in before:
        (compared / name).unlink()
    assert main(["report", str(compared)]) == 0
    assert "report.md" in capsys.readouterr().out
    for name, content in before.items():
        assert (compared / name).read_bytes() == content, name
    assert main(["report", str(compared / "runs")]) == 2
    assert "no compare.json here" in capsys.readouterr().err


def test_resume_skips_finished_runs_and_refuses_without_it(compared):
    before = {p: p.read_bytes() for p in compared.glob("runs/*/*/*/summary.json")}
    outcome = run_compare(tiny_plan(), compared, resume=True, log=quiet)
    assert outcome.trained == [] and len(outcome.skipped) == 4
    assert {p: p.read_bytes() for p in compared.glob("runs/*/*/*/summary.json")} == before
    assert len(read_csv(compared / "results.csv")) == 4
    with pytest.raises(AttnlabError, match="holds an earlier comparison; pass --resume"):
        run_compare(tiny_plan(), compared, log=quiet)
    with pytest.raises(AttnlabError, match="finished with epochs=1 but this comparison asks for 2"):
        run_compare(tiny_plan(recipe={**RECIPE, "epochs": 2}), compared, resume=True, log=quiet)


def test_a_finished_run_that_skipped_no_step_serves_either_nonfinite_setting(compared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(compared, copy)
    skipping = tiny_plan(recipe={**RECIPE, "nonfinite": "skip"})  # the runs were trained with nonfinite: stop
    outcome = run_compare(skipping, copy, resume=True, log=quiet)
    assert outcome.trained == [] and len(outcome.skipped) == 4
    metrics = copy / "runs/synthetic/resnet20/seed1/metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[-1]["skipped_steps"] = 2  # as if two steps had been undone: not the run a "stop" config computes
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(AttnlabError, match="seed1: finished with nonfinite='stop' but this comparison asks for 'skip'"):
        run_compare(skipping, copy, resume=True, log=quiet)


def test_a_summary_without_its_score_is_refused_in_one_line(compared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(compared, copy)
    summary = copy / "runs/synthetic/resnet20/seed0/summary.json"
    summary.write_text(json.dumps({k: v for k, v in json.loads(summary.read_text()).items() if k != "test_acc"}))
    with pytest.raises(
        AttnlabError, match=r"seed0/summary.json: not a finished classify run's summary \(no test_acc\)"
    ):
        collect_results(tiny_plan(), copy)


def test_resume_adds_seeds_and_trains_only_the_new_runs(compared, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(compared, out)
    outcome = run_compare(tiny_plan(seeds=3), out, resume=True, log=quiet)
    assert sorted(outcome.trained) == ["runs/synthetic/fmm_resnet20-merge=gate/seed2", "runs/synthetic/resnet20/seed2"]
    rows = read_csv(out / "results.csv")
    assert len(rows) == 6 == len({(r["model"], r["seed"]) for r in rows})


def pid_alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet counts as dead)."""
    try:
        return "\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
    except (OSError, IndexError):
        return False


def lock_holders(out: Path) -> list[int]:
    holders = []
    for lock in out.glob("runs/*/*/*/.lock"):
        try:
            holders.append(json.loads(lock.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pass  # half-written by a worker killed while taking it
    return holders


KILL_AFTER_FIRST_RUN = """
import os, signal, sys
import attnlab.experiment.runner as runner
from attnlab.cli import main

results = runner.LocalPool.results


def results_then_die(self, jobs, resume):  # SIGKILL right after the first finished run is recorded
    for item in results(self, jobs, resume):
        yield item
        os.kill(os.getpid(), signal.SIGKILL)


runner.LocalPool.results = results_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_ends_a_comparison_and_its_workers_at_once(tmp_path):
    """Ctrl-C (SIGINT to the process group) while two workers train and a third run waits: the comparison exits with
    one line, and no worker goes on to train the queued run (which its pool had already handed to a worker)."""
    out = tmp_path / "interrupted"
    args = ["compare", "--models", MODELS, "--seeds", "2", "--dataset", "synthetic"]
    args += [f"--data-arg={k}={json.dumps(v)}" for k, v in SYNTH.items()]
    args += ["--jobs", "2", "--epochs", "100000", "--batch-size", "64", "--val-size", "64", "--out", str(out)]
    proc = forked(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, new_session=True)
    deadline = time.time() + 300
    while len(list(out.glob("runs/*/*/*/metrics.jsonl"))) < 2:  # both workers past their first epoch
        assert proc.poll() is None and time.time() < deadline, "the comparison ended before its interruption"
        time.sleep(0.05)
    holders = lock_holders(out)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except TimeoutError:  # a hung comparison must not leave its workers training after the test
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    err = proc.stderr
    assert proc.returncode == 130 and err.strip().endswith("attnlab: interrupted"), err
    assert "Traceback" not in err
    deadline = time.time() + 30
    while any(map(pid_alive, holders)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(pid_alive, holders)), "a worker outlived the interrupted comparison"
    assert len(list(out.glob("runs/*/*/*"))) == 2, "a queued run started after the interruption"


@pytest.mark.parametrize("jobs", [1, 2])
def test_killed_compare_resumes_without_duplicates_or_gaps(tmp_path, jobs):
    """SIGKILL the comparison right after its first finished run; with workers, they die with it (no orphan keeps a
    lock). The kill comes at that point whatever the machine's load (no timing involved)."""
    out = tmp_path / "killed"
    args = ["compare", "--models", MODELS, "--seeds", "2", "--dataset", "synthetic", "--jobs", str(jobs)]
    args += [f"--data-arg={k}={json.dumps(v)}" for k, v in {**SYNTH, "size": 512}.items()]
    args += ["--epochs", "3", "--batch-size", "64", "--val-size", "64", "--lr", "0.05", "--out", str(out)]
    proc = forked(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, prelude=KILL_AFTER_FIRST_RUN)
    assert proc.wait(timeout=600) == -signal.SIGKILL, proc.stderr
    first = out / "runs/synthetic/resnet20/seed0/summary.json"
    if jobs > 1 and sys.platform.startswith("linux"):
        holders = lock_holders(out)
        deadline = time.time() + 60
        while any(map(pid_alive, holders)) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(map(pid_alive, holders)), "a worker outlived the killed comparison"
    finished = list(out.glob("runs/*/*/*/summary.json"))
    assert (jobs > 1 or first.exists()) and 1 <= len(finished) < 4, proc.stderr
    kept = {p: p.read_bytes() for p in finished}

    plan = Plan.load(out)
    outcome = run_compare(plan, out, resume=True, log=quiet)
    assert len(outcome.skipped) == len(finished) and len(outcome.trained) == 4 - len(finished)
    assert all(p.read_bytes() == content for p, content in kept.items())
    rows = read_csv(out / "results.csv")
    assert sorted((r["model"], r["seed"]) for r in rows) == sorted(
        (m, s) for m in ("resnet20", "fmm_resnet20[merge=gate]") for s in ("0", "1")
    )


def test_parallel_jobs_give_the_same_numbers(compared, tmp_path):
    out = tmp_path / "jobs"
    outcome = run_compare(tiny_plan(), out, jobs=2, log=quiet)
    assert len(outcome.trained) == 4
    serial, parallel = summaries(compared), summaries(out)
    assert serial.keys() == parallel.keys()
    for run, s in serial.items():
        assert {k: v for k, v in s.items() if k not in TIMING} == {
            k: v for k, v in parallel[run].items() if k not in TIMING
        }, run


def test_cli_compare_records_the_command(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["compare", "--models", "resnet20", "--seeds", "1", "--dataset", "synthetic", "--epochs", "1"]
    args += ["--batch-size", "64", "--val-size", "64", "--out", str(out)]
    args += [f"--data-arg={k}={json.dumps(v)}" for k, v in SYNTH.items()]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    plan = json.loads((out / "compare.json").read_text())
    expected = "attnlab compare --models resnet20 --dataset synthetic --seeds 1 --val-size 64 --epochs 1"
    assert plan["command"].startswith(expected)
    assert plan["recipe"] == {"val_size": 64, "epochs": 1, "batch_size": 64}
    for refused in (["--model", "se_resnet20"], ["--seed", "1"], ["--model-arg", "merge=gate"], ["--in-chans", "1"]):
        assert main([*args, *refused]) == 2
        assert f"unrecognized arguments: {' '.join(refused)}" in capsys.readouterr().err


def _flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _subparser(parser, *path: str):
    for name in path:
        parser = next(a for a in parser._actions if a.choices and name in a.choices).choices[name]
    return parser


def test_train_and_detect_train_have_a_flag_for_every_config_field_and_compare_lists_only_what_it_takes():
    from attnlab.cli import build_parser
    from attnlab.detection import DetectConfig
    from attnlab.train import TrainConfig
    from attnlab.train.entry import PER_RUN_FIELDS

    parser = build_parser()
    for path, config in ((["train"], TrainConfig), (["detect", "train"], DetectConfig)):
        sub = _subparser(parser, *path)
        dests = {a.dest for a in sub._actions}
        assert {f.name for f in dataclasses.fields(config)} <= dests, path
    assert {"--eval-batch-size", "--nesterov", "--no-nesterov", "--mechanism"} <= _flags(_subparser(parser, "train"))
    assert {"--nesterov", "--nonfinite", "--mechanism"} <= _flags(_subparser(parser, "detect", "train"))
    compare = _subparser(parser, "compare")
    assert not {"--model", "--seed", "--model-arg", "--in-chans", "--amp"} & _flags(compare)
    assert not {a.dest for a in compare._actions} & (set(PER_RUN_FIELDS) - {"dataset", "out"})
    help_text = compare.format_help()
    assert "--models" in help_text and "--model " not in help_text and "--seed " not in help_text


# -------------------------------------------------------------------------------------------------------------- presets


def test_small_preset_says_so_first_and_gives_verdicts(tmp_path):
    """The report of a preset, built from runs trained here on synthetic data standing in for the preset's dataset."""
    plan = make_plan(preset="quick", recipe={**RECIPE, "subset": None}, seeds=2)
    fake = Plan(
        entries=plan.entries,
        datasets=["synthetic"],
        seeds=plan.seeds,
        recipe=plan.recipe,
        dataset_options={"synthetic": SYNTH},
        preset="quick",
    )
    trained = [fake.entry("resnet20"), fake.entry("fmm_resnet20")]  # the rest stay missing
    small = Plan(**{**fake.__dict__, "entries": trained})
    run_compare(small, tmp_path, log=quiet)
    build_report(fake, tmp_path)
    report = (tmp_path / "report.md").read_text()
    head = report.splitlines()[:4]
    assert any("Small budget: these numbers are not evidence" in line for line in head)
    assert "## Verdicts" in report and f"**{INCONCLUSIVE}**" in report
    assert "only 2 shared seed(s); a verdict needs at least 3" in report
    assert "**Runs finished**: 4 of 12" in report and "**Not finished**" in report


def test_an_analysis_goes_on_without_a_failed_run(compared, tmp_path):
    from attnlab.experiment.runner import CompareOutcome, _analyse_all

    out = tmp_path / "partial"
    shutil.copytree(compared, out)
    (out / "runs/synthetic/fmm_resnet20-merge=gate/seed1/summary.json").unlink()  # as if it had failed
    plan = tiny_plan()
    options = {"images": 16, "pairs": 2, "steps": 3, "draws": 1, "jacobian_images": 2, "sigmas": [0.1]}
    plan.analyses = [AnalysisSpec("smoothness", options=options)]
    said = []
    _analyse_all(plan, out, said.append, CompareOutcome())
    saved = [json.loads((out / f"analyses/synthetic/seed{s}/smoothness.json").read_text()) for s in "01"]
    headline = [headlines(result) for result in saved]
    assert list(headline[0]) == ["resnet20", "fmm_resnet20[merge=gate]"] and list(headline[1]) == ["resnet20"]
    assert "compare: smoothness on synthetic seed 1: fmm_resnet20[merge=gate] not finished; analysing the others" in (
        said
    )


def test_analyses_run_once_per_seed_and_reach_the_report(compared, tmp_path):
    out = tmp_path / "analysed"
    shutil.copytree(compared, out)
    plan = tiny_plan()
    options = {"images": 24, "pairs": 4, "steps": 5, "draws": 1, "jacobian_images": 4, "sigmas": [0.1]}
    plan.analyses = [AnalysisSpec("smoothness", options=options)]
    outcome = run_compare(plan, out, resume=True, log=quiet)
    assert outcome.trained == [] and outcome.analysed == ["smoothness/synthetic/seed0", "smoothness/synthetic/seed1"]
    results = [json.loads((out / f"analyses/synthetic/seed{s}/smoothness.json").read_text()) for s in (0, 1)]
    assert list(headlines(results[0])) == ["resnet20", "fmm_resnet20[merge=gate]"]
    assert run_compare(plan, out, resume=True, log=quiet).analysed == []  # done, same spec: not rerun
    tv = [headlines(r)["resnet20"]["tv_same"] for r in results]
    report = (out / "report.md").read_text()
    assert "### smoothness on synthetic" in report
    assert f"| tv_same | {sum(tv) / 2:.4g} (±{abs(tv[0] - tv[1]) / 2:.2g}) |" in report
    assert "![smoothness: smoothness_curves.png](analyses/synthetic/seed0/smoothness_curves.png)" in report
    plan.analyses = [AnalysisSpec("smoothness", options={**options, "images": 16})]
    assert len(run_compare(plan, out, resume=True, log=quiet).analysed) == 2  # options changed: rerun


def test_a_claim_preset_run_below_its_budget_says_so_first(tmp_path):
    from attnlab.report.document import changes_from_preset

    own = make_plan(preset="cram")
    assert changes_from_preset(own, PRESETS["cram"]) == []
    plan = make_plan(
        preset="fmm",
        datasets=["cluttered-fashion-mnist"],
        seeds=3,
        recipe={"epochs": 5, "subset": 4000, "device": "cpu"},
        analysis_images=None,
    )
    assert changes_from_preset(plan, PRESETS["fmm"]) == [
        "seeds 5 → 3",
        "datasets fashion-mnist, cluttered-fashion-mnist → cluttered-fashion-mnist",
        "epochs 15 → 5",
        "subset all → 4000",
    ]  # the device says where it ran, not how much
    smaller = make_plan(preset="consistency", analysis_images=300)
    assert changes_from_preset(smaller, PRESETS["consistency"]) == ["consistency images 1000 → 300"]
    build_report(plan, tmp_path)  # no run finished yet: the report still says what it is
    head = (tmp_path / "report.md").read_text().splitlines()[:4]
    assert any("**Not the preset's `full` budget**: seeds 5 → 3" in line for line in head)


def test_the_cpu_budget_of_a_preset_sets_seeds_recipe_and_each_datasets_own_settings(tmp_path):
    from attnlab.report.document import changes_from_preset

    plan = make_plan(preset="fmm", budget="cpu")
    assert (plan.budget, plan.seeds, plan.recipe["precision"], plan.recipe["epochs"]) == ("cpu", [0, 1, 2], "bf16", 15)
    assert plan.dataset_recipe == {"cluttered-fashion-mnist": PRESETS["fmm"].budgets["cpu"].dataset_recipe[CLUTTERED]}
    cluttered = plan.run_config(CLUTTERED, plan.entries[0], 0, tmp_path)
    fashion = plan.run_config("fashion-mnist", plan.entries[0], 0, tmp_path)
    assert cluttered.epochs >= 10 and cluttered.subset and fashion.subset is None and fashion.nonfinite == "skip"
    assert cluttered.dataset_options == PRESETS["fmm"].budgets["cpu"].dataset_options[CLUTTERED]
    assert changes_from_preset(plan, PRESETS["fmm"]) == []
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    faster = make_plan(preset="fmm", budget="cpu", recipe={"epochs": 2})  # a flag beats the per-dataset budget too
    assert faster.run_config(CLUTTERED, faster.entries[0], 0, tmp_path).epochs == 2
    assert "epochs (cluttered-fashion-mnist) 10 → 2" in changes_from_preset(faster, PRESETS["fmm"])
    consistency = make_plan(preset="consistency", budget="cpu")
    assert [s.options["images"] for s in consistency.analyses] == [1000]
    with pytest.raises(AttnlabError, match="unknown budget of preset fmm 'gpu'"):
        make_plan(preset="fmm", budget="gpu")
    with pytest.raises(AttnlabError, match="--budget cpu needs a --preset"):
        make_plan(models="resnet20", datasets=["synthetic"], budget="cpu")


def test_every_claim_preset_has_a_cpu_budget_with_the_converged_settings():
    for name, preset in PRESETS.items():
        if preset.small_budget:
            continue
        cpu = preset.budget("cpu")
        if preset.task == "detect" or name == "families":  # sized by measuring (MEASUREMENTS.md), not issue 12's rules
            assert cpu.seeds >= 3, name
            continue
        assert cpu.seeds >= 3 and cpu.recipe["precision"] == "bf16" and cpu.recipe["epochs"] >= 15, name
        assert cpu.recipe["subset"] is None, name  # the whole Fashion-MNIST training split
        if CLUTTERED in preset.datasets:
            assert cpu.dataset_recipe[CLUTTERED]["epochs"] >= 10, name


def test_the_families_preset_builds_each_family_at_the_datas_size_and_decides_per_family():
    """Every entry (own SE, swapped for ECA, CBAM, CRAM, removed) is a network that takes 1×28×28 images, with the
    attention the entry names; the claims pair each family with itself and decide on made-up accuracies."""
    from attnlab.analysis.sites import gate_sites
    from attnlab.models import create_model

    preset = PRESETS["families"]
    cpu, entries = preset.budget("cpu"), parse_entries(list(preset.models))  # make_plan would build them all again
    assert cpu.recipe["precision"] == "fp32" and cpu.seeds == 3 and preset.datasets == ("fashion-mnist",)
    kinds = {}
    for entry in entries:
        model = create_model(entry.model, num_classes=10, in_chans=1, image_size=28, **entry.model_kwargs)
        kinds[entry.name] = {type(s.module).__name__ for s in gate_sites(model)}
    assert kinds["tinynet_e"] == {"SqueezeExcite"} and kinds["tinynet_e[attention=none]"] == set()
    assert kinds["mobilenetv3_small_050[attention=eca]"] == {"EcaModule"}
    assert kinds["mobilenetv3_small_050[attention=cram]"] == {"CRAM"}
    assert set(preset.analyses[0].entries) == {name for name, found in kinds.items() if found}

    rows = [  # each family: own SE 1 point above none; a swap 0.5 below the family's SE
        {"dataset": "fashion-mnist", "model": e.name, "seed": s, "test_acc": acc + 0.0002 * s * i}
        for i, e in enumerate(entries)
        for s in range(3)
        for acc in [0.90 + 0.01 * ("[" not in e.name) - 0.005 * ("[attention=none]" not in e.name)]
    ]
    decided = {c.key: v for c, v in decide_claims(preset.claims, Evidence(rows, {}), ["fashion-mnist"])}
    own = decided["own-attention"]
    assert [v.claim for v in own] == [
        "mobilenetv3_small_050 beats mobilenetv3_small_050[attention=none] on fashion-mnist",
        "tinynet_e beats tinynet_e[attention=none] on fashion-mnist",
    ]
    assert {v.verdict for v in own} == {HOLDS}
    assert len(decided["swap-own"]) == 6 and {v.verdict for v in decided["swap-own"]} == {"does not hold"}
    assert "inconclusive" in decided["consistency"][0].verdict  # no analysis results given

    study = load_preset(Path(__file__).resolve().parent.parent / "studies" / "families-imagenet.yaml")
    assert [c.key for c in study.claims] == [c.key for c in preset.claims] and study.recipe["pretrained"] is True
    assert [e.model_kwargs for e in parse_entries(list(study.models))] == [e.model_kwargs for e in entries]
    assert study.budget("smoke").dataset_options == study.dataset_options  # a budget's options replace the study's


def test_fmm_claims_keep_plain_and_gated_products_apart():
    preset = PRESETS["fmm"]
    assert [c.key for c in preset.claims] == ["fmm-plain", "fmm-gated"]
    entries = {e.name: e for e in parse_entries(list(preset.models))}
    merges = {name: e.model_kwargs.get("merge") for name, e in entries.items()}
    assert {merges[m] for m in FMM_PLAIN} == {"mul", "mul_bn"}
    assert {merges[m] for m in FMM_GATED} == {"gate", "gate_shortcut", "mul_residual"}
    biased = entries["fmm_resnet20[merge=mul_bn,merge_args.residual_bias=1,merge_args.shortcut_bias=1]"]
    assert biased.model_kwargs["merge_args"] == {"residual_bias": 1, "shortcut_bias": 1}
    assert "aw_cbam_resnet20" in PRESETS["aw"].models and "cbam_resnet20" in PRESETS["aw"].models
    keys = [v.claim for v in PRESETS["cram"].claims[0].rule(Evidence([], {}), [CLUTTERED])]
    assert f"the equivariance term makes cram_resnet20 more accurate on {CLUTTERED}" in keys


def test_a_plan_names_its_task_and_builds_that_tasks_run_configs(tmp_path):
    from attnlab.detection import DetectConfig
    from attnlab.train import TrainConfig

    classify = make_plan(models="resnet20,se_resnet20[label_smoothing=0.1]", datasets=["synthetic"], seeds=1)
    assert "task" not in classify.to_dict()  # plans written before tasks existed read back unchanged
    assert isinstance(classify.run_config("synthetic", classify.entries[1], 0, tmp_path), TrainConfig)
    detect = make_plan(
        models="resnet20,aw_resnet20[fpn_channels=32]", datasets=["detection-fashion-mnist"], seeds=1, task="detect"
    )
    cfg = detect.run_config("detection-fashion-mnist", detect.entries[1], 0, tmp_path)
    assert isinstance(cfg, DetectConfig) and cfg.fpn_channels == 32  # a DetectConfig field is a recipe key
    again = Plan.from_dict(json.loads(json.dumps(detect.to_dict())))
    assert again.task == "detect" and again.entries == detect.entries
    with pytest.raises(AttnlabError, match="unknown task 'segment'"):
        Plan.from_dict({**detect.to_dict(), "task": "segment"})
    with pytest.raises(AttnlabError, match="label_smoothing"):  # a classifier setting a detector does not have
        make_plan(
            models="resnet20", datasets=["detection-fashion-mnist"], recipe={"label_smoothing": 0.1}, task="detect"
        )
    with pytest.raises(TypeError, match="no task trains a dict"):
        task_of({"model": "resnet20"})


AW_STUDY = """\
name: my-aw
description: AW-convolution alone and on top of SE and CBAM.
models: [resnet20, aw_resnet20, se_resnet20, aw_se_resnet20, cbam_resnet20, aw_cbam_resnet20]
datasets: [fashion-mnist]
seeds: 5
recipe: {epochs: 15, subset: null}
claims:
  - claim: weight_attention_adds
    pairs: [[aw_resnet20, resnet20], [aw_se_resnet20, se_resnet20], [aw_cbam_resnet20, cbam_resnet20]]
budgets:
  cpu:
    seeds: 3
    recipe: {epochs: 15, subset: null, precision: bf16}
    analysis_images: {consistency: 1000}
"""


def test_a_study_file_is_a_preset_with_the_same_fields(tmp_path):
    """The ``aw`` preset written as a YAML study file plans the same comparison, and decides the same claims."""
    path = tmp_path / "aw.yaml"
    path.write_text(AW_STUDY)
    study, aw = load_preset(path), PRESETS["aw"]
    assert load_preset("aw") is aw and study.name == "my-aw"
    assert (study.models, study.datasets, study.seeds, study.recipe) == (aw.models, aw.datasets, aw.seeds, aw.recipe)
    assert study.budget("cpu").seeds == 3 and study.budget("cpu").recipe == aw.budget("cpu").recipe
    evidence = Evidence([], {})
    assert [v.claim for v in study.claims[0].rule(evidence, aw.datasets)] == [
        v.claim for v in aw.claims[0].rule(evidence, aw.datasets)
    ]
    assert study.claims[0].statement == aw.claims[0].statement
    plan, builtin = make_plan(preset=str(path), budget="cpu"), make_plan(preset="aw", budget="cpu")
    assert plan.preset == str(path) and preset_of(plan).name == "my-aw"
    assert (plan.entries, plan.seeds, plan.recipe) == (builtin.entries, builtin.seeds, builtin.recipe)
    assert preset_of(Plan.from_dict({**plan.to_dict(), "preset": str(tmp_path / "moved.yaml")})) is None
    detection = "  - {claim: weight_attention_adds, metric: test_ap, pairs: [[aw_resnet20, resnet20]]}\n"
    path.write_text(AW_STUDY.replace("name: my-aw\n", "").replace("claims:\n", "claims:\n" + detection))
    study = load_preset(path)
    assert study.name == "aw" and "detection AP" in study.claims[0].statement  # the file's name; test_ap by name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("seeds: 5", "seeds: five"), r"aw.yaml: seeds must be a 64-bit integer, got 'five'"),
        (("seeds: 5", "seed: 5"), r"aw.yaml: unknown field 'seed'; did you mean seeds"),
        (("datasets: [fashion-mnist]\n", ""), r"aw.yaml: missing datasets"),
        (("claim: weight_attention_adds", "claim: weight_attention_add"), r"\(weight_attention_add\): unknown claim"),
        (("    pairs:", "    pair:"), r"claims\[0\] \(weight_attention_adds\): unknown argument 'pair'; did you mean"),
        (("[aw_resnet20, resnet20], ", "aw_resnet20, "), r"claims\[0\] \(weight_attention_adds\): pairs must be"),
        (("  cpu:", "  full:"), r"aw.yaml: budgets: 'full' is the study's own settings"),
        (("    pairs:", "    metric: test_accuracy\n    pairs:"), r"unknown metric 'test_accuracy'; did you"),
        (("    seeds: 3", "    seeds: 3.5"), r"aw.yaml: budgets.cpu: seeds must be a 64-bit integer, got 3.5"),
        (("recipe: {epochs: 15, subset: null}", "recipe: [15]"), r"aw.yaml: recipe must be"),
    ],
)
def test_a_bad_study_file_is_one_line(tmp_path, change, message):
    path = tmp_path / "aw.yaml"
    assert change[0] in AW_STUDY
    path.write_text(AW_STUDY.replace(*change, 1))
    with pytest.raises(AttnlabError, match=message):
        load_preset(path)


def test_a_preset_is_a_name_or_a_study_file(tmp_path):
    with pytest.raises(AttnlabError, match=r"unknown preset 'fmn'; did you mean fmm\?.*study file ending .yaml"):
        load_preset("fmn")
    with pytest.raises(AttnlabError, match="study file .*nowhere.yaml: not found"):
        make_plan(preset=str(tmp_path / "nowhere.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(AttnlabError, match="list.yaml: a config must be a mapping"):
        load_preset(tmp_path / "list.yaml")


def test_a_two_seed_custom_compare_says_custom_and_not_evidence(compared):
    report = (compared / "report.md").read_text()
    assert "**Budget**: custom (no preset): 1 epoch(s) on the full training set, 2 seed(s)" in report
    assert "**2 seed(s): not evidence.**" in report and "smallest p with 2 paired seed(s) is 0.5" in report
    fmm = next(line for line in report.splitlines() if line.startswith("| fmm_resnet20"))
    assert "†" in fmm and "† cannot be significant" in report  # Wilcoxon at n = 2
    assert "val_size 64" in report and "augment on" in report and "subset all" in report
    for repr_ in ("None", "True", "False", "{", "['"):
        assert repr_ not in report.split("## Budget")[1].split("##")[0], repr_  # no Python reprs in the budget


def test_latency_across_runs_is_the_median_with_the_range():
    from attnlab.report.document import latency_across_runs, wilcoxon_floor

    rows = [
        {"dataset": "d", "model": "cbam", "latency_ms": 8.81},
        {"dataset": "d", "model": "cbam", "latency_ms": 508.92},
        {"dataset": "d", "model": "cbam", "latency_ms": 9.5},
        {"dataset": "e", "model": "cbam", "latency_ms": 1.0},
        {"dataset": "d", "model": "se", "latency_ms": None},
    ]
    assert latency_across_runs(rows, "d") == {"cbam": (9.5, 8.81, 508.92)}
    assert [wilcoxon_floor(n) for n in (2, 5, 6)] == [0.5, 0.0625, 0.03125]
