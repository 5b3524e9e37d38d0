"""`--help` of `imglora` and `imglora-data`: train's flags in sections with their defaults, help on every argument."""

import argparse
import subprocess
import sys
from collections import Counter

import pytest

from datasets_tools.cli import build_parser as data_parser
from imglora.cli import build_parser
from imglora.config import FIELDS, HELP_GROUPS, load_config

TITLES = ["data", "model", "adapter", "optimisation", "speed and memory", "output", "sampling", "resume"]


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one help per line: no wrapping inside the strings looked for


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def all_parsers(parser: argparse.ArgumentParser, path: str):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in action._choices_actions}
            for name, child in action.choices.items():
                assert helps.get(name), f"{path} {name} has no help line"
                yield from all_parsers(child, f"{path} {name}")


def test_train_help_has_the_sections_in_order_and_no_double_no():
    text = train_parser().format_help()
    positions = [text.index(f"\n{title}:\n") for title in TITLES]
    assert positions == sorted(positions)
    assert "--no-no" not in text
    assert "examples:\n  # " in text and "--resume latest" in text and "--config run.toml" in text


def test_train_help_in_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "imglora.cli", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "\nspeed and memory:\n" in r.stdout and "--no-no" not in r.stdout


def test_every_field_is_in_exactly_one_group():
    assert list(HELP_GROUPS) == TITLES
    seen = Counter()
    for group in train_parser()._action_groups:
        dests = [a.dest for a in group._group_actions if a.dest in FIELDS]
        assert not dests or group.title in TITLES, f"{dests} outside the sections, in {group.title!r}"
        seen.update(dests)
    assert set(seen) == set(FIELDS), f"in no section: {set(FIELDS) - set(seen)}"
    assert max(seen.values()) == 1, f"in two sections: {[name for name, n in seen.items() if n > 1]}"


def test_every_argument_of_both_programs_has_help():
    for path, parser in [*all_parsers(build_parser(), "imglora"), *all_parsers(data_parser(), "imglora-data")]:
        parser.format_help()  # every %(default)s expands
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), f"{path} {action.option_strings or action.dest}: no help"
            assert not any(s.startswith("--no-no") for s in action.option_strings)
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in action.help, f"{path} {action.option_strings or action.dest}: default not shown"


def test_train_help_shows_every_default():
    parser = train_parser()
    text = parser.format_help()
    by_dest = {a.dest: a for a in parser._actions}
    for name, f in FIELDS.items():
        action = by_dest[name]
        assert action.default is None, f"{name}: a parser default would override the TOML"
        if f.default is None:
            assert any(w in action.help for w in ("default", "required", "needed")), f"{name}: None not explained"
            continue
        shown = ("on" if f.default else "off") if isinstance(f.default, bool) else str(f.default)
        assert f"(default: {shown})" in action.help, name
        assert f"(default: {shown})" in text
    assert "(default: 16)" in by_dest["rank"].help and "(default: 0.0001)" in by_dest["lr"].help
    assert "(default: cross-attn)" in by_dest["targets"].help and "(default: lora)" in by_dest["name"].help


def test_targets_help_says_what_each_preset_adapts():
    help_ = next(a.help for a in train_parser()._actions if a.dest == "targets")
    for preset in ("cross-attn:", "attn:", "transformer:", "conv: transformer plus the ResNet"):
        assert preset in help_
    assert "feed-forward" in help_ and "attn2" in help_


def test_no_bools_are_plain_switches_and_the_others_pairs():
    parser = build_parser()
    assert parser.parse_args(["train"]).no_upscale is None
    assert parser.parse_args(["train", "--no-upscale"]).no_upscale is True
    args = parser.parse_args(["train", "--no-cache-text", "--flip"])
    assert args.cache_text is False and args.flip is True


def test_toml_keys_still_load_and_flags_override_them(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "photos"\nrank = 8\ntargets = "conv"\nno_upscale = true\ncache_text = false\n'
                    'sample-prompts = ["a", "b"]\nlr = 5e-5\n', encoding="utf-8")
    cfg = load_config(build_parser().parse_args(["train", "--config", str(toml), "--rank", "4"]))
    assert (cfg.data, cfg.rank, cfg.targets, cfg.no_upscale, cfg.cache_text) == ("photos", 4, "conv", True, False)
    assert cfg.sample_prompts == ["a", "b"] and cfg.lr == 5e-5 and cfg.alpha is None and cfg.batch_size == 4


def test_the_readme_lists_every_training_option_in_its_group():
    """README's "Every option, by group" has one row per TrainConfig field, under its --help section."""
    from pathlib import Path

    from imglora.config import _flag

    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    table = readme[readme.index("#### Every option, by group"):]
    for title, names in HELP_GROUPS.items():
        section = table[table.index(f"**{title}**"):]
        section = section[:section.index("\n\n", section.index("|---"))]
        for name in names:
            flag = FIELDS[name].metadata.get("flag") or _flag(name)
            assert f"| `{flag}`" in section, f"{flag} is not in the README's {title} table"
