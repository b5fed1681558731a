"""The `hpo` command line: parse, call, print. Errors are one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as a tool killed by SIGPIPE shows in the shell


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the command started (building the parser imports Optuna)
        print("hpo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    import optuna

    from hpo.config import ConfigError
    from hpo.coordinator import StudyError
    from hpo.dashboard import DashboardError
    from hpo.storage import StorageError, scrub
    from hpo.supervisor import SupervisorError
    from hpo.task import TaskImportError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a reader that left is found here, not by Python's flush at exit
        return code
    except (ConfigError, StorageError, StudyError, TaskImportError, SupervisorError, DashboardError) as err:
        _print_user_error(err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("hpo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if isinstance(err, BrokenPipeError) and _reader_left():
            # The reader left (`hpo status | head`): stop quietly, as Unix tools do. Python would
            # also fail flushing stdout at exit, so stdout points at /dev/null from here on.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_BROKEN_PIPE
        # Only the commands that draw import hpo.plots (through Optuna's importance evaluators it
        # pulls in scikit-learn: a second of start-up that every other command would pay).
        plots = sys.modules.get("hpo.plots")
        if plots is not None and isinstance(err, plots.PlotError):
            print(f"hpo: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        if args.debug:
            print(scrub(traceback.format_exc()), file=sys.stderr)
        print(f"hpo: error: {scrub(f'{type(err).__name__}: {err}')} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _print_user_error(err: ValueError) -> None:
    """A user's error as the CLI gives it: a config's problems a line each, anything else in one line."""
    problems = getattr(err, "problems", None)  # `ConfigError`'s
    print(*(problems or [f"hpo: error: {err}"]), sep="\n", file=sys.stderr)


def _reader_left() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpo", description="Hyperparameter optimization for PyTorch, from one YAML file.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Callable, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.set_defaults(handler=handler)
        return sub

    storage_help = "storage URL: redis://, postgresql://, mysql://, sqlite:/// or a journal file (default: $HPO_STORAGE, else ./hpo.journal)"
    run = command("run", _run, "create (or resume) a study and run it here with J local workers")
    run.add_argument("file", help="the study file (YAML)")
    run.add_argument("--storage", help=storage_help)
    run.add_argument("--jobs", "-j", type=_positive, default=1, help="local worker processes (default 1)")
    run.add_argument("--threads", type=_positive, help="torch CPU threads per worker (default: trainer.threads, else 1)")
    _on_exists(run)

    create = command("create", _create, "create a study in shared storage, with its config, for workers to join")
    create.add_argument("file", help="the study file (YAML)")
    create.add_argument("--storage", help=storage_help)
    _on_exists(create)

    worker = command("worker", _worker, "join a study and run its trials until the budget is spent")
    worker.add_argument("--study", required=True, help="study name")
    worker.add_argument("--storage", help=storage_help)
    worker.add_argument("--worker-index", type=int, help="this worker's number; its sampler seed is the study seed + this (default: from host and pid)")
    worker.add_argument("--threads", type=_positive, help="torch CPU threads per worker (default: trainer.threads, else 1)")
    slots = worker.add_mutually_exclusive_group()
    slots.add_argument("--jobs", "-j", type=_positive, help="run J CPU worker processes under one supervisor")
    slots.add_argument("--gpus", help="one worker per GPU: 0,1,2 or all (each pinned with CUDA_VISIBLE_DEVICES)")
    worker.add_argument("--per-gpu", type=_positive, default=1, help="workers per GPU with --gpus, for small models (default 1)")

    for name, handler, help in (
        ("status", _status, "trial counts by state, best trial, per-worker activity"),
        ("best", _best, "the best trial's params as YAML that hpo accepts as a fixed space"),
    ):
        sub = command(name, handler, help)
        sub.add_argument("--study", help="study name (default: the only study in the storage)")
        sub.add_argument("--storage", help=storage_help)
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "status":
            view = sub.add_mutually_exclusive_group()
            view.add_argument("--trial", type=int, metavar="N", help="one trial in full: params, curve, attempts, traceback")
            view.add_argument("--watch", action="store_true", help="live view, redrawn until the study is done (Ctrl-C to stop)")
            sub.add_argument("--interval", type=float, default=2.0, help="seconds between redraws with --watch (default 2)")

    studies = command("studies", _studies, "list the studies in a storage")
    studies.add_argument("--storage", help=storage_help)
    studies.add_argument("--json", action="store_true", help="machine-readable output")

    check = command("check", _check, "validate a study file and exit (2 when it has problems)")
    check.add_argument("file", help="the study file (YAML)")

    from hpo.plots import EVALUATORS, KINDS

    plot = command("plot", _plot, "write a plot of a study as offline HTML, or PNG/SVG/PDF with kaleido")
    plot.add_argument("kind", choices=KINDS, help="what to plot")
    plot.add_argument("--study", help="study name (default: the only study in the storage)")
    plot.add_argument("--storage", help=storage_help)
    plot.add_argument("-o", "--out", required=True, help="output file: .html, .png, .svg or .pdf")
    plot.add_argument("--evaluator", choices=list(EVALUATORS), default="ped-anova", help="importance evaluator (default ped-anova)")

    report = command("report", _report, "write one self-contained HTML page about a study: summary, plots, waste, pruning reliability")
    report.add_argument("--study", help="study name (default: the only study in the storage)")
    report.add_argument("--storage", help=storage_help)
    report.add_argument("-o", "--out", required=True, help="an .html file, or a folder that gets STUDY.html")
    report.add_argument("--evaluator", choices=list(EVALUATORS), default="ped-anova", help="importance evaluator (default ped-anova)")

    dashboard = command("dashboard", _dashboard, "serve optuna-dashboard for a study on loopback (reach it over an ssh tunnel)")
    dashboard.add_argument("--study", help="study name (default: the only study in the storage)")
    dashboard.add_argument("--storage", help=storage_help)
    dashboard.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)")
    dashboard.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; the dashboard has no authentication)")
    return parser


def _on_exists(sub: argparse.ArgumentParser) -> None:
    group = sub.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue an existing study of that name with this file's config")
    group.add_argument("--overwrite", action="store_true", help="delete an existing study of that name first")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {value}")
    return value


def _on_exists_mode(args: argparse.Namespace) -> str:
    return "overwrite" if args.overwrite else "resume" if args.resume else "refuse"


def _check(args: argparse.Namespace) -> int:
    from hpo import space
    from hpo.config import load_config

    config = load_config(args.file)
    n = len(space.params(config.space))
    print(f"{args.file}: ok: study {config.study.name}, {n} parameters, {config.study.sampler} sampler, {config.study.pruner} pruner")
    return 0


def _create(args: argparse.Namespace) -> int:
    from hpo import coordinator
    from hpo.config import load_config
    from hpo.storage import open_storage, redact, resolve_url

    config = load_config(args.file)
    url = resolve_url(args.storage)
    created = coordinator.create(config, open_storage(url), on_exists=_on_exists_mode(args), source=os.path.abspath(args.file))
    verb = "exists; resumed with this config" if created.resumed else "created"
    print(f"study {config.study.name} {verb} in {redact(url)}")
    print(f"join it from any machine: hpo worker --study {config.study.name} --storage '{redact(url)}'")
    return 0


def _run(args: argparse.Namespace) -> int:
    from hpo import coordinator, objective
    from hpo.config import load_config
    from hpo.progress import StudyProgress
    from hpo.report import all_failed, status_text, trial_text
    from hpo.storage import open_storage, redact, refresh, resolve_url, scrub
    from hpo.worker import check_device, run_worker

    config = load_config(args.file)
    check_device(config)  # before the study is made, and before the --jobs workers start
    url = resolve_url(args.storage)
    if "://" not in url:
        url = os.path.abspath(url)
    storage = open_storage(url)
    created = coordinator.create(config, storage, on_exists=_on_exists_mode(args), source=os.path.abspath(args.file))
    study = created.study
    threads = args.threads
    s = config.study
    budget = f"{s.n_trials} trials" if s.n_trials else f"{s.timeout:g}s"
    jobs = min(args.jobs, s.n_trials) if s.n_trials else args.jobs  # a worker past the budget would only wait
    print(f"{'resuming' if created.resumed else 'running'} study {s.name} on {redact(url)}: {budget}, "
          f"{s.sampler} sampler, {s.pruner} pruner, {jobs} worker(s) x {objective.threads_for(config, threads)} thread(s)")
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_child_worker, args=(s.name, url, index, threads), name=f"hpo-worker-{index}")
        for index in range(1, jobs)
    ]
    # Earlier runs' results; queued trials (a baseline, a retry) are this run's to train.
    finished_before = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    for child in children:
        child.start()
    try:
        with StudyProgress(study, config):
            summary = run_worker(s.name, url, index=0, threads=threads)
            for child in children:
                child.join()
    finally:
        for child in children:
            child.join()
    refresh(study._storage)
    print(status_text(study, config))
    print(f"wall time {time.perf_counter() - started:.1f}s")
    failed = all_failed([t for t in study.get_trials(deepcopy=False) if t.number not in finished_before])
    if failed is not None and not summary.interrupted:
        # Nothing to show for the run: say so in the exit code, with the first failure's traceback.
        print(scrub(trial_text(failed, config)), file=sys.stderr)
        print(f"hpo: error: no trial of this run completed: every one failed (trial {failed.number} above; "
              f"any trial: {_status_command(s.name, args.storage)} --trial N)", file=sys.stderr)
        return 1
    if summary.interrupted:
        print(f"stopped by {summary.interrupted}; the interrupted trial was re-queued. Continue with: hpo run {args.file}")
        return EXIT_INTERRUPTED if summary.interrupted == "SIGINT" else 0
    stopped = [(index, child.exitcode) for index, child in enumerate(children, start=1) if child.exitcode]
    if stopped:  # its error line is above; the other workers ran the study without it
        index, code = stopped[0]
        print(f"hpo: error: worker {index} of {jobs} stopped with exit code {code} (its error is above)", file=sys.stderr)
        return code if code == EXIT_USAGE else 1
    return 0


def _status_command(study: str, storage: str | None) -> str:
    """The `hpo status` command for the study, as given; a storage URL is not repeated (it may
    hold a password)."""
    return f"hpo status --study {study}" + ("" if storage is None else " --storage URL")


def _child_worker(study_name: str, url: str, index: int, threads: int) -> None:
    try:
        from hpo.worker import run_worker  # torch: a second or two, in which Ctrl-C lands most often

        summary = run_worker(study_name, url, index=index, threads=threads)
    except KeyboardInterrupt:  # before the worker took over the signal: nothing of the study to hand back
        sys.exit(EXIT_INTERRUPTED)
    except ValueError as err:
        from hpo.config import ConfigError
        from hpo.coordinator import StudyError
        from hpo.storage import StorageError
        from hpo.task import TaskImportError

        if not isinstance(err, (ConfigError, StorageError, StudyError, TaskImportError)):
            raise
        _print_user_error(err)  # as the main process gives it
        sys.exit(EXIT_USAGE)
    sys.exit(EXIT_INTERRUPTED if summary.interrupted == "SIGINT" else 0)


def _worker(args: argparse.Namespace) -> int:
    from hpo.report import describe_trial
    from hpo.storage import redact, resolve_url
    from hpo.task import importable_from
    from hpo.worker import run_worker

    url = resolve_url(args.storage)
    # As `python -m hpo worker` and `hpo run` do: a task module in the working directory imports.
    importable_from(os.getcwd())
    if args.jobs or args.gpus:
        from hpo import supervisor
        from hpo.coordinator import open_study

        slots = supervisor.slots(args.gpus, args.per_gpu, args.jobs)
        # An unknown study or an unreachable server: one line here, not one from every worker. The
        # task is imported by each worker, on its own device.
        open_study(url, args.study, import_task=False)
        threads = args.threads
        print(f"supervising {len(slots)} workers on study {args.study} ({redact(url)})", flush=True)
        return supervisor.supervise(args.study, url, slots, first_index=args.worker_index or 0, threads=threads)
    summary = run_worker(
        args.study, url, index=args.worker_index, threads=args.threads,
        on_trial=lambda trial, config: print(describe_trial(trial, config.study.metrics), flush=True),
        # Once the study is open: a mistyped study or storage gets its one error line only.
        on_start=lambda: print(f"worker joining study {args.study} on {redact(url)}", flush=True),
    )
    done = ", ".join(f"{n} {state.lower()}" for state, n in summary.states.items()) or "no trials"
    print(f"worker {summary.worker} done: {done}", flush=True)
    if summary.interrupted:
        return EXIT_INTERRUPTED if summary.interrupted == "SIGINT" else 0
    if summary.all_failed():
        # A scheduler (a Slurm array, a Kubernetes Job) then shows the failure, as for `hpo run`.
        print(f"hpo: error: every trial this worker ran failed; why: {_status_command(args.study, args.storage)} "
              f"--trial {summary.first_failed}", file=sys.stderr, flush=True)
        return 1
    return 0


def _open_study(args: argparse.Namespace):
    from hpo import coordinator, heartbeat

    # These commands only read the study: the machine they run on need not have the task's code.
    study, config = coordinator.open_study(args.storage, args.study, import_task=False)
    # Looking is also sweeping: a study whose last worker died is cleaned up by the next look.
    heartbeat.sweep(study, config.study.grace_period, config.study.max_retries)
    return study, config


def _status(args: argparse.Namespace) -> int:
    from hpo import live
    from hpo.report import status_text

    study, config = _open_study(args)
    if args.trial is not None:
        return _one_trial(study, config, args.trial, args.json)
    if args.watch:
        live.watch(lambda: live.snapshot(study, config), interval=args.interval)
    elif args.json:
        print(_json(live.snapshot(study, config)))
    else:
        print(status_text(study, config))
        for line in live.status_lines(study, config):
            print(line)
    return 0


def _json(data: object) -> str:
    """JSON that every parser reads: a NaN or infinite value (a diverged trial's) becomes null,
    where `json.dumps` would write NaN, which is not JSON."""

    def finite(x: object) -> object:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(data), allow_nan=False)


def _one_trial(study, config, number: int, as_json: bool) -> int:
    from hpo.coordinator import StudyError
    from hpo.report import trial_record, trial_text
    from hpo.storage import scrub

    trials = study.get_trials(deepcopy=False)
    trial = next((t for t in trials if t.number == number), None)
    if trial is None:
        raise StudyError(f"study {study.study_name} has no trial {number} (trials 0-{len(trials) - 1})" if trials
                         else f"study {study.study_name} has no trials yet")
    print(scrub(_json(trial_record(trial, config)) if as_json else trial_text(trial, config)))
    return 0


def _best(args: argparse.Namespace) -> int:
    from hpo.report import best_trials, best_yaml, params_of

    study, config = _open_study(args)
    if args.json:
        best = [{"number": t.number, "values": t.values, "params": params_of(t, config)} for t in best_trials(study)]
        print(_json(best))
    else:
        print(best_yaml(study, config), end="")
    return 0


def _studies(args: argparse.Namespace) -> int:
    import optuna

    from hpo.storage import open_storage, redact, resolve_url

    rows = []
    for s in optuna.get_all_study_summaries(open_storage(args.storage, existing=True), include_best_trial=True):
        best = s.best_trial.values if s.best_trial is not None else None
        rows.append({"study": s.study_name, "trials": s.n_trials, "directions": [d.name.lower() for d in s.directions], "best": best})
    if args.json:
        print(json.dumps(rows))
    for r in [] if args.json else rows:
        best = ", ".join(f"{v:.4f}" for v in r["best"]) if r["best"] else "-"
        print(f"{r['study']}: {r['trials']} trials, {'/'.join(r['directions'])}, best {best}")
    if not rows and not args.json:
        print(f"no studies in {redact(resolve_url(args.storage))}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from hpo import plots

    study, config = _open_study(args)
    plots.write(plots.figure(args.kind, study, evaluator=args.evaluator, metrics=config.study.metrics), args.out)
    print(f"wrote {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from hpo import html_report
    from hpo.storage import redact, resolve_url

    study, config = _open_study(args)
    page = html_report.build(study, config, storage_label=redact(resolve_url(args.storage)), evaluator=args.evaluator)
    print(f"wrote {html_report.write(page, args.out, study.study_name)}")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from hpo import dashboard

    study, _ = _open_study(args)
    try:
        dashboard.serve(study._storage, study._study_id, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a server is stopped, not an error
    return 0


if __name__ == "__main__":
    sys.exit(main())
