"""Storage URLs: each scheme opens the right storage; no password ever reaches the user."""

from __future__ import annotations

import logging
import pickle
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
from conftest import _free_port, _wait_port, hpo, study_file
from optuna.storages import JournalStorage, RDBStorage

from hpo.storage import RDB_MAX_STALENESS, StorageError, open_storage, redact, refresh, resolve_url

SECRET = "Tr0ub4dor-and-3"


def with_password(url: str, password: str = SECRET) -> str:
    scheme, _, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    user = userinfo.split(":")[0] if at else ""
    return f"{scheme}://{user}:{password}@{host if at else rest}"


def roundtrip(storage) -> None:
    study = optuna.create_study(storage=storage, study_name="roundtrip")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="roundtrip", storage=storage).trials) == 2


def test_default_is_an_embedded_journal_file_in_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HPO_STORAGE", raising=False)
    assert resolve_url(None) == "hpo.journal"
    storage = open_storage(None)
    assert isinstance(storage, JournalStorage)
    roundtrip(storage)
    assert (tmp_path / "hpo.journal").exists()


def test_hpo_storage_env_var_sets_the_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HPO_STORAGE", str(tmp_path / "elsewhere.journal"))
    roundtrip(open_storage(None))
    assert (tmp_path / "elsewhere.journal").exists()


def test_sqlite_url_is_an_rdb_storage(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    assert isinstance(storage._backend, RDBStorage)
    roundtrip(storage)


def test_database_reads_of_the_trial_list_may_be_a_window_old_but_never_miss_own_writes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    mine, theirs = open_storage(url), open_storage(url)  # two workers' storages
    assert mine._max_staleness == RDB_MAX_STALENESS
    mine._max_staleness = 3600.0  # a window no test step outlasts, however slow the machine
    study = optuna.create_study(storage=mine, study_name="s")
    other = optuna.load_study(study_name="s", storage=theirs)
    assert study.trials == []  # the read that opens the window
    other.tell(other.ask(), 1.0)
    assert study.trials == []  # another worker's trial, within the window: not yet seen
    refresh(mine)  # what the trial budget does under the study's lock
    assert [t.value for t in study.trials] == [1.0]

    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    # Its own new trial and parameters: seen at once (trials sampled together must see each other's).
    assert study.trials[-1].params == {"x": x}
    trial.report(0.5, step=0)
    assert study._storage.get_trial(trial._trial_id).intermediate_values == {0: 0.5}  # a running trial: fresh
    study.tell(trial, 2.0)
    assert [t.value for t in study.trials] == [1.0, 2.0]  # its own state change: seen at once

    other.tell(other.ask(), 3.0)
    assert [t.value for t in study.trials] == [1.0, 2.0]
    mine._max_staleness = 0.0  # the window has passed
    assert [t.value for t in study.trials] == [1.0, 2.0, 3.0]
    # Read times are of this process's clock: a copy in another process starts without them.
    assert pickle.loads(pickle.dumps(mine))._read_at == {}


def test_redis_url_is_a_journal_with_optunas_key_layout(redis_url: str) -> None:
    import redis

    storage = open_storage(redis_url)
    assert isinstance(storage, JournalStorage)
    roundtrip(storage)
    client = redis.Redis.from_url(redis_url)
    assert client.exists(":log_number")  # Optuna's own backend (no prefix) reads this key


def test_redis_prefix_from_the_url(redis_url: str) -> None:
    import redis

    roundtrip(open_storage(redis_url + "?prefix=teamA"))
    assert redis.Redis.from_url(redis_url).exists("teamA:log_number")


def test_postgresql_url_is_an_rdb_storage(postgres_url: str) -> None:
    storage = open_storage(postgres_url)
    assert isinstance(storage._backend, RDBStorage)
    roundtrip(storage)


def test_mysql_url_is_an_rdb_storage(mysql_url: str) -> None:
    storage = open_storage(mysql_url)
    assert isinstance(storage._backend, RDBStorage)
    roundtrip(storage)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://host/x", "unknown storage scheme ftp:// in ftp://host/x (expected redis://, postgresql://, mysql://, sqlite:/// or a journal file path)"),
        ("/no/such/folder/h.journal", "cannot create journal file /no/such/folder/h.journal: folder /no/such/folder does not exist"),
        ("redis://127.0.0.1:1/0", "cannot reach Redis at redis://127.0.0.1:1/0"),
        ("postgresql://postgres@127.0.0.1:1/x", "cannot connect to postgresql://postgres@127.0.0.1:1/x"),
        # redis-py would read a database that is not a number as database 0, someone else's.
        ("redis://127.0.0.1:6379/x", "bad Redis URL redis://127.0.0.1:6379/x: database 'x' is not a number (expected redis://host:6379/0)"),
        ("redis://[::1:6379/0", "cannot open storage redis://[::1:6379/0: Invalid IPv6 URL"),
        # The drivers said "connection refused", or showed Python's int() error.
        ("mysql://root@127.0.0.1:99999/x", "bad port 99999 in mysql://root@127.0.0.1:99999/x (expected a number from 0 to 65535"),
        (f"postgresql://bob:{SECRET}@127.0.0.1:abc/x", "bad port *** in postgresql://bob:***@127.0.0.1:***/x (expected"),
        # No @host: a password may stand where the port would, so nothing after the colon is shown.
        ("redis://127.0.0.1:99999/0", "bad port *** in redis://127.0.0.1:***/0"),
        (f"postgresql://bob:{SECRET}/x", "bad port *** in postgresql://bob:***/x (expected a number from 0 to 65535, as host:5432; "
                                         "a password goes before an @: user:password@host)"),
        (f"postgresql://bob:pa:{SECRET}/x", "bad port *** in postgresql://bob:***/x"),
        ("postgresql://bob:1234567/x", "bad port *** in postgresql://bob:***/x"),
        (f"postgresql://bob:pa\tss{SECRET}/x", "bad port *** in postgresql://bob:***/x"),
    ],
)
def test_bad_urls_are_one_clear_line(url: str, expected: str) -> None:
    with pytest.raises(StorageError) as info:
        open_storage(url)
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


def test_redact_hides_only_the_password() -> None:
    assert redact(f"postgresql://bob:{SECRET}@db:5432/hpo") == "postgresql://bob:***@db:5432/hpo"
    assert redact(f"redis://:{SECRET}@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact("redis://cache:6379/0") == "redis://cache:6379/0"
    # Where urlsplit would end the user part early and show the rest of the password as the path,
    # in the query string, and in a malformed URL that urlsplit refuses.
    assert redact("postgresql://bob:pa/ss#w?rd@db:5432/hpo") == "postgresql://bob:***@db:5432/hpo"
    assert redact(f"redis://cache:6379/0?password={SECRET}&prefix=a") == "redis://cache:6379/0?password=***&prefix=a"
    assert redact(f"mysql://root:{SECRET}@[::1/x") == "mysql://root:***@[::1/x"
    # An @ after the host, and no password: nothing to hide, nothing refused.
    for url in ("redis://localhost:6379/0?prefix=team@lab", "sqlite:///runs@v2/hpo.db"):
        assert redact(url) == url
    assert redact(f"redis://:{SECRET}@host:6379/0?prefix=team@lab") == "redis://:***@host:6379/0?prefix=team@lab"


@pytest.mark.parametrize("password", ["pa#ss", "pa/ss", "pa?ss"])
def test_a_password_with_a_raw_delimiter_is_refused_without_showing_it(password: str) -> None:
    with pytest.raises(StorageError) as info:
        open_storage(f"postgresql://bob:{password}{SECRET}@127.0.0.1:1/x")
    assert str(info.value).startswith("the password in postgresql://bob:***@127.0.0.1:1/x holds a raw")
    assert SECRET not in str(info.value) and "ss" + SECRET not in str(info.value)


@pytest.mark.parametrize("url", [f"postgresql://bob:{SECRET}@127.0.0.1:1/x", f"redis://:{SECRET}@127.0.0.1:1/0", f"mysql://root:{SECRET}@127.0.0.1:1/x",
                                 f"redis://127.0.0.1:1/0?password={SECRET}", f"postgresql://bob@127.0.0.1:1/x?password={SECRET}"])
def test_password_absent_from_errors_and_logs(url: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError) as info:
        open_storage(url)
    captured = capsys.readouterr()
    assert SECRET not in str(info.value) and "***" in str(info.value)
    assert SECRET not in caplog.text + captured.out + captured.err


def test_a_worker_that_cannot_join_says_only_why(tmp_path: Path) -> None:
    # "worker joining study ..." came first, as if it had joined.
    result = hpo("worker", "--study", "x", "--storage", str(tmp_path / "nosuch.journal"), cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("hpo: error: ") and len(result.stderr.splitlines()) == 1


def test_password_absent_from_cli_errors() -> None:
    result = hpo("status", "--study", "x", "--storage", f"redis://:{SECRET}@127.0.0.1:1/0")
    assert result.returncode == 2
    assert result.stderr.startswith("hpo: error: cannot reach Redis at redis://:***@127.0.0.1:1/0")
    assert SECRET not in result.stdout + result.stderr


def test_wrong_redis_password_is_one_line_without_the_password(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not on PATH")
    port = _free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--requirepass", "right-one", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        assert _wait_port(port)
        result = hpo("studies", "--storage", f"redis://:{SECRET}@127.0.0.1:{port}/0")
        assert result.returncode == 2
        assert result.stderr.startswith(f"hpo: error: Redis at redis://:***@127.0.0.1:{port}/0 refused the credentials")
        assert SECRET not in result.stdout + result.stderr
    finally:
        server.kill()
        server.wait()


def test_password_absent_from_a_whole_study_run_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    # The local server trusts loopback, so any password gets in: the study runs with it in the URL.
    url = with_password(postgres_url)
    path = study_file(tmp_path, "secret-pg", study={"n_trials": 2}, trainer={"epochs": 1})
    outputs = []
    for args in (["create", str(path)], ["worker", "--study", "secret-pg"], ["status", "--study", "secret-pg"], ["best", "--study", "secret-pg"], ["studies"]):
        result = hpo(*args, "--storage", url)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    assert SECRET not in "".join(outputs)
    assert "***" in outputs[0]


# A trial's parameters: sampled with a fresh read of the study, written in one go -----------------

SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}, "layers": {"type": "int", "low": 1, "high": 3},
         "optimizer": {"type": "categorical", "choices": {"adam": {"beta1": {"type": "float", "low": 0.8, "high": 0.99}},
                                                          "sgd": {"momentum": {"type": "float", "low": 0.5, "high": 0.99}}}}}


def _space():
    from hpo import space

    return space.parse(SPACE, ("space",), lambda path, message: pytest.fail(f"{path}: {message}"))


def _url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "s.journal") if kind == "journal" else request.getfixturevalue(f"{kind}_url")


@pytest.mark.parametrize("kind", ["journal", "redis", "postgres", "mysql"])
def test_trials_sampled_one_after_another_see_the_params_of_those_before(kind: str, request, tmp_path: Path) -> None:
    """Population mode asks for several trials, then samples them one by one: each must see the
    ones before it with their parameters. QMC infers its search space from the running trials in
    Optuna's per-thread copy of the trial list, which, read for the first, once served the later
    ones too, without those parameters: they were sampled at random instead."""
    from hpo import space

    storage = open_storage(_url(kind, request, tmp_path))
    sampler = optuna.samplers.QMCSampler(seed=0, warn_independent_sampling=False)
    study = optuna.create_study(storage=storage, study_name=f"qmc-{tmp_path.name}", sampler=sampler)
    relative: list[dict] = []
    sample_relative = sampler.sample_relative
    sampler.sample_relative = lambda *args: relative.append(sample_relative(*args)) or relative[-1]
    trials = [study.ask() for _ in range(3)]
    for trial in trials:
        space.suggest(trial, _space())
    # The first at random; the later ones on the space of those before them (QMC's points).
    assert relative[0] == {} and set(relative[1]) == set(trials[0].params) and {"lr", "layers"} <= set(relative[2])
    assert trials[1].params["lr"] != trials[2].params["lr"]


def test_a_parameter_held_back_does_not_skip_optunas_check_of_its_distribution(tmp_path: Path) -> None:
    """A journal hands a trial its replay's own record: parameters held back must not show there
    before they are written, or Optuna's replay finds the name first in this trial and skips
    checking it against the trials after it."""
    from hpo.storage import params_in_one_write

    url = str(tmp_path / "s.journal")
    mine = optuna.create_study(storage=open_storage(url), study_name="clash")
    trial = mine.ask()
    theirs = optuna.load_study(study_name="clash", storage=open_storage(url))
    theirs.ask().suggest_float("x", 0, 1)  # another worker, a later trial
    with pytest.raises(ValueError, match="different distribution kind"):
        with params_in_one_write(trial):
            trial.suggest_int("x", 0, 10)
    assert [t.params for t in optuna.load_study(study_name="clash", storage=open_storage(url)).trials] == [{}, {"x": pytest.approx(theirs.trials[1].params["x"])}]


@pytest.mark.parametrize("kind", ["journal", "redis"])
def test_a_trials_params_reach_a_journal_in_one_append(kind: str, request, tmp_path: Path, monkeypatch) -> None:
    from hpo import space

    url = _url(kind, request, tmp_path)
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name=f"one-append-{tmp_path.name}",
                                sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    appends: list[int] = []
    append_logs = storage._backend.append_logs
    monkeypatch.setattr(storage._backend, "append_logs", lambda logs: (appends.append(len(logs)), append_logs(logs))[1])
    params = space.suggest(trial, _space())
    assert appends == [4]  # lr, layers, optimizer and the chosen optimizer's own parameter
    assert space.suggest(trial, _space()) == params and appends == [4]  # asked again: nothing written
    # Another process's view: the values as drawn.
    other = optuna.load_study(study_name=study.study_name, storage=open_storage(url))
    assert space.unflatten(_space(), other.trials[0].params) == params
    assert other.trials[0].distributions == trial.distributions


@pytest.mark.parametrize("kind", ["journal", "redis"])
def test_params_of_a_trial_finished_meanwhile_fail_and_leave_the_journal_readable(kind: str, request,
                                                                                tmp_path: Path) -> None:
    """A sweeper may fail a trial while its worker samples it: the write raises what Optuna's
    raises, and none of the parameters held back behind the first one raises on a later read."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from hpo.storage import set_trial_params

    url = _url(kind, request, tmp_path)
    mine = open_storage(url)
    study = optuna.create_study(storage=mine, study_name=f"finished-{tmp_path.name}")
    trial = study.ask()
    open_storage(url).set_trial_state_values(trial._trial_id, TrialState.FAIL)  # another worker
    params = [(name, 0.5, optuna.distributions.FloatDistribution(0, 1)) for name in ("a", "b", "c")]
    with pytest.raises(UpdateFinishedTrialError):
        set_trial_params(mine, trial._trial_id, params)
    assert [(t.state, t.params) for t in study.get_trials()] == [(TrialState.FAIL, {})]
    study.tell(study.ask(), 1.0)  # the storage goes on working
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.parametrize("kind", ["journal", "redis", "postgres", "mysql"])
@pytest.mark.parametrize("landed", [False, True])
def test_a_retry_after_a_failed_write_of_params_writes_the_values_the_trial_has(kind: str, landed: bool, request,
                                                                               tmp_path: Path, monkeypatch) -> None:
    """The write fails before it reaches the storage, or after (its reply lost): either way the
    retry leaves the storage with the values the trial trains with, and only its branch's."""
    from functools import partial

    from hpo import space
    from hpo import storage as storage_mod
    from hpo.outage import persist

    url = _url(kind, request, tmp_path)
    study = optuna.create_study(storage=open_storage(url), study_name=f"retry-{tmp_path.name}",
                                sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    write, failures = storage_mod.set_trial_params, [ConnectionError("the connection dropped")]

    def flaky(*args):
        if failures and landed:
            write(*args)
        if failures:
            raise failures.pop()
        return write(*args)

    monkeypatch.setattr(storage_mod, "set_trial_params", flaky)
    params = persist(partial(space.suggest, trial, _space()), "sampling a trial", patience=30)
    assert not failures
    stored = optuna.load_study(study_name=study.study_name, storage=open_storage(url)).trials[0]
    assert stored.params == trial.params and space.unflatten(_space(), stored.params) == params


def test_a_short_password_is_scrubbed_where_it_stands_apart_not_from_every_word(monkeypatch) -> None:
    from hpo import storage as storage_mod

    monkeypatch.setattr(storage_mod, "_SECRETS", set())
    storage_mod._remember_password("redis://:e@cache:6379/0")
    assert storage_mod.scrub("Error 111 connecting to redis://:e@cache:6379/0?password=e&x=1 (e)") == \
        "Error 111 connecting to redis://:***@cache:6379/0?password=***&x=1 (***)"
    storage_mod._remember_password(f"redis://:{SECRET}@cache:6379/0")  # a long one: everywhere, inside words too
    assert storage_mod.scrub(f"auth{SECRET}failed for e") == "auth***failed for ***"
    # One password inside another: the longer is masked whole, whatever the set's order.
    storage_mod._remember_password("postgresql://u:ab@db/x?password=ab-cd")
    assert storage_mod.scrub("auth failed for ab-cd") == "auth failed for ***"
