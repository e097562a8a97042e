"""`kolm compile --config FILE`: a flag given on the command line wins over the file, the file
over the defaults; --print-config writes a file that reads back as the same config; a bad file
is exit 2 naming the file and the line; the gate's range is 0..100."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kolm_ray.cli import cli
from kolm_ray.compile import parse_gate, prepare, CompileConfig
from kolm_ray.compile_config import (
    CompileSettings, absolute, args_overrides, flag_overrides, load_settings, settings_from, to_yaml,
)
from kolm_ray.errors import InputError

RUNNER = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "routing"

CONFIG = """\
# the routing example
task_file: task.txt
examples: examples.jsonl
eval: holdout.jsonl
base: qwen-2.5-3b-instruct
gate: K=60
name: routing
sample:
  k: 2
fit:
  epochs: 10
  lr: 3e-3
  target_modules: [q_proj, v_proj]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "cfg" / "compile.yaml"
    p.parent.mkdir()
    p.write_text(CONFIG)
    return p


def _print(*args: str) -> str:
    res = RUNNER.invoke(cli, ["compile", *args, "--print-config"])
    assert res.exit_code == 0, res.output
    return res.stdout


def test_the_file_loads_into_the_typed_configs_with_paths_relative_to_it(config):
    s = load_settings(config)
    assert s.examples == config.parent / "examples.jsonl" and s.task_file == config.parent / "task.txt"
    assert (s.gate, s.name, s.base) == (60.0, "routing", "qwen-2.5-3b-instruct")
    assert s.sample.samples_per_input == 2 and s.fit.epochs == 10 and s.fit.lr == 3e-3 and s.fit.target_modules == ("q_proj", "v_proj")
    assert s.teacher.model == CompileSettings().teacher.model  # untouched sections keep their defaults


def test_a_flag_given_on_the_command_line_overrides_the_file_and_a_default_does_not(config):
    text = _print("--config", str(config), "--epochs", "4", "--gate", "K=70", "--k", "3")
    s = load_settings_text(text, config.parent)
    assert (s.fit.epochs, s.gate, s.sample.samples_per_input) == (4, 70.0, 3)
    assert s.fit.lr == 3e-3  # only in the file: kept
    # --lr's default (2e-4) was not given: the file's value stands.
    assert s.fit.lr != CompileSettings().fit.lr
    # A flag given with its default value still wins: it was given.
    assert load_settings_text(_print("--config", str(config), "--epochs", "3"), config.parent).fit.epochs == 3


def load_settings_text(text: str, where: Path) -> CompileSettings:
    p = where / "printed.yaml"
    p.write_text(text)
    return load_settings(p)


def test_print_config_round_trips_into_the_same_config(config, tmp_path):
    text = _print("--config", str(config), "--workers", "2", "--max-cost", "3.5", "--batch")
    printed = tmp_path / "elsewhere" / "printed.yaml"
    printed.parent.mkdir()
    printed.write_text(text)
    again = load_settings(printed)
    assert again == absolute(load_settings(config, flag_overrides({"workers": 2, "max_cost_usd": 3.5, "batch": True})))
    assert to_yaml(again) == text
    # Each field carries its one-line help from the pydantic config.
    assert "  epochs: 10  # Passes over the distillation set." in text
    assert text.count("\n") > 60 and "holder" not in text


def test_print_config_without_a_file_is_a_template_of_every_field():
    text = _print()
    assert "examples: null" in text and "fit:" in text and "teacher:" in text
    assert settings_from({}) == load_settings_text_tmp(text)


def load_settings_text_tmp(text: str) -> CompileSettings:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return load_settings_text(text, Path(d))


@pytest.mark.parametrize("body, line, words", [
    ("examples: x.jsonl\nfit:\n  epochs: 3\n  epoch: 4\n", 4, "fit.epoch: unknown field"),
    ("examples: x.jsonl\nnonsense: 1\n", 2, "nonsense: unknown field"),
    ("examples: x.jsonl\nfit:\n  lr: -1\n", 3, "fit.lr: Input should be greater than 0"),
    ("examples: x.jsonl\ngate: K=101\n", 2, "gate:"),
    ("examples: [x.jsonl\nfit: 1\n", 2, "not valid YAML"),
    ("- examples\n", 1, "a compile config is a mapping"),
    ("examples: x.jsonl\nquota:\n  holder: me\n", 2, "quota.holder is set by the compile queue"),
])
def test_a_bad_file_exits_2_naming_the_file_and_line(tmp_path, body, line, words):
    p = tmp_path / "compile.yaml"
    p.write_text(body)
    res = RUNNER.invoke(cli, ["compile", "--config", str(p)])
    assert res.exit_code == 2, res.output
    assert f"{p}:{line}: " in res.stderr and words in res.stderr, res.stderr


def test_a_missing_file_and_missing_required_fields_exit_2(tmp_path, monkeypatch):
    res = RUNNER.invoke(cli, ["compile", "--config", str(tmp_path / "none.yaml")])
    assert res.exit_code == 2 and "none.yaml: config file not found" in res.stderr
    res = RUNNER.invoke(cli, ["compile", "route it", "--examples", "x.jsonl"])
    assert res.exit_code == 2 and "missing --eval, --base" in res.stderr, res.output


def test_a_bad_flag_value_over_a_file_names_the_flag(config):
    res = RUNNER.invoke(cli, ["compile", "--config", str(config), "--gate", "K=101"])
    assert res.exit_code == 2 and "invalid --gate 'K=101'" in res.stderr


def test_the_deprecated_argument_list_reads_as_the_same_config(config):
    args = ["--task-file", "task.txt", "--examples", "examples.jsonl", "--eval", "holdout.jsonl",
            "--base", "qwen-2.5-3b-instruct", "--gate", "K=60", "--name", "routing", "--k", "2",
            "--epochs", "10", "--lr", "3e-3", "--target-modules", "q_proj,v_proj"]
    assert settings_from({}, args_overrides(args), base_dir=config.parent) == load_settings(config)
    with pytest.raises(InputError, match="unknown compile argument '--epoch'"):
        args_overrides(["--epoch", "3"])


# ----- the gate's range is 0..100 ------------------------------------------------------------


@pytest.mark.parametrize("text, k", [("K=0", 0.0), ("K=88", 88.0), ("k = 100", 100.0), ("K=99.5", 99.5)])
def test_a_gate_from_0_to_100_is_accepted(text, k):
    assert parse_gate(text) == k


@pytest.mark.parametrize("text", ["K=101", "K=100.5", "K=-1", "88", "K=abc"])
def test_a_gate_outside_0_to_100_is_refused(text):
    with pytest.raises(InputError, match="K-score from 0 to 100"):
        parse_gate(text)


def test_prepare_refuses_a_gate_past_100(tiny_base, tmp_path):
    cfg = CompileConfig(task="Route it.", examples=EXAMPLE / "examples.jsonl", holdout=EXAMPLE / "holdout.jsonl",
                        base=str(tiny_base), name="routing", gate=101.0, store=str(tmp_path / "s"), work_dir=tmp_path)
    with pytest.raises(InputError, match="outside 0..100"):
        prepare(cfg)


# ----- the nightly runs the library, not the CLI ---------------------------------------------


def test_the_nightly_does_not_import_the_cli():
    code = "import sys, kolm_ray.publish.nightly; print([m for m in sys.modules if m.startswith('kolm_ray.cli')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    source = (ROOT / "kolm_ray" / "publish" / "nightly.py").read_text()
    assert "kolm_ray.cli" not in source and "standalone_mode" not in source


def test_a_nightly_spec_takes_a_mapping_a_file_or_the_deprecated_argument_list(config, tmp_path):
    from kolm_ray.publish.nightly import NightlySpec, compile_settings, load_specs

    expected = load_settings(config).model_copy(update={"name": "nightly-routing"})
    spec_path = config.parent / "spec.json"
    as_mapping = NightlySpec(name="nightly-routing", env="prod", compile={
        "task_file": "task.txt", "examples": "examples.jsonl", "eval": "holdout.jsonl", "base": "qwen-2.5-3b-instruct",
        "gate": 60, "sample": {"k": 2}, "fit": {"epochs": 10, "lr": 3e-3, "target_modules": ["q_proj", "v_proj"]}})
    as_file = NightlySpec(name="nightly-routing", env="prod", compile="compile.yaml")
    as_args = NightlySpec(name="nightly-routing", env="prod", compile=[
        "--task-file", "task.txt", "--examples", "examples.jsonl", "--eval", "holdout.jsonl", "--base",
        "qwen-2.5-3b-instruct", "--gate", "K=60", "--k", "2", "--epochs", "10", "--lr", "3e-3",
        "--target-modules", "q_proj,v_proj"])
    for spec in (as_mapping, as_file, as_args):
        assert compile_settings(spec_path, spec) == expected, spec.compile

    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "bad.json").write_text('{"name": "r", "env": "prod", "compile": {"examples": "x", "fit": {"epoch": 3}}}')
    with pytest.raises(InputError, match=r"bad.json: invalid spec: .*fit.epoch: unknown field"):
        load_specs(specs)


def test_the_example_nightly_spec_loads():
    from kolm_ray.publish.nightly import compile_settings, load_specs

    [(path, spec)] = load_specs(ROOT / "examples" / "nightly")
    s = compile_settings(path, spec)
    assert s.examples.resolve() == (EXAMPLE / "examples.jsonl").resolve() and s.gate == 60


def test_a_task_on_the_command_line_wins_over_the_files_task_file(config):
    s = load_settings(config, flag_overrides({"task": "route the ticket"}))
    assert (s.task, s.task_file) == ("route the ticket", None)
    s = load_settings(config, flag_overrides({"task_file": str(config.parent / "other.txt")}))
    assert (s.task, s.task_file) == (None, config.parent / "other.txt")


def test_a_plain_number_gate_in_a_file_reads_like_k_equals(config):
    config.write_text(CONFIG.replace("gate: K=60", 'gate: "88"'))
    assert load_settings(config).gate == 88.0
    config.write_text(CONFIG.replace("gate: K=60", 'gate: "101"'))
    with pytest.raises(InputError, match="gate"):
        load_settings(config)


def test_on_only_flags_of_the_file_can_be_turned_off_on_the_command_line(config):
    config.write_text(CONFIG + "new_version: true\n")
    out = _print("--config", str(config), "--no-new-version")
    assert "new_version: false" in out


def test_a_missing_compile_config_names_the_spec_that_named_it(tmp_path):
    from kolm_ray.publish.nightly import load_specs

    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "routing.json").write_text('{"name": "r", "env": "prod", "compile": "nowhere.yaml"}')
    with pytest.raises(InputError, match=r"nowhere.yaml: .*not found.*\(the compile config of routing.json\)"):
        load_specs(specs)
