"""The study file: YAML -> validated, frozen dataclasses.

Every problem in the file is collected and reported at once, one line each:
``FILE:LINE: key.path: what is wrong (expected …)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from optuna.distributions import CategoricalDistribution

from hpo import samplers, yamlfile
from hpo import space as space_mod
from hpo import task as task_mod
from trainers.config import METRICS, TrainerConfig

SECTIONS = {"study", "trainer", "task", "space", "baseline"}
STUDY_KEYS = {"name", "direction", "directions", "metric", "metrics", "n_trials", "timeout", "seed", "sampler", "pruner",
              "heartbeat_interval", "grace_period", "max_retries", "storage_patience", "oom_retries", "vectorize",
              "ask_ahead"}
VECTORIZE_KEYS = {"width", "data", "max_width", "lookahead", "pad"}
VECTORIZE_DATA = ("shared", "per_slot")
TASK_KEYS = {"model", "data", "kind", "train_step", "eval_step", "metrics"}
TRAINER_KEYS = {f.name for f in dataclasses.fields(TrainerConfig)}
SEED_LIMIT = 2**63  # torch.manual_seed takes 64 bits; trial n trains with seed + n


@dataclass(frozen=True)
class Vectorize:
    """Population mode: the worker trains up to `width` same-architecture trials as one stacked model."""

    width: int | str = "auto"  # a number of slots, or "auto": measured on the device at the worker's start
    data: str = "shared"  # shared: one batch order for all slots; per_slot: each slot its trial's own order
    max_width: int = 64  # the largest width auto tries
    lookahead: int = 1  # the worker holds up to lookahead * width asked trials, to group them by architecture
    # A trial may join a group whose model is up to `pad` times its own size, its hidden widths
    # padded with zeros (plain MLPs only); 1 stacks equal shapes only.
    pad: float = 1.0


@dataclass(frozen=True)
class StudyConfig:
    name: str
    directions: tuple[str, ...]
    metrics: tuple[str, ...]
    n_trials: int | None = None
    timeout: float | None = None
    seed: int | None = None
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    pruner: str = "median"
    pruner_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    pruner_wrapped: tuple[str, dict[str, Any]] | None = None
    heartbeat_interval: int = 30  # seconds between a worker's beats
    grace_period: int = 120  # seconds without a beat before a worker's trial is failed and retried
    max_retries: int = 2  # retries of a trial whose worker died, after the first attempt
    storage_patience: float = 600.0  # seconds a worker waits out an unreachable storage
    oom_retries: int = 0  # retries with half the batch size after running out of memory
    vectorize: Vectorize | None = None  # None: one trial at a time
    # Ask for and sample the next trial while this one trains. None: on with a server storage
    # (Redis, a database), off with a journal file, where one seeded worker stays reproducible.
    ask_ahead: bool | None = None


@dataclass(frozen=True)
class TaskConfig:
    model: str
    data: str
    kind: str = "classification"
    train_step: str | None = None
    eval_step: str | None = None
    metrics: tuple[str, ...] = ()

    def reported_metrics(self, top_k: int = 5) -> tuple[str, ...]:
        builtin = tuple(m.replace("top5", f"top{top_k}") for m in METRICS[self.kind])
        return (*builtin, *self.metrics)


@dataclass(frozen=True)
class Config:
    study: StudyConfig
    trainer: TrainerConfig
    task: TaskConfig
    space: space_mod.Group
    baseline: tuple[dict[str, Any], ...]  # flat Optuna params, enqueued before sampling starts
    raw: dict[str, Any]  # the file as written; stored in the study so workers need no copy

    def fingerprint(self) -> str:
        return json.dumps(self.raw, sort_keys=True, default=str)


@dataclass(frozen=True)
class Problem:
    source: str
    line: int | None
    path: tuple
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {dotted(self.path)}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_config(file: str) -> Config:
    """Reads and validates a study file; raises `ConfigError` listing every problem."""
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ConfigError([Problem(file, None, (), f"cannot read the study file ({err.strerror})")]) from None
    except UnicodeDecodeError as err:
        with open(file, "rb") as f:
            line = f.read(err.start).count(b"\n") + 1
        raise ConfigError([Problem(file, line, (), f"byte {err.object[err.start]:#04x} is not UTF-8 text (expected a UTF-8 file)")]) from None
    try:
        located = yamlfile.load(text)
    except yamlfile.YamlSyntaxError as err:
        raise ConfigError([Problem(file, err.line, (), f"invalid YAML: {err}")]) from None
    task_mod.importable_from(os.path.dirname(os.path.abspath(file)), os.getcwd())
    return validate(located, file)


def config_from_dict(raw: dict[str, Any], source: str, *, import_task: bool = True) -> Config:
    """Rebuilds a config stored in a study (no line numbers there). `import_task` False: the
    task's factories are not imported, for commands that only read the study (`hpo status` on a
    machine without the training code). Checks added after a study was stored do not apply: it
    stays readable and workers still join it."""
    return validate(yamlfile.Located(raw), source, import_task=import_task, fresh=False)


def validate(located: yamlfile.Located, source: str, *, import_task: bool = True, fresh: bool = True) -> Config:
    problems: list[Problem] = []

    def report(path: tuple, message: str) -> None:
        problems.append(Problem(source, located.line(path), path, message))

    for path, line in located.duplicates:
        problems.append(Problem(source, line, path, "key given twice (expected each key once)"))
    raw = located.data
    if not isinstance(raw, Mapping):
        report((), "the study file must be a mapping with study, task and space (expected study: ...)")
        raise ConfigError(problems)
    _unknown_keys(raw, (), SECTIONS, report)
    for section in ("study", "task", "space"):
        if section not in raw:
            report((), f"missing section {section} (expected {section}: ...)")

    space = space_mod.parse(raw.get("space"), ("space",), report) if "space" in raw else space_mod.Group({})
    task = _task(_section(raw, "task", report), report, import_task)
    trainer = _trainer(_section(raw, "trainer", report), report)
    if import_task:  # torch is imported with the task anyway; a stored config needs neither
        _loop_hparams(space, trainer, report)
        _trainer_here(raw.get("trainer"), trainer, task, report)
    study = _study(_section(raw, "study", report), space, task, trainer.top_k, report, fresh=fresh)
    # A parameter whose spec was refused is missing from the space: a baseline value for it is not
    # a second mistake ("unknown parameter") but the same one.
    refused = [_param_path(p.path) for p in problems if p.path[:1] == ("space",)]
    baseline = _baseline(raw.get("baseline", []), space,
                         lambda path, message: None if message.startswith("unknown parameter")
                         and any(r[:len(path) - 2] == path[2:] for r in refused) else report(path, message))
    if problems:
        problems.sort(key=lambda p: (p.line or 0))
        raise ConfigError(problems)
    return Config(study, trainer, task, space, baseline, json.loads(json.dumps(raw, default=str)))


def _section(raw: Mapping, name: str, report: Callable) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        report((name,), f"must be a mapping, got {type(value).__name__} (expected {name}: followed by indented keys)")
        return {}
    return dict(value)


def _study(raw: dict, space: space_mod.Group, task: TaskConfig | None, top_k: int, report: Callable, *,
           fresh: bool = True) -> StudyConfig | None:
    path = ("study",)
    misspelt = _unknown_keys(raw, path, STUDY_KEYS, report)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        report((*path, "name") if "name" in raw else path, f"study name {'missing' if name is None else repr(name)} (expected a non-empty string)")
    directions = _one_or_many(raw, path, "direction", "directions", report)
    for d in directions:
        if d not in ("minimize", "maximize"):
            report((*path, "direction" if "direction" in raw else "directions"), f"{d!r} is not a direction (expected minimize or maximize)")
    metrics = _one_or_many(raw, path, "metric", "metrics", report)
    twice = sorted({m for m in metrics if metrics.count(m) > 1})
    if twice and fresh:  # one objective's values would be stored under another's name
        report((*path, "metrics"), f"{', '.join(map(repr, twice))} given twice (expected each metric once)")
    if directions and metrics and len(directions) != len(metrics):
        report((*path, "metrics"), f"{len(metrics)} metrics for {len(directions)} directions (expected one metric per direction)")
    if task is not None:
        reported = task.reported_metrics(top_k)
        for m in metrics:
            if m not in reported:
                report((*path, "metric" if "metric" in raw else "metrics"), f"the task does not report {m!r}{space_mod.did_you_mean(m, reported)} (expected one of {', '.join(reported)})")
    n_trials = _number(raw, path, "n_trials", int, report, minimum=1)
    timeout = _number(raw, path, "timeout", (int, float), report, minimum=0, exclusive=True)
    seed = _number(raw, path, "seed", int, report, minimum=0)
    if seed is not None and seed >= SEED_LIMIT:  # every trial failed in torch.manual_seed
        report((*path, "seed"), f"{seed} is too large (expected an integer below {SEED_LIMIT})")
        seed = None
    interval = _number(raw, path, "heartbeat_interval", int, report, minimum=1)
    grace = _number(raw, path, "grace_period", int, report, minimum=1)
    retries = _number(raw, path, "max_retries", int, report, minimum=0)
    patience = _number(raw, path, "storage_patience", (int, float), report, minimum=0, exclusive=True)
    oom = _number(raw, path, "oom_retries", int, report, minimum=0)
    liveness = {"heartbeat_interval": interval or 30, "grace_period": grace or max(120, 2 * (interval or 30)),
                "max_retries": 2 if retries is None else retries, "storage_patience": float(patience or 600), "oom_retries": oom or 0}
    if liveness["grace_period"] <= liveness["heartbeat_interval"]:
        report((*path, "grace_period"), f"grace period {liveness['grace_period']}s is not longer than the heartbeat interval {liveness['heartbeat_interval']}s (expected grace_period > heartbeat_interval)")

    vectorize = _vectorize(raw.get("vectorize"), (*path, "vectorize"), report) if "vectorize" in raw else None
    ask_ahead = raw.get("ask_ahead")
    if ask_ahead is not None and not isinstance(ask_ahead, bool):
        report((*path, "ask_ahead"), f"{ask_ahead!r} is not true or false (expected true, false, or no ask_ahead for the storage's default)")
    sampler, sampler_options = _named(raw.get("sampler", "tpe"), (*path, "sampler"), samplers.SAMPLERS, report)
    pruner_raw = raw.get("pruner", "median")
    wrapped = None
    if isinstance(pruner_raw, Mapping) and "wrapped" in pruner_raw:
        pruner_raw = dict(pruner_raw)
        w_name, w_options = _named(pruner_raw.pop("wrapped"), (*path, "pruner", "wrapped"), samplers.PRUNERS, report)
        wrapped = (w_name, w_options) if w_name else None
    pruner, pruner_options = _named(pruner_raw, (*path, "pruner"), samplers.PRUNERS, report)
    if sampler:
        if sampler == "grid" and space.children and space_mod.grid(space) is None:  # no grid to build the sampler on
            report((*path, "sampler"), "grid needs a space without branches whose parameters are all discrete (expected categorical, int, or float with step)")
        else:
            _check_options(sampler, sampler_options, (*path, "sampler"), report, lambda: samplers.build_sampler(sampler, sampler_options, 0, space))
        if len(directions) > 1 and sampler not in samplers.MULTI_OBJECTIVE_SAMPLERS:
            report((*path, "sampler"), f"{sampler} cannot optimize several objectives (expected one of {', '.join(sorted(samplers.MULTI_OBJECTIVE_SAMPLERS))})")
    if pruner:
        def build_pruner() -> Any:
            built = samplers.build_pruner(pruner, pruner_options, wrapped)
            for name, options in ((pruner, pruner_options), wrapped or (None, {})):
                if fresh and name == "hyperband":
                    samplers.check_hyperband(options)
            return built

        _check_options(pruner, pruner_options, (*path, "pruner"), report, build_pruner)
        if pruner == "patient" and wrapped is None:
            report((*path, "pruner"), "patient pruner wraps another (expected wrapped: {name: median})")
        if len(directions) > 1 and pruner != "none":
            report((*path, "pruner"), "Optuna cannot prune multi-objective trials (expected pruner: none)")
    if "n_trials" not in raw and "timeout" not in raw and sampler != "grid" and not misspelt:
        report(path, "no budget: the study would never end (expected n_trials, timeout or both)")
    if not (isinstance(name, str) and directions and metrics and sampler and pruner):
        return None
    if sampler == "grid" and n_trials is None and space_mod.grid(space):
        n_trials = math.prod(len(values) for values in space_mod.grid(space).values())
    return StudyConfig(name, tuple(directions), tuple(metrics), n_trials, timeout, seed, sampler, sampler_options, pruner, pruner_options, wrapped, **liveness,
                       vectorize=vectorize, ask_ahead=ask_ahead if isinstance(ask_ahead, bool) else None)


def _vectorize(raw: Any, path: tuple, report: Callable) -> Vectorize | None:
    """``vectorize: {width: K | auto, data: shared | per_slot, max_width: N, lookahead: L, pad: P}``; null turns it off."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        report(path, f"{raw!r} is not a mapping (expected vectorize: {{width: 8}} or {{width: auto}})")
        return None
    _unknown_keys(raw, path, VECTORIZE_KEYS, report)
    ok = True
    width = raw.get("width", "auto")
    if width != "auto" and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        report((*path, "width"), f"{width!r} is not a positive integer or auto (expected an integer >= 1 or auto)")
        ok = False
    data = raw.get("data", "shared")
    if data not in VECTORIZE_DATA:
        report((*path, "data"), f"{data!r} is not a data mode{space_mod.did_you_mean(data, VECTORIZE_DATA)} (expected shared or per_slot)")
        ok = False
    max_width = _number(raw, path, "max_width", int, report, minimum=1)
    if "max_width" in raw and max_width is None:
        ok = False
    if "max_width" in raw and width != "auto" and ok:
        report((*path, "max_width"), "max_width bounds auto only (expected width: auto, or no max_width)")
        ok = False
    lookahead = _number(raw, path, "lookahead", int, report, minimum=1)
    if "lookahead" in raw and lookahead is None:
        ok = False
    pad = _number(raw, path, "pad", (int, float), report, minimum=1)
    if "pad" in raw and pad is None:
        ok = False
    return Vectorize(width, data, max_width or 64, lookahead or 1, float(pad or 1)) if ok else None


def _task(raw: dict, report: Callable, import_task: bool = True) -> TaskConfig | None:
    path = ("task",)
    _unknown_keys(raw, path, TASK_KEYS, report)
    ok = True
    for key in ("model", "data", "train_step", "eval_step"):
        if raw.get(key) is None and key in ("train_step", "eval_step"):
            continue  # null, as the reference writes it: the default step
        if key not in raw:
            if key in ("model", "data"):
                report(path, f"missing {key} (expected {key}: package.module:function)")
                ok = False
            continue
        if not import_task:
            continue
        try:
            fn = task_mod.load_callable(raw[key])
        except task_mod.TaskImportError as err:
            report((*path, key), f"{err} (expected an importable package.module:function)")
            ok = False
            continue
        problem = task_mod.call_problem(fn, raw[key], task_mod.CALLS[key])
        if problem:
            report((*path, key), problem)
            ok = False
    kind = raw.get("kind", "classification")
    if kind not in METRICS:
        report((*path, "kind"), f"{kind!r} is not a task kind (expected {' or '.join(METRICS)})")
        ok = False
    extra = raw.get("metrics", [])
    if not isinstance(extra, list) or not all(isinstance(m, str) for m in extra):
        report((*path, "metrics"), "must be a list of metric names (expected [val_f1, ...])")
        ok = False
    if not ok:
        return None
    return TaskConfig(raw["model"], raw["data"], kind, raw.get("train_step"), raw.get("eval_step"), tuple(extra))


def _param_path(path: tuple) -> tuple:
    """A space problem's path as a baseline names the parameter: ``space.optimizer.choices.adam.beta1``
    is ``optimizer.beta1`` there."""
    keys, rest = [], iter(path[1:])
    for key in rest:
        if key == "choices":
            next(rest, None)  # the branch's name is a value in the baseline, not a key
        else:
            keys.append(key)
    return tuple(keys)


def _trainer_here(given: Any, trainer: TrainerConfig, task: TaskConfig | None, report: Callable) -> None:
    """What only the machine that runs the study, with the task, can tell of the trainer settings:
    a checkpoint folder that is a file, a monitor that the task does not report."""
    if trainer.checkpoint_dir is not None and os.path.exists(trainer.checkpoint_dir) and not os.path.isdir(trainer.checkpoint_dir):
        report(("trainer", "checkpoint_dir"), f"{trainer.checkpoint_dir} is a file (expected a folder, made if missing)")
    monitor = given.get("monitor") if isinstance(given, Mapping) else None  # the default is not the user's to fix
    known = task.reported_metrics(trainer.top_k) if task is not None else ()
    if known and isinstance(monitor, str) and monitor not in known:
        report(("trainer", "monitor"), f"the task does not report {monitor!r}{space_mod.did_you_mean(monitor, known)} "
                                       f"(expected one of {', '.join(known)}; a custom eval_step's own go in task.metrics)")


def _loop_hparams(space: space_mod.Group, trainer: TrainerConfig, report: Callable) -> None:
    """The optimizer and schedule that the training loop builds from a trial's `optimizer` and
    `scheduler` params: a name it does not know, or an option the class does not take, would fail
    every trial that draws it, long after the study was created."""
    from trainers.optim import OPTIMIZERS, options
    from trainers.schedule import OPTIONS as SCHEDULES
    from trainers.schedule import as_spec

    # Per kind: the names the loop knows, and the options each takes.
    kinds = {"optimizer": (OPTIMIZERS, options), "scheduler": (SCHEDULES, SCHEDULES.__getitem__)}

    def check(key: str, name: Any, keys: Any, path: tuple) -> None:
        if key == "scheduler" and name is None:
            return  # no schedule for this choice (or trainer.scheduler's)
        known, options_of = kinds[key]
        name = str(name).lower() if key == "optimizer" else name  # as build_optimizer reads it
        if name not in known:
            report(path, f"unknown {key} {name!r}{space_mod.did_you_mean(name, known)} (expected one of {', '.join(known)})")
            return
        allowed = options_of(name)
        for option in keys:
            if option != "name" and option not in allowed:
                report((*path, option), f"{key} {name} takes no option {option!r}{space_mod.did_you_mean(option, allowed)} "
                                        f"(expected one of {', '.join(sorted(allowed))})")

    if trainer.optimizer.lower() not in OPTIMIZERS:
        check("optimizer", trainer.optimizer, (), ("trainer", "optimizer"))
    # What a space entry without a name of its own merges over (`optimizer_spec`, `schedule.merge`).
    defaults = {"optimizer": trainer.optimizer if trainer.optimizer.lower() in OPTIMIZERS else None,
                "scheduler": as_spec(trainer.scheduler).get("name") if trainer.scheduler is not None else None}
    for key, default in defaults.items():
        node, path = space.children.get(key), ("space", key)
        if isinstance(node, space_mod.Branch):
            for choice, group in node.branches.items():
                check(key, choice, group.children, (*path, "choices", choice))
        elif isinstance(node, space_mod.Param) and isinstance(node.distribution, CategoricalDistribution):
            for choice in node.distribution.choices:
                check(key, choice, (), (*path, "choices"))
        elif isinstance(node, space_mod.Fixed) and isinstance(node.value, str):
            check(key, node.value, (), path)
        elif isinstance(node, (space_mod.Fixed, space_mod.Group)):
            fields = node.children if isinstance(node, space_mod.Group) else node.value
            named = fields.get("name") if isinstance(fields, Mapping) else None
            if isinstance(named, space_mod.Fixed):
                named = named.value
            name = default if named is None else named
            # A sampled name (a Param) is left alone: a branch is the way to give each its options.
            if isinstance(fields, Mapping) and name is not None and not isinstance(name, space_mod.Param):
                check(key, name, fields, path)


def _trainer(raw: dict, report: Callable) -> TrainerConfig:
    path = ("trainer",)
    _unknown_keys(raw, path, TRAINER_KEYS, report)
    hints = typing.get_type_hints(TrainerConfig)
    values = {}
    for key, value in raw.items():
        if key not in hints:
            continue
        allowed = _python_types(hints[key])
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            report((*path, key), f"{value!r} is not {names} (expected {names})")
        else:
            values[key] = value
    try:
        return TrainerConfig(**values)
    except ValueError as err:
        key = str(err).split()[0]
        report((*path, key) if key in TRAINER_KEYS else path, f"{err}".rstrip(".") + " (expected a valid trainer setting)")
        return TrainerConfig()


def _baseline(raw: Any, space: space_mod.Group, report: Callable) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, list):
        report(("baseline",), "must be a list of parameter sets (expected - {lr: 0.001, ...})")
        return ()
    return tuple(space_mod.flatten(space, entry, ("baseline", i), report) for i, entry in enumerate(raw))


def _named(raw: Any, path: tuple, registry: Mapping[str, type], report: Callable) -> tuple[str | None, dict]:
    """`name` or ``{name: ..., options: {...}}``."""
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, Mapping):
        _unknown_keys(raw, path, {"name", "options"}, report)
        name, options = raw.get("name"), raw.get("options") or {}
        if not isinstance(options, Mapping):
            report((*path, "options"), f"must be a mapping, got {type(options).__name__} (expected options: {{key: value}})")
            options = {}
    else:
        report(path, f"{raw!r} is not a name or a mapping (expected one of {', '.join(registry)})")
        return None, {}
    if name not in registry:
        where = (*path, "name") if isinstance(raw, Mapping) and "name" in raw else path
        report(where, f"unknown {path[-1]} {name!r}{space_mod.did_you_mean(name, registry)} (expected one of {', '.join(registry)})")
        return None, {}
    return name, dict(options)


def _check_options(name: str, options: dict, path: tuple, report: Callable, build: Callable[[], Any]) -> None:
    cls = (samplers.SAMPLERS if path[-1] == "sampler" else samplers.PRUNERS)[name]
    allowed = samplers.options_of(cls)
    unknown = [k for k in options if k not in allowed]
    for key in unknown:
        report((*path, "options", key), f"{name} has no option {key!r}{space_mod.did_you_mean(key, allowed)} (expected one of {', '.join(allowed) or 'no options'})")
    if unknown:
        return
    # Optuna stores most options unchecked ("ten" trials fails at the eleventh ask): a number or a
    # boolean where the default is one.
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}
    mistyped = [key for key, value in options.items() if not _like(value, defaults.get(key))]
    for key in mistyped:
        default = defaults[key]
        what = "true or false" if isinstance(default, bool) else "an integer" if isinstance(default, int) else "a number"
        report((*path, "options", key), f"{options[key]!r} is not {what} (expected {what}, as its default {default!r})")
    if mistyped:
        return
    try:
        build()
    except Exception as err:  # the library's own argument checks say what is wrong
        report((*path, "options"), f"{name} rejects these options: {err} (expected values {name} accepts)")


def _like(value: Any, default: Any) -> bool:
    """Whether `value` can stand where `default` is a boolean or a number (1 for true and 10.0 for
    10 as Python takes them); any value where the default is something else."""
    if isinstance(default, bool):
        return isinstance(value, bool) or value in (0, 1)
    if isinstance(default, (int, float)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and (isinstance(default, float) or float(value).is_integer())
    return True


def _one_or_many(raw: Mapping, path: tuple, one: str, many: str, report: Callable) -> list[str]:
    if one in raw and many in raw:
        report((*path, many), f"give either {one} or {many}, not both (expected one of them)")
        return []
    if one in raw:
        value = raw[one]
        if not isinstance(value, str):
            report((*path, one), f"{value!r} is not a string (expected a single {one})")
            return []
        return [value]
    if many in raw:
        value = raw[many]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            report((*path, many), f"must be a non-empty list of strings (expected [{one}, ...])")
            return []
        return list(value)
    report(path, f"missing {one} (expected {one}: ... or {many}: [...])")
    return []


def _number(raw: Mapping, path: tuple, key: str, kind: Any, report: Callable, minimum: float, exclusive: bool = False) -> Any:
    if key not in raw or raw[key] is None:
        return None
    value = raw[key]
    # `not value >= minimum`, not `value < minimum`: NaN compares false either way, and is refused.
    if isinstance(value, bool) or not isinstance(value, kind) or not value >= minimum or (exclusive and value == minimum):
        what = "an integer" if kind is int else "a number"
        bound = f"> {minimum}" if exclusive else f">= {minimum}"
        report((*path, key), f"{value!r} is not {what} {bound} (expected {what} {bound})")
        return None
    return value


def _unknown_keys(raw: Mapping, path: tuple, allowed: set[str], report: Callable) -> list:
    unknown = [key for key in raw if key not in allowed]
    for key in unknown:
        report((*path, key), f"unknown key{space_mod.did_you_mean(key, allowed)} (expected one of {', '.join(sorted(allowed))})")
    return unknown


def _python_types(hint: Any) -> tuple[type, ...]:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    types_ = tuple(typing.get_origin(a) or a for a in args)
    types_ = tuple(t for t in types_ if isinstance(t, type))
    return (*types_, int) if float in types_ and int not in types_ else types_
