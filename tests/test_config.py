"""The study file: every kind of mistake is one line with the right line number."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DIGITS_YAML, ROOT, hpo

from hpo import objective
from hpo.config import ConfigError, config_from_dict, load_config

VALID = """\
study:
  name: s
  direction: maximize
  metric: val_accuracy
  n_trials: 5
  sampler: tpe
  pruner: median
trainer:
  epochs: 2
task:
  model: hpo.examples.tabular:mlp
  data: hpo.examples.tabular:wine
space:
  lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
  optimizer:
    type: categorical
    choices:
      adam:
        beta1: {type: float, low: 0.8, high: 0.99}
      sgd:
        momentum: {type: float, low: 0.5, high: 0.99}
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    return [str(p).replace(str(path), "FILE") for p in info.value.problems]


def with_line(text: str, line: int, new: str) -> str:
    lines = VALID.splitlines()
    lines[line - 1] = new
    return "\n".join(lines) + "\n"


def test_valid_file_loads_and_round_trips_through_the_stored_dict(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(VALID)
    config = load_config(str(path))
    again = config_from_dict(json.loads(json.dumps(config.raw)), "stored")
    assert again.fingerprint() == config.fingerprint()
    assert again.study == config.study and again.trainer == config.trainer and again.space == config.space


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_files_are_valid(path: Path) -> None:
    assert load_config(str(path)).study.n_trials


def test_the_readmes_study_file_reference_loads(tmp_path: Path) -> None:
    # The README's reference (the file, its search space, a baseline) put together, as a user
    # copies them: it must load as it is written.
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The study file"):readme.index("### Samplers and pruners")]
    study, space, baseline = re.findall(r"```yaml\n(.*?)```", section, re.S)
    study = re.sub(r"^(space|baseline): \.\.\..*$", "", study, flags=re.M)
    path = tmp_path / "reference.yaml"
    path.write_text(study + space + baseline)
    config = load_config(str(path))
    assert config.study.name == "digits-mlp" and "optimizer" in config.space.children


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    assert problems(tmp_path, with_line(VALID, 5, "  n_trails: 5")) == [
        "FILE:5: study.n_trails: unknown key; did you mean n_trials? "
        "(expected one of ask_ahead, direction, directions, grace_period, heartbeat_interval, max_retries, metric, metrics, "
        "n_trials, name, oom_retries, pruner, sampler, seed, storage_patience, timeout, vectorize)"
    ]


def test_unknown_section_and_unknown_parameter_key(tmp_path: Path) -> None:
    text = VALID + "trainr:\n  epochs: 3\n"
    text = text.replace("log: true}", "lg: true}")
    found = problems(tmp_path, text)
    assert found[0].startswith("FILE:14: space.lr.lg: unknown key for a float parameter; did you mean log?")
    assert found[1].startswith("FILE:22: trainr: unknown key; did you mean trainer?")


def test_wrong_types(tmp_path: Path) -> None:
    text = VALID.replace("n_trials: 5", "n_trials: many").replace("epochs: 2", "epochs: two")
    found = problems(tmp_path, text)
    assert found == [
        "FILE:5: study.n_trials: 'many' is not an integer >= 1 (expected an integer >= 1)",
        "FILE:9: trainer.epochs: 'two' is not int (expected int)",
    ]


def test_low_not_below_high(tmp_path: Path) -> None:
    found = problems(tmp_path, with_line(VALID, 14, "  lr: {type: float, low: 0.1, high: 0.01}"))
    assert found == ["FILE:14: space.lr.low: low 0.1 is not below high 0.01 (expected low < high)"]


def test_log_scale_with_non_positive_low(tmp_path: Path) -> None:
    found = problems(tmp_path, with_line(VALID, 14, "  lr: {type: float, low: 0, high: 0.1, log: true}"))
    assert found == ["FILE:14: space.lr.low: log scale needs low > 0, got 0 (expected a positive low)"]


def test_step_that_does_not_divide_the_range(tmp_path: Path) -> None:
    found = problems(tmp_path, with_line(VALID, 14, "  lr: {type: int, low: 1, high: 10, step: 4}"))
    assert found == [
        "FILE:14: space.lr.step: step 4 does not divide the range 1..10 (expected (high - low) to be a multiple of step)"
    ]


def test_empty_choices(tmp_path: Path) -> None:
    found = problems(tmp_path, with_line(VALID, 14, "  lr: {type: categorical, choices: []}"))
    assert found == ["FILE:14: space.lr.choices: no choices (expected at least one)"]


def test_missing_type_is_not_mistaken_for_a_group(tmp_path: Path) -> None:
    found = problems(tmp_path, with_line(VALID, 14, "  lr: {low: 0.1, high: 1.0}"))
    assert found == ["FILE:14: space.lr: has high, low but no type (expected type: float, int, categorical or fixed)"]


def test_unknown_sampler_pruner_and_option(tmp_path: Path) -> None:
    text = VALID.replace("sampler: tpe", "sampler: {name: tpee}").replace(
        "pruner: median", "pruner: {name: median, options: {n_warmup: 2}}"
    )
    found = problems(tmp_path, text)
    assert found[0].startswith("FILE:6: study.sampler.name: unknown sampler 'tpee'; did you mean tpe?")
    assert found[1].startswith("FILE:7: study.pruner.options.n_warmup: median has no option 'n_warmup'; did you mean n_warmup_steps?")


def test_optimizer_and_schedule_the_loop_cannot_build(tmp_path: Path) -> None:
    # Found before the study exists, not at run time in every trial that draws them.
    text = VALID.replace("        momentum: {type: float, low: 0.5, high: 0.99}\n",
                         "        momentum: {type: float, low: 0.5, high: 0.99}\n"
                         "        schedule: {type: categorical, choices: [cosine, step]}\n"
                         "      adamm: null\n")
    text += "  scheduler: {name: step, gama: 0.5}\n"
    assert problems(tmp_path, text) == [
        "FILE:22: space.optimizer.choices.sgd.schedule: optimizer sgd takes no option 'schedule' (expected one of "
        "dampening, differentiable, foreach, fused, lr, maximize, momentum, nesterov, weight_decay)",
        "FILE:23: space.optimizer.choices.adamm: unknown optimizer 'adamm'; did you mean adam? "
        "(expected one of adam, adamw, sgd, rmsprop, adagrad)",
        "FILE:24: space.scheduler.gama: scheduler step takes no option 'gama'; did you mean gamma? "
        "(expected one of gamma, step_size, warmup_steps)",
    ]
    # No schedule is a choice too; a group without a name merges over trainer.scheduler's.
    merged = VALID.replace("  epochs: 2\n", "  epochs: 2\n  scheduler: step\n") + \
        "  scheduler:\n    min_lr: {type: float, low: 0.0, high: 0.01}\n"
    assert problems(tmp_path, merged) == [
        "FILE:24: space.scheduler.min_lr: scheduler step takes no option 'min_lr' (expected one of gamma, step_size, warmup_steps)"]
    path = tmp_path / "ok.yaml"
    path.write_text(VALID + "  scheduler: {type: categorical, choices: [null, cosine]}\n")
    assert load_config(str(path))
    fixed = VALID.replace("  optimizer:\n    type: categorical", "  optimizer: sgdd\n  unused:\n    type: categorical")
    assert problems(tmp_path, fixed) == [
        "FILE:15: space.optimizer: unknown optimizer 'sgdd'; did you mean sgd? (expected one of adam, adamw, sgd, rmsprop, adagrad)"]


def test_trainer_optimizer_monitor_and_seed_that_would_fail_every_trial(tmp_path: Path) -> None:
    text = VALID.replace("  pruner: median\n", "  pruner: median\n  seed: 9223372036854775808\n")  # 2**63
    text = text.replace("  epochs: 2\n", "  epochs: 2\n  optimizer: lamb\n  monitor: val_acuracy\n")
    assert problems(tmp_path, text) == [
        "FILE:8: study.seed: 9223372036854775808 is too large (expected an integer below 9223372036854775808)",
        "FILE:11: trainer.optimizer: unknown optimizer 'lamb' (expected one of adam, adamw, sgd, rmsprop, adagrad)",
        "FILE:12: trainer.monitor: the task does not report 'val_acuracy'; did you mean val_accuracy? (expected one of train_loss, "
        "val_loss, val_accuracy, val_top5_accuracy, val_f1; a custom eval_step's own go in task.metrics)",
    ]


def test_a_device_that_is_no_device_name_is_reported_with_its_line(tmp_path: Path) -> None:
    for device in ("cuda:abc", "cuda:", "gpu"):
        assert problems(tmp_path, VALID.replace("  epochs: 2\n", f"  epochs: 2\n  device: '{device}'\n")) == [
            f"FILE:10: trainer.device: device must be auto, cpu, cuda or cuda:N but got '{device}' "
            "(expected a valid trainer setting)"]


def test_grid_over_a_continuous_space_is_one_line(tmp_path: Path) -> None:
    assert problems(tmp_path, VALID.replace("sampler: tpe", "sampler: {name: grid, options: {}}")) == [
        "FILE:6: study.sampler: grid needs a space without branches whose parameters are all discrete "
        "(expected categorical, int, or float with step)"]


def test_option_of_the_wrong_type(tmp_path: Path) -> None:
    # Optuna keeps it unchecked: n_startup_trials "ten" failed at the eleventh ask.
    text = VALID.replace("sampler: tpe", "sampler: {name: tpe, options: {n_startup_trials: ten, group: 'yes'}}")
    assert problems(tmp_path, text) == [
        "FILE:6: study.sampler.options.n_startup_trials: 'ten' is not an integer (expected an integer, as its default 10)",
        "FILE:6: study.sampler.options.group: 'yes' is not true or false (expected true or false, as its default False)",
    ]
    # As Python takes them: 1 for true, 10.0 for 10.
    path = tmp_path / "ok.yaml"
    path.write_text(VALID.replace("sampler: tpe", "sampler: {name: tpe, options: {n_startup_trials: 10.0, group: 1}}"))
    assert load_config(str(path))


def test_checkpoint_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "ckpt").write_text("")
    text = VALID.replace("  epochs: 2\n", f"  epochs: 2\n  checkpoint_dir: {tmp_path / 'ckpt'}\n")
    assert problems(tmp_path, text) == [f"FILE:10: trainer.checkpoint_dir: {tmp_path / 'ckpt'} is a file (expected a folder, made if missing)"]


def test_option_value_rejected_by_the_library(tmp_path: Path) -> None:
    found = problems(tmp_path, VALID.replace("pruner: median", "pruner: {name: percentile, options: {percentile: 150}}"))
    assert len(found) == 1 and found[0].startswith("FILE:7: study.pruner.options: percentile rejects these options:")


def test_factory_that_does_not_import(tmp_path: Path) -> None:
    text = VALID.replace("hpo.examples.tabular:mlp", "no_such_module:mlp").replace(
        "hpo.examples.tabular:wine", "hpo.examples.tabular:nope"
    )
    assert problems(tmp_path, text) == [
        "FILE:11: task.model: cannot import no_such_module (ModuleNotFoundError: No module named 'no_such_module') "
        "(expected an importable package.module:function)",
        "FILE:12: task.data: hpo.examples.tabular has no attribute nope (expected an importable package.module:function)",
    ]


def test_factory_module_that_exits_on_import(tmp_path: Path) -> None:
    (tmp_path / "quits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    assert problems(tmp_path, VALID.replace("hpo.examples.tabular:mlp", "quits_on_import:mlp")) == [
        "FILE:11: task.model: cannot import quits_on_import (it called sys.exit(3) on import) "
        "(expected an importable package.module:function)"]


def test_factories_hpo_cannot_call_as_it_calls_them(tmp_path: Path) -> None:
    # Every trial failed with a TypeError, after the study was created.
    (tmp_path / "odd_task.py").write_text("def model(params, data, width):\n    pass\n\ndef data(a, b):\n    pass\n\n"
                                          "def step(batch):\n    pass\n")
    text = VALID.replace("hpo.examples.tabular:mlp", "odd_task:model").replace("hpo.examples.tabular:wine", "odd_task:data")
    text = text.replace("  data: odd_task:data\n", "  data: odd_task:data\n  train_step: odd_task:step\n")
    assert problems(tmp_path, text) == [
        "FILE:11: task.model: odd_task:model takes (params, data, width) (expected a function called as model(params) "
        "or model(params, data))",
        "FILE:12: task.data: odd_task:data takes (a, b) (expected a function called as data() or data(params))",
        "FILE:13: task.train_step: odd_task:step takes (batch) (expected a function called as step(model, batch))",
    ]
    # Defaults, *args, keyword-only arguments and partials count as Python counts them, and each
    # factory is called with the longest argument list it takes (a keyword-only or **kwargs
    # factory was called with the data and failed).
    (tmp_path / "fine_task.py").write_text(textwrap.dedent("""
        import functools
        import torch

        def build(params, data, width=8):
            return torch.nn.Linear(13, width)

        def plain(params, *, device="cpu"):
            return torch.nn.Linear(13, 3)

        def loose(params, **options):
            return torch.nn.Linear(13, 3)

        partial = functools.partial(build, data=None)

        def data(*, seed=0):
            from hpo.examples.tabular import wine
            return wine()
    """))
    for factory in ("build", "plain", "loose", "partial"):
        path = tmp_path / f"fine-{factory}.yaml"
        path.write_text(VALID.replace("hpo.examples.tabular:mlp", f"fine_task:{factory}").replace("hpo.examples.tabular:wine", "fine_task:data"))
        task = objective.prepare(load_config(str(path)))
        assert isinstance(task.model({}, task.data({})), torch.nn.Linear)


def test_hyperband_resources_are_checked_before_any_trial(tmp_path: Path) -> None:
    # Optuna builds hyperband's brackets at the first report, and a min_resource of 0 passed even then.
    for options, message in [
        ("{min_resource: 0}", "The value of `min_resource` is 0, but must be either `min_resource >= 1` or 'auto'"),
        ("{min_resource: 5, max_resource: 2}", "The value of `max_resource` is 2, but must be 'auto' or an integer >= `min_resource` (5)"),
        ("{reduction_factor: 1}", "The value of `reduction_factor` is 1, but must be `reduction_factor >= 2`"),
    ]:
        found = problems(tmp_path, VALID.replace("pruner: median", f"pruner: {{name: hyperband, options: {options}}}"))
        assert found == [f"FILE:7: study.pruner.options: hyperband rejects these options: {message} (expected values hyperband accepts)"]
    # Wrapped by the patient pruner, too.
    wrapped = "pruner: {name: patient, options: {patience: 2}, wrapped: {name: hyperband, options: {min_resource: 0}}}"
    found = problems(tmp_path, VALID.replace("pruner: median", wrapped))
    assert len(found) == 1 and "The value of `min_resource` is 0" in found[0]
    # A study stored before these checks still opens, for hpo status and for workers (which import
    # the task): checks of new files only.
    raw = yaml.safe_load(VALID.replace("pruner: median", "pruner: {name: hyperband, options: {min_resource: 5, max_resource: 2}}"))
    for import_task in (False, True):
        assert config_from_dict(raw, "stored", import_task=import_task).study.pruner == "hyperband"
    raw["study"].update(directions=["maximize", "maximize"], metrics=["val_accuracy", "val_accuracy"], pruner="none")
    del raw["study"]["direction"], raw["study"]["metric"]
    for import_task in (False, True):
        assert config_from_dict(raw, "stored", import_task=import_task).study.metrics == ("val_accuracy", "val_accuracy")


def test_a_metric_given_twice(tmp_path: Path) -> None:
    text = VALID.replace("direction: maximize", "directions: [maximize, maximize, minimize]").replace(
        "metric: val_accuracy", "metrics: [val_accuracy, val_accuracy, val_loss]").replace("pruner: median", "pruner: none")
    assert problems(tmp_path, text) == ["FILE:4: study.metrics: 'val_accuracy' given twice (expected each metric once)"]


def test_metric_the_task_does_not_report(tmp_path: Path) -> None:
    assert problems(tmp_path, VALID.replace("metric: val_accuracy", "metric: val_acc")) == [
        "FILE:4: study.metric: the task does not report 'val_acc'; did you mean val_accuracy? "
        "(expected one of train_loss, val_loss, val_accuracy, val_top5_accuracy, val_f1)"
    ]


def test_duplicate_parameter_names_across_branches(tmp_path: Path) -> None:
    text = VALID.replace("beta1: {type: float, low: 0.8, high: 0.99}", "weight_decay: {type: float, low: 0.0, high: 0.1}")
    text = text.replace("momentum: {type: float, low: 0.5, high: 0.99}", "weight_decay: {type: float, low: 0.0, high: 0.01}")
    assert problems(tmp_path, text) == [
        "FILE:21: space.optimizer.choices.sgd.weight_decay: parameter optimizer.weight_decay is defined in more than one branch, "
        "also at space.optimizer.choices.adam.weight_decay (expected unique names: move it out of the branches or rename it)"
    ]


def test_several_errors_are_reported_at_once_in_line_order(tmp_path: Path) -> None:
    text = VALID.replace("direction: maximize", "direction: up").replace("epochs: 2", "epochs: 0")
    text = text.replace("low: 0.8, high: 0.99", "low: 0.99, high: 0.8")
    found = problems(tmp_path, text)
    assert [f.split(":")[1] for f in found] == ["3", "9", "19"]


def test_yaml_syntax_error_names_its_line(tmp_path: Path) -> None:
    found = problems(tmp_path, "study:\n  name: [unclosed\ntask: {}\n")
    assert len(found) == 1 and found[0].startswith("FILE:3: invalid YAML:")


def test_a_file_that_is_not_utf8_text_or_expands_without_end(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    cases = {
        VALID.encode().replace(b"name: s", b"name: caf\xe9"): "FILE:2: byte 0xe9 is not UTF-8 text (expected a UTF-8 file)",
        VALID.encode().replace(b"epochs: 2", b"epochs: 2\x00"): "FILE:9: invalid YAML: character U+0000 is not allowed in YAML",
        # "Billion laughs": nine aliases of nine aliases, eight deep, would be 43 million values.
        ("a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))).encode():
            "FILE:1: invalid YAML: the file expands to more than 100000 values (aliases of aliases?)",
    }
    for content, expected in cases.items():
        path.write_bytes(content)
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert [str(p).replace(str(path), "FILE") for p in info.value.problems] == [expected]


def test_duplicate_key(tmp_path: Path) -> None:
    found = problems(tmp_path, VALID.replace("  n_trials: 5\n", "  n_trials: 5\n  n_trials: 6\n"))
    assert found == ["FILE:6: study.n_trials: key given twice (expected each key once)"]


def test_multi_objective_cannot_prune(tmp_path: Path) -> None:
    text = VALID.replace("direction: maximize", "directions: [maximize, minimize]").replace(
        "metric: val_accuracy", "metrics: [val_accuracy, val_loss]"
    )
    assert problems(tmp_path, text) == ["FILE:7: study.pruner: Optuna cannot prune multi-objective trials (expected pruner: none)"]


def test_baseline_outside_the_space(tmp_path: Path) -> None:
    text = VALID + "baseline:\n  - {lr: 5.0, optimizer: {name: rmsprop}}\n"
    assert problems(tmp_path, text) == [
        "FILE:23: baseline[0].lr: 5.0 is outside the parameter's range (expected 0.0001..0.1 log)",
        "FILE:23: baseline[0].optimizer: 'rmsprop' is not a choice (expected one of adam, sgd)",
    ]


def test_a_baseline_value_of_a_refused_parameter_is_not_a_second_mistake(tmp_path: Path) -> None:
    text = VALID.replace("low: 1.0e-4, high: 1.0e-1", "low: 1.0e-1, high: 1.0e-4").replace("low: 0.5, high: 0.99", "low: 0.99, high: 0.5")
    text += "baseline:\n  - {lr: 0.01, bogus: 1, momentum: 0.9, optimizer: {name: sgd, momentum: 0.9}}\n"
    assert problems(tmp_path, text) == [
        "FILE:14: space.lr.low: low 0.1 is not below high 0.0001 (expected low < high)",
        "FILE:21: space.optimizer.choices.sgd.momentum.low: low 0.99 is not below high 0.5 (expected low < high)",
        "FILE:23: baseline[0].bogus: unknown parameter",
        "FILE:23: baseline[0].momentum: unknown parameter",  # the space's momentum is the branch's
    ]


def test_check_command_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(VALID.replace("n_trials: 5", "n_trials: -1").replace("epochs: 2", "epochs: x"))
    result = hpo("check", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"{path}:5: study.n_trials: -1 is not an integer >= 1 (expected an integer >= 1)",
        f"{path}:9: trainer.epochs: 'x' is not int (expected int)",
    ]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_check_command_accepts_the_shipped_study() -> None:
    result = hpo("check", str(DIGITS_YAML))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_ask_ahead_is_true_false_or_absent(tmp_path: Path) -> None:
    assert problems(tmp_path, with_line(VALID, 6, "  ask_ahead: sometimes")) == [
        "FILE:6: study.ask_ahead: 'sometimes' is not true or false "
        "(expected true, false, or no ask_ahead for the storage's default)"
    ]
    path = tmp_path / "ok.yaml"
    path.write_text(with_line(VALID, 7, "  pruner: median\n  ask_ahead: false"))
    assert load_config(str(path)).study.ask_ahead is False
