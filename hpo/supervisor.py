"""Several workers on one machine: one process per slot (a GPU, a share of a GPU, or a CPU job),
pinned with CUDA_VISIBLE_DEVICES, restarted when it crashes, all stopped together on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

# A worker's exit code for an error that it reported in one line, which a restart may repeat.
from hpo.cli import EXIT_USAGE


class SupervisorError(ValueError):
    """One line for the user."""


@dataclass
class Slot:
    index: int
    device: str | None  # the CUDA_VISIBLE_DEVICES value, None for a CPU worker
    process: subprocess.Popen | None = None
    restarts: int = 0


def slots(gpus: str | None, per_gpu: int, jobs: int | None) -> list[Slot]:
    """``--gpus 0,1`` or ``all`` (times ``--per-gpu``), else ``--jobs`` CPU workers.

    The numbers count the GPUs this process sees, as torch numbers them: under a scheduler that
    set CUDA_VISIBLE_DEVICES (Slurm's ``--gres``, a container), GPU 0 is its first entry, and a
    worker is pinned to that entry, not to the machine's GPU 0, which may be another job's."""
    if gpus is None:
        if per_gpu != 1:
            raise SupervisorError(f"--per-gpu {per_gpu} packs workers on the GPUs that --gpus names "
                                  "(expected --gpus LIST or all with it; --jobs J for CPU workers)")
        return [Slot(i, None) for i in range(jobs or 1)]
    import torch

    # CUDA's own count: it stops at an entry that names no GPU ("-1", "NoDevFiles").
    count = torch.cuda.device_count()
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [d.strip() for d in inherited.split(",")] if inherited is not None else None
    if gpus == "all":
        ids = list(range(count))
        if not ids:
            raise SupervisorError("--gpus all: no GPU is visible here (use --jobs J for CPU workers)")
    else:
        names = [g.strip() for g in gpus.split(",") if g.strip()]
        if not names or not all(g.isdigit() for g in names):
            raise SupervisorError(f"--gpus {gpus!r}: expected a comma-separated list of GPU numbers, or all")
        ids = [int(g) for g in names]
        missing = [i for i in ids if i >= count]
        if missing:
            seen = f"GPUs 0-{count - 1}" if count else "no GPU"
            raise SupervisorError(f"--gpus {gpus}: no GPU {missing[0]} here ({seen} visible"
                                  f"{' in CUDA_VISIBLE_DEVICES=' + inherited if visible is not None else ''}; "
                                  "--jobs J for CPU workers)")
    devices = [visible[i] if visible is not None else str(i) for i in ids]
    return [Slot(i, device) for i, (device, _) in enumerate((d, k) for d in devices for k in range(per_gpu))]


def supervise(
    study: str, storage_url: str, workers: list[Slot], *, first_index: int = 0, threads: int | None = None,
    max_restarts: int = 5,
) -> int:
    """Runs one `hpo worker` per slot until all have exited; returns the exit code for the shell.

    A worker that exits 0 (budget spent) or 130 (Ctrl-C) is done; one that crashes (killed,
    out of memory, an exit code other than those) is restarted, up to `max_restarts` times,
    and its trial is picked up through the heartbeat like any lost trial. One that exits 2 at its
    first start said why on its last line (its task does not import, say): the same command would
    fail the same way, so it is not restarted. (Exit 2 after a restart may be passing, a storage
    server restarting: that counts as a crash.) Workers that ended so, or crashed once too often,
    make the exit code that of the first of them (1 for one killed by a signal), so a batch
    scheduler sees the failure.
    """
    stopping: list[int] = []
    failed: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)
        for slot in workers:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for slot in workers:
            _start(slot, study, storage_url, first_index, threads)
        while any(slot.process is not None for slot in workers):
            time.sleep(0.2)
            for slot in workers:
                code = slot.process.poll() if slot.process is not None else None
                if code is None:
                    continue
                slot.process = None
                if code in (0, 130) or stopping:
                    continue
                if (code != EXIT_USAGE or slot.restarts > 0) and slot.restarts < max_restarts:
                    slot.restarts += 1
                    print(f"hpo: worker {slot.index} exited with {code}; restarting it ({slot.restarts}/{max_restarts})",
                          file=sys.stderr, flush=True)
                    _start(slot, study, storage_url, first_index, threads)
                    continue
                failed.append(code if code > 0 else 1)
                why = f" after {slot.restarts} restarts" if slot.restarts else ""
                print(f"hpo: worker {slot.index} exited with {code}{why}; not restarting it", file=sys.stderr, flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopping:
        return 130 if stopping[0] == signal.SIGINT else 0
    return failed[0] if failed else 0


def _start(slot: Slot, study: str, storage_url: str, first_index: int, threads: int | None) -> None:
    # The URL goes in the environment, not the command line, where `ps` would show its password to all.
    env = {**os.environ, "HPO_STORAGE": storage_url}
    if slot.device is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.device
    command = [sys.executable, "-m", "hpo", "worker", "--study", study, "--worker-index", str(first_index + slot.index)]
    if threads is not None:
        command += ["--threads", str(threads)]
    slot.process = subprocess.Popen(command, env=env)
