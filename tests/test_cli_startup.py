"""``import attnlab`` and ``attnlab --help`` import neither torch nor timm; attnlab's names still reach timm."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from attnlab.cli import COMMANDS, build_parser


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_attnlab_and_top_level_help_import_no_torch():
    code = (
        "import sys, attnlab\n"
        "from attnlab.cli import build_parser\n"
        "build_parser(None).format_help()\n"
        "build_parser('compare').format_help()\n"
        "print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))"
    )
    assert _python(code) == "[]"


@pytest.mark.parametrize(
    "code",
    [
        "import attnlab, timm",  # timm after attnlab: the import hook registers the names
        "import timm, attnlab",  # timm before: registered at once
        "import attnlab.layers, timm",  # timm imported by attnlab itself, half-way through its own import
        "import attnlab; attnlab.create_attn; import timm",  # a lazy name first
    ],
)
def test_attnlab_names_work_in_timm_after_import_attnlab(code):
    out = _python(f"{code}\nimport timm\nprint(type(timm.create_model('cram_resnet20')).__name__)")
    assert out == "CifarResNet"


def test_lazy_names_are_the_modules_own():
    import attnlab
    from attnlab.models import create_model

    assert attnlab.create_model is create_model
    assert "create_attn" in dir(attnlab)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        attnlab.nope  # noqa: B018


def _summaries(parser: argparse.ArgumentParser) -> dict[str, str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.help for a in sub._choices_actions}


def test_each_subcommand_summary_without_its_group_is_the_groups_own():
    assert _summaries(build_parser(None)) == _summaries(build_parser("*")) == {n: s for n, (_, s) in COMMANDS.items()}


def test_a_command_builds_its_own_group_and_names_the_others():
    parser = build_parser("models")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "--flops" in sub.choices["models"].format_help()
    assert "--checkpoint" not in sub.choices["analyze"].format_help()  # a stub: name and summary only


def test_compare_help_names_every_preset():
    from attnlab.cli.compare import PRESET_NAMES
    from attnlab.experiment.presets import PRESETS

    assert sorted(PRESET_NAMES) == sorted(PRESETS)
