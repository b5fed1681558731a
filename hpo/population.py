"""Population mode (`study.vectorize`): a worker asks for up to K trials at once, groups them by
architecture, and trains each group as one stacked model (`trainers.vectorized`).

- **Grouping.** Each asked trial's model is built at once, under the trial's seed (the same
  weights it would start from alone), and trials whose models have the same architecture
  (parameter names and shapes, module types) form a group; with ``vectorize.pad`` above 1, so do
  plain MLPs whose hidden widths differ, padded with zeros to the widest of one of them
  (`vectorized.architecture`). Optimizer and its hyperparameters, schedule, dropout rate, label
  smoothing and gradient-clip value vary per slot. A trial whose model or hyperparameters cannot
  be stacked runs alone, as in the ordinary worker.
- **Reporting and pruning per slot.** After every validation each slot reports to its own trial
  and asks the pruner (`objective.PruningCallback`, as a solo trial does); a pruned, finished or
  failed slot is told at once. The writes go through the worker's storage thread
  (`hpo.overlap`) while the group trains on; an ask waits for them, so the sampler sees every
  result told before it.
- **Lookahead.** The worker holds up to ``lookahead × K`` asked trials (1 by default), and
  trains the largest same-architecture set among them first: with 12 architectures in a space,
  K asked trials rarely share one. The price is that the sampler proposes that many trials before
  it sees their results.
- **Refill.** A freed slot takes a waiting trial that fits the group (the least padded), or asks
  the sampler for one more (while the worker holds fewer than ``lookahead × K``); that trial starts from
  epoch 0 in the freed slot. A new trial of another
  architecture is not run solo at once but kept for the next group (it usually finds partners
  there), and the current group shrinks by one instead.
- **Asking ahead.** Where the worker asks ahead (`worker.asks_ahead`: Redis and databases, or
  ``study.ask_ahead: true``), the trials that will refill the slots in their last epoch are asked
  for and sampled on the storage thread while that epoch trains: the sampler works beside the
  training instead of between epochs, and sees the results told up to the epoch before (as a solo
  worker's next trial misses the running one's). They wait RUNNING and beating, and a worker that
  stops hands them back. Slots freed by pruning are refilled by an ask at the epoch's end.
- **Checkpoints.** With ``trainer.checkpoint_dir`` each slot writes its trial's checkpoints in
  the trial's own directory, in `fit`'s format: a handed-back trial's retry (which always runs
  alone) resumes from them.
- **Bookkeeping.** Every trial carries ``hpo:worker`` and ``hpo:seeds`` (written with the trial), plus
  ``hpo:vectorize`` (the width K, whether `auto` chose it, the data mode, and the group's model
  size over the trial's own) and ``hpo:vectorized_width`` (how
  many trials trained together when it started; 1 means solo). The heartbeat covers every trial
  the worker holds, waiting ones included.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hpo import coordinator, heartbeat, objective, overlap
from hpo import space as space_mod
from hpo.config import Config
from hpo.outage import persist
from hpo.worker import Interrupted, Signals, Summary, asks_ahead, finish, hand_back, restore_signals, trial_attrs
from trainers import vectorized
from trainers.stacked_optim import keeps_padding
from trainers.vectorized import NotVectorizable, Slot


@dataclass(eq=False)  # compared by identity: it holds a model
class Member:
    """An asked trial, its params and its model, waiting for or training in a group."""

    trial: optuna.Trial
    params: dict[str, Any]
    seed: int | None
    model: torch.nn.Module | None = None
    arch: vectorized.Architecture | None = None  # None: runs alone
    reason: str | None = None  # why it runs alone, when stacking was ruled out


def run(study: optuna.Study, config: Config, task: objective.Task, threads: int | None, seed: int | None,
        beat: heartbeat.Heartbeat, summary: Summary, on_trial) -> None:
    """The worker's loop in population mode, until the budget is spent or a signal comes."""
    Population(study, config, task, threads, seed, beat, summary, on_trial).run()


class Population:
    def __init__(self, study, config: Config, task: objective.Task, threads, seed, beat, summary: Summary, on_trial) -> None:
        self.study, self.config, self.task = study, config, task
        self.threads, self.sampler_seed, self.beat, self.summary, self.on_trial = threads, seed, beat, summary, on_trial
        self.patience = config.study.storage_patience
        self.vectorize = config.study.vectorize
        self.width: int | None = self.vectorize.width if self.vectorize.width != "auto" else None
        self.trainer_config = dataclasses.replace(config.trainer, threads=objective.threads_for(config, threads))
        self.pool: list[Member] = []  # asked, not yet training
        self.active: list[Member] = []  # training in the current group
        self.budget_spent = False
        self.asks_ahead = asks_ahead(config, study._storage)
        self.pending: Future | None = None  # trials asked ahead on the storage thread, for the next refills
        self.freed = 0  # slots ended in this epoch of the group and not yet refilled
        self.group_arch: vectorized.Architecture | None = None  # of the group training: its widest shapes
        self.signals = Signals()  # SIGINT or SIGTERM, noted while a group trains
        self.warned: set[str] = set()
        # Reports, attributes and results are written from this thread while the group trains.
        self.behind = overlap.StorageThread()
        self.solo_reason = self._global_reason()
        if self.solo_reason:
            self._warn(self.solo_reason)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        finally:
            try:
                self._hand_back_pending()
            finally:
                self.behind.close()

    def _run(self) -> None:
        while not self.summary.interrupted:
            self.behind.check()  # a write that failed for good stops the worker here, between groups
            if self.width is None:
                self._ask(1)
                self.width = self._choose_width()
            self._ask(self.holding - len(self.pool))
            if not self.pool:
                return
            group = self._next_group()
            if group[0].arch is None or self.solo_reason:
                self._solo_all(group)
            else:
                self._train(group)
        if self.pool:  # a signal came: hand back the trials that never started
            for member in self.pool:
                self._hand_back(member)
            self.pool = []

    @property
    def holding(self) -> int:
        """How many trials the worker holds at most, waiting and training: `lookahead` groups'
        worth, so that trials of one architecture find each other among more asked ones."""
        return (self.width or 1) * self.vectorize.lookahead

    def _ask(self, n: int) -> list[Member]:
        """Up to `n` new trials into the pool: those asked ahead first (all of them), then new ones."""
        asked: list[optuna.Trial] = []
        if self.pending is not None:
            pending, self.pending = self.pending, None
            try:
                asked, spent = pending.result()
            except BaseException:
                self.beat.ahead(None)  # `_asked` handed back what it had asked for
                raise
            self.budget_spent = self.budget_spent or spent
        if n > len(asked) and not self.budget_spent:
            # The sampler sees every result told so far: one seeded worker proposes the same trials
            # every run. (A failed write is raised between groups, not here inside a group's refill.)
            try:
                self.behind.wait()
                more, spent = self._asked(n - len(asked))
            except BaseException:
                self._hand_back_now(asked, "an error in the worker")  # those asked ahead, held nowhere else
                self.beat.ahead(None)
                raise
            self.budget_spent = self.budget_spent or spent
            asked = [*asked, *more]
        members = [self._member(trial) for trial in asked]
        self.pool.extend(members)
        self._beat()  # before they leave `ahead`: a beat that listed them nowhere would orphan them
        self.beat.ahead(None)
        return members

    def _ask_ahead(self, slots: list[Slot]) -> None:
        """Before an epoch: asks, on the storage thread, for the trials that will refill the slots
        whose last epoch this is (those that pruning frees are asked for when they are)."""
        if not self.asks_ahead or self.pending is not None or self.budget_spent or self.signals.name:
            return  # (with a signal noted, the group stops before this epoch's first batch)
        waiting = sum(self._joins(m, self.group_arch) for m in self.pool)
        n = sum(s.epoch + 1 >= self.trainer_config.epochs for s in slots) - waiting
        if n > 0:
            self.pending = self.behind.submit(partial(self._asked, n, sample=True))

    def _asked(self, n: int, *, sample: bool = False) -> tuple[list[optuna.Trial], bool]:
        """`n` new trials, fewer when the budget is spent, and whether it is; on the storage thread
        (`sample`), their params sampled too."""
        attrs = trial_attrs(self.summary.worker, self.sampler_seed)
        asked, _ = persist(partial(coordinator.ask, self.study, self.config, n, attrs), "asking for trials", self.patience)
        if sample:
            self.beat.ahead(asked)
            try:
                for trial in asked:
                    persist(partial(space_mod.suggest, trial, self.config.space), "sampling a trial", self.patience)
            except BaseException:
                self._hand_back_now(asked, "an error in the worker")
                raise
        return asked, len(asked) < n

    def _hand_back_now(self, trials: list[optuna.Trial], why: str) -> None:
        """Re-queues `trials` with their params from this thread (the storage thread's own calls)."""
        for trial in trials:
            with contextlib.suppress(Exception):  # not handed back: the sweep re-queues it after the grace period
                persist(partial(hand_back, self.study, trial, why), "handing back a trial", self.patience)

    def _hand_back_pending(self) -> None:
        """The trials asked ahead that will not train here go back to the queue with their params.
        Signals stay noted meanwhile: a SIGTERM does not cut the hand-back short (a second Ctrl-C
        does, as everywhere; the sweep then re-queues what was left)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        previous = self.signals.install()
        try:
            try:
                asked, _ = pending.result()
            except Exception:
                return  # the ask failed; `_asked` handed back what it had asked for
            why = self.summary.interrupted or self.signals.name or "an error in the worker"
            self._hand_back_now(asked, why)
        finally:
            self.beat.ahead(None)
            restore_signals(previous)

    def _member(self, trial: optuna.Trial) -> Member:
        seed = objective.trial_seed(self.config, trial.number)
        params = space_mod.suggest(trial, self.config.space)
        member = Member(trial, params, seed)
        if self.solo_reason or {"hpo:batch_size", "hpo:resume_from"} & trial._cached_frozen_trial.user_attrs.keys():
            return member  # out-of-memory and crash retries carry per-trial settings: alone
        try:
            spec = vectorized.check_hparams(params, self.config.trainer)
            if seed is not None:
                objective.seed_torch(seed)  # the weights this trial would start from alone
            member.model = self.task.model(params, self.task.data(params))
            vectorized.check_model(member.model)
            arch = vectorized.architecture(member.model)
            if arch.size == 0:
                return member  # nothing to train, nothing to stack: alone, where fit says what is wrong
            # With an eps of 0 its padding's update would be 0/0: it may stack with its own shapes only.
            member.arch = arch if keeps_padding(spec) else dataclasses.replace(arch, paddable=False)
        except NotVectorizable as err:
            member.model, member.reason = None, str(err)
        except Exception:  # the factory's own error is recorded when the trial runs alone
            member.model = None
        return member

    def _next_group(self) -> list[Member]:
        """The largest group of waiting trials that stack, up to K: of one architecture, or padded
        within `vectorize.pad` to the shapes of one waiting trial (each in turn), those padded
        least first. Among groups of K, the one with the least padding wins; then the larger set
        (more trials waiting that could train), then the one whose first trial waited longest."""
        groups = [([m], m) for m in self.pool if m.arch is None]  # each runs alone
        for anchor in dict.fromkeys(m.arch for m in self.pool if m.arch is not None):
            joined = [m for m in self.pool if self._joins(m, anchor)]
            groups.append((sorted(joined, key=lambda m: -m.arch.size), joined[0]))  # stable: the oldest first among equals

        def rank(entry: tuple[list[Member], Member]) -> tuple:
            group, first = entry
            cut = group[: self.width]
            waste = 0
            if first.arch is not None:  # the elements of zeros the slots compute on
                waste = len(cut) * vectorized.widest([m.arch for m in cut]).size - sum(m.arch.size for m in cut)
            return len(cut), -waste, len(group), -first.trial.number

        chosen = max(groups, key=rank)[0][: self.width]
        best = [m for m in self.pool if m in chosen]  # in the order asked: slot 0's seed orders shared data
        self.pool = [m for m in self.pool if m not in chosen]
        return best

    def _joins(self, member: Member, group: vectorized.Architecture) -> bool:
        """Whether `member` may train in a group of architecture `group`: the same, or its hidden
        widths padded to the group's at no more than `vectorize.pad` times its own size."""
        arch = member.arch
        return arch is not None and arch.fits(group) and group.size <= self.vectorize.pad * arch.size

    # -- one stacked group ----------------------------------------------------------------------

    def _train(self, group: list[Member]) -> None:
        self.active = list(group)
        self.group_arch = vectorized.widest([m.arch for m in group])
        self.freed = 0
        for member in group:
            self._record_start(member, len(group))
        self._beat()
        slots = [self._slot(m) for m in group]
        data = self.task.data(group[0].params)
        # While a group trains, the main thread is mostly inside storage calls (a report and a
        # pruning check per slot per epoch): a signal is noted here and acted on between calls,
        # so that no storage lock or half-written record is left behind.
        previous = self.signals.install()
        fallback: list[Member] = []
        try:
            vectorized.fit_stacked(
                [m.model for m in group], slots, data, self.trainer_config, kind=self.config.task.kind,
                per_slot_data=self.vectorize.data == "per_slot", seed=group[0].seed,
                refill=self._refill, on_slot_end=self._end, before_epoch=self._ask_ahead,
                stop=lambda: self.signals.name is not None,
            )
            if self.signals.name is not None:  # came during the last tell
                raise vectorized.Stopped([])
        except vectorized.Stopped:
            self.summary.interrupted = self.signals.name
            for member in self.active:
                self._hand_back(member)
            self.active = []
        except NotVectorizable as err:
            # Found at the first step, before any slot trained: these and all later trials run alone.
            self.solo_reason = str(err)
            self._warn(self.solo_reason)
            fallback, self.active = self.active, []
        except (KeyboardInterrupt, Interrupted) as stop:
            self.summary.interrupted = "SIGINT" if isinstance(stop, KeyboardInterrupt) else "SIGTERM"
            for member in self.active:
                self._hand_back(member)
            self.active = []
        except Exception as err:  # the whole group failed (e.g. out of memory): fail its trials, go on
            attrs = {"hpo:fail_reason": f"{type(err).__name__}: {err}"[:1000], "hpo:traceback": traceback.format_exc()[-4000:]}
            for member in self.active:
                self._tell(member, TrialState.FAIL, None, attrs)
            self.active = []
        finally:
            restore_signals(previous)
        if self.signals.name and not self.summary.interrupted:  # noted while the group failed or fell back
            self.summary.interrupted = self.signals.name
            for member in fallback:
                self._hand_back(member)
        elif fallback:
            self._solo_all(fallback)  # with the usual signal handling again
        self._beat()

    def _slot(self, member: Member) -> Slot:
        metrics = self.config.study.metrics
        callbacks = [objective.PruningCallback(member.trial, metrics[0], self.patience, self.behind.write)] if len(metrics) == 1 else []
        return Slot(key=member, hparams=member.params, seed=member.seed, callbacks=callbacks,
                    **objective.trial_dirs(self.config, member.trial.number))

    def _refill(self, slot: Slot):
        """A trial for the freed slot: a waiting one of the group's architecture, else one new
        trial from the sampler; None (the group shrinks) when neither fits."""
        freed = self.freed  # this one included
        self.freed = max(0, freed - 1)
        if self.summary.interrupted or self.signals.name:
            return None
        match = self._fitting(self.pool)
        room = self.holding - len(self.active) - len(self.pool)
        if match is None and room > 0:
            # One ask for every slot freed in this epoch (the refills come after all their ends).
            new = self._ask(max(1, min(freed, room)))
            match = self._fitting(new)
        if match is None:
            return None
        self.pool.remove(match)
        self.active.append(match)
        self._record_start(match, len(self.active) + self.freed)  # and the freed slots still to refill
        self._beat()
        return match.model, self._slot(match)

    def _fitting(self, members: list[Member]) -> Member | None:
        """The first of `members` that may train in the group, of those padded the least."""
        fitting = [m for m in members if self._joins(m, self.group_arch)]
        return max(fitting, key=lambda m: m.arch.size, default=None)

    def _end(self, slot: Slot) -> None:
        """Tells a finished, pruned or failed slot's trial at once."""
        member: Member = slot.key
        attrs: dict[str, Any] = {}
        values = None
        error = slot.error
        if error is None:
            attrs["hpo:metrics"] = slot.metrics
            missing = [m for m in self.config.study.metrics if m not in slot.metrics]
            if missing:
                error = KeyError(f"the loop did not report {', '.join(missing)} (it reported {', '.join(slot.metrics)})")
        if error is None:
            state, values = TrialState.COMPLETE, [slot.metrics[m] for m in self.config.study.metrics]
        elif isinstance(error, optuna.TrialPruned):
            state = TrialState.PRUNED
            attrs["hpo:pruned"] = str(error)
        else:
            state = TrialState.FAIL
            attrs["hpo:fail_reason"] = f"{type(error).__name__}: {error}"[:1000]
            attrs["hpo:traceback"] = "".join(traceback.format_exception(error))[-4000:]
        self._tell(member, state, values, attrs)
        self.active.remove(member)
        self.freed += 1
        self._beat()

    # -- alone ----------------------------------------------------------------------------------

    def _solo_all(self, members: list[Member]) -> None:
        for i, member in enumerate(members):
            if self.summary.interrupted:
                self.pool.extend(members[i:])  # handed back by `run`
                return
            self._solo(member)

    def _solo(self, member: Member) -> None:
        from hpo.worker import _run_one

        if member.reason:
            self._warn(member.reason)
        self._record_start(member, 1, stacked=False)
        self.behind.wait()  # alone, the trial is told from here: after its start is recorded
        self.active = [member]
        self._beat()
        state = _run_one(self.study, member.trial, self.config, self.task, self.threads, self.summary)
        self.active = []
        if self.summary.interrupted:
            return  # _run_one handed the trial back; the worker stops
        self._told(member, state)

    # -- helpers --------------------------------------------------------------------------------

    def _tell(self, member: Member, state: TrialState, values: list[float] | None, attrs: dict[str, Any]) -> None:
        """Records how the trial ended, behind the training; the count and the progress line follow."""
        self.beat.telling(member.trial)

        def tell() -> None:
            try:
                told = finish(self.study, member.trial, state, values, attrs, self.patience)
            finally:
                self.beat.told(member.trial)
            self._told(member, told)

        self.behind.write(tell)

    def _hand_back(self, member: Member) -> None:
        """Re-queues the trial with its params, after the writes queued before (its reports). One
        whose result was told just before the signal came is left as it is (the storage thread
        passes over `UpdateFinishedTrialError`)."""
        overlap.persisted(self.behind.write, partial(hand_back, self.study, member.trial, self.summary.interrupted),
                          "handing back a trial", self.patience)

    def _told(self, member: Member, state: TrialState) -> None:
        self.summary.count(member.trial.number, state)
        if self.on_trial is not None:
            frozen = persist(partial(self.study._storage.get_trial, member.trial._trial_id), "reading a trial", self.patience)
            self.on_trial(frozen, self.config)

    def _record_start(self, member: Member, group_size: int, *, stacked: bool = True) -> None:
        # `padding`: the group's model size over the trial's own (1: its own shapes), which says
        # what share of its slot's compute went to zeros.
        padding = round(self.group_arch.size / member.arch.size, 2) if stacked else 1.0
        info = {"width": self.width, "auto": self.vectorize.width == "auto", "data": self.vectorize.data, "padding": padding}
        for key, value in (("hpo:vectorize", info), ("hpo:vectorized_width", group_size)):
            overlap.persisted(self.behind.write, partial(member.trial.set_user_attr, key, value), "starting a trial", self.patience)

    def _beat(self) -> None:
        self.beat.running([m.trial for m in (*self.active, *self.pool)])

    def _global_reason(self) -> str | None:
        """Why nothing in this study can be stacked, if something says so before any trial."""
        if self.task.train_step is not None or self.task.eval_step is not None:
            return "a custom train_step/eval_step works on one model"
        if self.task.data_takes_params:
            return "the data factory takes the trial's params, so trials do not share one dataset"
        try:
            vectorized.check_settings(self.trainer_config, self.task.data({}))
        except NotVectorizable as err:
            return str(err)
        return None

    def _choose_width(self) -> int:
        """`auto`: a short probe on the device with copies of the first trial's model."""
        vz = self.vectorize
        first = next((m for m in self.pool if m.arch is not None), None)
        if first is None or self.solo_reason:
            return 1
        # With a budget of n trials, more than n/4 at once would leave the sampler fewer than four
        # rounds of results to learn from.
        n_trials = self.config.study.n_trials
        limit = min(vz.max_width, max(1, n_trials // 4)) if n_trials else vz.max_width
        try:
            width, timings = vectorized.probe_width(
                lambda: copy.deepcopy(first.model), first.params, self.task.data(first.params), self.trainer_config,
                kind=self.config.task.kind, max_width=limit,
            )
        except NotVectorizable as err:
            self.solo_reason = str(err)
            self._warn(self.solo_reason)
            return 1
        measured = ", ".join(f"{k}: {t * 1e6:.0f}" for k, t in timings.items())
        print(f"hpo: vectorize: auto chose width {width} (microseconds per trial-step by width: {measured})",
              file=sys.stderr, flush=True)
        return width

    def _warn(self, reason: str) -> None:
        if reason in self.warned:
            return  # one line per reason, not one per trial
        self.warned.add(reason)
        print(f"hpo: warning: vectorize: {reason}; running trials one at a time", file=sys.stderr, flush=True)

