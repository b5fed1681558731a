"""Checkpoints: exact resume, atomic writes, weights_only loading, best and last."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import trainers
from trainers import checkpoint


def make_data() -> trainers.Data:
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(192, 8, generator=g), torch.randn(64, 8, generator=g)
    w = torch.randn(8, 3, generator=g)
    return trainers.Data((x, (x @ w).argmax(1)), (xv, (xv @ w).argmax(1)))


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))


class Crash(Exception):
    pass


class CrashAt:
    """Simulates a killed worker: raises when the given epoch starts."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, state: trainers.State) -> None:
        if state.epoch == self.epoch:
            raise Crash


def config(directory: Path, **overrides: object) -> trainers.TrainerConfig:
    settings = dict(epochs=6, batch_size=32, seed=7, device="cpu", checkpoint_dir=str(directory),
                    scheduler={"name": "cosine", "warmup_steps": 5}, early_stopping_patience=100,
                    monitor="val_accuracy", optimizer="adamw", weight_decay=0.01)
    return trainers.TrainerConfig(**{**settings, **overrides})


def test_resumed_run_continues_bit_for_bit_like_an_uninterrupted_one(tmp_path: Path) -> None:
    straight_model = make_model(0)
    straight = trainers.fit(straight_model, make_data(), config(tmp_path / "straight"))

    with pytest.raises(Crash):
        trainers.fit(make_model(0), make_data(), config(tmp_path / "resumed"), [CrashAt(3)])
    assert checkpoint.load(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    # A fresh process would build the model from another RNG state: the checkpoint must not care.
    torch.manual_seed(12345)
    resumed_model = make_model(99)
    resumed = trainers.fit(resumed_model, make_data(), config(tmp_path / "resumed"))

    assert resumed.resumed and not straight.resumed
    assert resumed.history == straight.history
    assert resumed.global_step == straight.global_step
    for a, b in zip(straight_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.callbacks[0].state_dict() == straight.callbacks[0].state_dict()  # early stopping


def test_checkpoint_every_n_epochs_resumes_from_the_last_multiple_and_still_matches(tmp_path: Path) -> None:
    straight = trainers.fit(make_model(0), make_data(), config(tmp_path / "straight", epochs=7))
    every = config(tmp_path / "every", checkpoint_every=3, epochs=7)
    with pytest.raises(Crash):
        trainers.fit(make_model(0), make_data(), every, [CrashAt(5)])
    # Epochs 0-4 ran; last.pt was written after epochs 3 and 6 would be: the one on disk is epoch 2.
    assert checkpoint.load(tmp_path / "every" / "last.pt")["epoch"] == 2
    resumed = trainers.fit(make_model(1), make_data(), every)
    assert resumed.resumed and resumed.history == straight.history
    # The last epoch is always written, whatever the interval.
    assert checkpoint.load(tmp_path / "every" / "last.pt")["epoch"] == 6


def test_early_stopping_counters_survive_a_resume(tmp_path: Path) -> None:
    # min_delta so large that only the first epoch counts as an improvement: stop after epoch 4.
    settings = dict(early_stopping_patience=4, early_stopping_min_delta=10.0, monitor="val_loss")
    straight = trainers.fit(make_model(0), make_data(), config(tmp_path / "straight", **settings))
    with pytest.raises(Crash):
        trainers.fit(make_model(0), make_data(), config(tmp_path / "resumed", **settings), [CrashAt(3)])
    resumed = trainers.fit(make_model(0), make_data(), config(tmp_path / "resumed", **settings))
    assert len(straight.history) == len(resumed.history) == 5
    assert resumed.stop_reason == straight.stop_reason
    assert resumed.stop_reason.startswith("early stopping: val_loss did not improve")


def test_resume_restores_a_stopped_run_without_training_more(tmp_path: Path) -> None:
    first = trainers.fit(make_model(0), make_data(), config(tmp_path, epochs=2))
    again = trainers.fit(make_model(0), make_data(), config(tmp_path, epochs=2), [CrashAt(0)])
    assert again.resumed and again.history == first.history and again.metrics == first.metrics


def test_best_checkpoint_holds_the_epoch_with_the_best_monitored_metric(tmp_path: Path) -> None:
    state = trainers.fit(make_model(0), make_data(), config(tmp_path, monitor="val_loss"))
    best = checkpoint.load(tmp_path / "best.pt")
    losses = [row["val_loss"] for row in state.history]
    assert best["epoch"] == losses.index(min(losses)) == state.best_epoch
    assert best["metrics"]["val_loss"] == min(losses)


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    trainers.fit(make_model(0), make_data(), config(tmp_path, epochs=1, precision="fp16-mixed"))
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert raw["format"] == 2 and raw["buffer"].dtype == torch.uint8
    payload = checkpoint.load(tmp_path / "last.pt")
    assert {"model", "optimizer", "schedule", "scaler", "rng", "callbacks", "global_step"} <= set(payload)


def test_packing_round_trips_every_tensor_exactly() -> None:
    rng = torch.Generator().manual_seed(0)
    payload = {
        "format": 2,
        "model": {"w": torch.randn(3, 5, generator=rng), "b": torch.randn(5, generator=rng).double(),
                  "t": torch.randn(4, 6, generator=rng).t()},  # not contiguous
        "optimizer": {"state": {0: {"step": torch.tensor(7.0), "flags": torch.tensor([True, False, True])}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": (3, torch.arange(625, dtype=torch.int64), None),
        "bytes": torch.tensor([1, 2, 3], dtype=torch.uint8), "empty": torch.zeros(0, 4), "half": torch.ones(3).half(),
        "plain": [1, "two", 3.0, None],
    }
    packed = checkpoint.pack(payload)
    assert packed["buffer"].dtype == torch.uint8 and packed["buffer"].numel() == packed["nbytes"]
    round_trip = checkpoint.unpack(torch.load(_saved(packed), weights_only=True))
    flat = lambda obj: torch.utils._pytree.tree_flatten(obj)[0]  # noqa: E731
    for got, want in zip(flat(round_trip), flat(payload), strict=True):
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        else:
            assert got == want
    assert isinstance(round_trip["rng"], tuple) and 0 in round_trip["optimizer"]["state"]


def test_layout_leaves_the_values_of_plain_keys_unsearched_and_still_saves_their_tensors() -> None:
    payload = {"model": {"w": torch.ones(2)}, "history": [{"loss": 0.5, "extra": torch.full((2,), 3.0)}]}
    state, tensors, specs, _ = checkpoint.layout(payload, ("history",))
    assert [path for path, *_ in specs] == [("model", "w")] and len(tensors) == 1
    assert state["history"] is payload["history"] and state["model"] == {"w": None}
    # The plain part is pickled as it is, tensor included, and loads with weights_only.
    loaded = torch.load(_saved(state), weights_only=True)
    assert torch.equal(loaded["history"][0]["extra"], torch.full((2,), 3.0))


def _saved(obj) -> io.BytesIO:
    blob = io.BytesIO()
    torch.save(obj, blob)
    blob.seek(0)
    return blob


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.pt"
    checkpoint.atomic_save({"epoch": 0}, target)
    before = target.read_bytes()

    def interrupted_fsync(fd: int) -> None:
        os.truncate(fd, 100)  # half a file written, then the interrupt
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"epoch": 1}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_write_that_fails_in_the_writer_process_fails_the_fit(tmp_path: Path) -> None:
    (tmp_path / "last.pt").mkdir()  # nothing can be renamed over a folder
    (tmp_path / "last.pt" / "keep").write_text("x")
    with pytest.raises(OSError):
        trainers.fit(make_model(0), make_data(), config(tmp_path, epochs=3))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not list(Path("/dev/shm").glob(f"trainers-ckpt-{os.getpid()}-*"))  # buffers freed


def test_a_process_killed_mid_write_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    # The writer process writes through `_atomic_write`: here a process dies inside it.
    script = textwrap.dedent(f"""
        import os, torch, trainers
        from pathlib import Path
        from trainers import checkpoint
        from torch import nn
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        x = torch.randn(32, 4); y = torch.randint(0, 2, (32,))
        data = trainers.Data((x, y), (x, y))
        config = trainers.TrainerConfig(epochs=1, batch_size=8, device="cpu", checkpoint_dir={str(tmp_path)!r})
        trainers.fit(model, data, config)
        def dying_fsync(fd):
            os.truncate(fd, 100)  # half a file on disk, then the kill
            os._exit(9)
        checkpoint.os.fsync = dying_fsync
        checkpoint._atomic_write(lambda file: file.write(b"x" * 10_000), Path({str(tmp_path / "last.pt")!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(trainers.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert result.returncode == 9, result.stderr.decode()
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 0
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the torn write, never read

    x = torch.randn(32, 4)
    data = trainers.Data((x, torch.randint(0, 2, (32,))), (x, torch.randint(0, 2, (32,))))
    state = trainers.fit(nn.Linear(4, 2), data, trainers.TrainerConfig(epochs=2, batch_size=8, device="cpu",
                                                                        checkpoint_dir=str(tmp_path)))
    assert state.resumed and len(state.history) == 2


def test_the_writer_process_exits_and_frees_its_buffers_when_its_parent_dies(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, torch, trainers
        from torch import nn
        from trainers import writer
        x = torch.randn(32, 4); y = torch.randint(0, 2, (32,))
        config = trainers.TrainerConfig(epochs=1, batch_size=8, device="cpu", checkpoint_dir={str(tmp_path)!r})
        trainers.fit(nn.Linear(4, 2), trainers.Data((x, y), (x, y)), config)
        buffer = writer.Buffer(1000, {str(tmp_path)!r})
        w = writer.start()
        w.result(w.submit(buffer, {{"format": 2, "state": {{}}, "tensors": [], "nbytes": 0}}, []), block=True)
        print(w._process.pid, buffer.path, flush=True)
        os._exit(9)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(trainers.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    pid, path = result.stdout.split()
    def running() -> bool:
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    for _ in range(300):  # it exits as soon as it reads the end of its pipe
        if not running():
            break
        time.sleep(0.1)
    assert not running(), "the writer outlived its parent"
    assert not Path(path).exists()


def test_buffers_whose_owner_lock_is_free_are_swept_and_those_of_live_owners_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    from trainers import writer

    monkeypatch.setattr(writer, "_SHM", str(tmp_path))  # not the machine's /dev/shm: other runs use it
    files = {key: tmp_path / name for key, name in {
        "gone_lock": "trainers-ckpt-101.lock", "gone_buffer": "trainers-ckpt-101-0.buf",
        "alive_lock": "trainers-ckpt-102.lock", "alive_buffer": "trainers-ckpt-102-0.buf",
        "unclaimed": "trainers-ckpt-103-0.buf", "not_ours": "not-ours-101-0.buf"}.items()}
    for path in files.values():
        path.write_bytes(b"x")
    # A live owner (here: this test) holds a shared lock on its lock file, as a process and its writer do.
    held = os.open(files["alive_lock"], os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_SH)
    try:
        assert writer.sweep_orphans() == [str(files["gone_buffer"])]
        assert not files["gone_lock"].exists()
        assert all(files[key].exists() for key in ("alive_lock", "alive_buffer", "unclaimed", "not_ours"))
    finally:
        os.close(held)
    assert sorted(writer.sweep_orphans()) == [str(files["alive_buffer"])]  # its owner has gone now


def test_a_process_claims_its_buffers_with_a_lock_its_writer_shares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    from trainers import writer

    monkeypatch.setattr(writer, "_SHM", str(tmp_path))
    monkeypatch.setattr(writer, "_owner", None)
    fd = writer._own()
    lock = tmp_path / f"trainers-ckpt-{os.getpid()}.lock"
    assert fd is not None and lock.exists()
    other = os.open(lock, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # held: a sweeper cannot take it
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)
        os.close(fd)


def test_the_writer_process_outlives_ctrl_c_and_sigterm_sent_to_the_whole_group(tmp_path: Path) -> None:
    from trainers import writer

    process = writer.start()
    for sig in (signal.SIGINT, signal.SIGTERM):  # at once: it must ignore them from its first line
        os.kill(process._process.pid, sig)
    trainers.fit(make_model(0), make_data(), config(tmp_path, epochs=2))
    assert process.alive() and writer.start() is process
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 1


def test_a_writer_process_that_dies_fails_the_fit_and_the_next_fit_gets_a_new_one(tmp_path: Path) -> None:
    from trainers import writer

    process = writer.start()

    class KillWriter:
        # Stopped before epoch 1's checkpoint is handed over, so that it is surely in flight when
        # the writer dies (one that dies between writes is replaced by the next, and nothing is lost).
        def on_epoch_end(self, state) -> None:
            if state.epoch == 1:
                process._process.send_signal(signal.SIGSTOP)

        def on_epoch_start(self, state) -> None:
            if state.epoch == 2:
                process._process.kill()
                process._process.wait()

    with pytest.raises(RuntimeError, match="checkpoint writer process exited"):
        trainers.fit(make_model(0), make_data(), config(tmp_path, epochs=4), [KillWriter()])
    assert not list(Path("/dev/shm").glob(f"trainers-ckpt-{os.getpid()}-*"))  # its buffers freed
    trainers.fit(make_model(0), make_data(), config(tmp_path / "again", epochs=1))
    assert writer.start() is not process and checkpoint.load(tmp_path / "again" / "last.pt")["epoch"] == 0


def test_numpy_rng_state_is_saved_as_it_is_after_each_kind_of_draw() -> None:
    # The capture reuses the last saved NumPy state when the raw words have not moved: after
    # uniform draws, a Gaussian pair (one cached), the cached one used (no word moves), a reseed.
    import numpy as np

    def captured() -> tuple:
        kind, keys, pos, has_gauss, cached = checkpoint.rng_state(None)["numpy"]
        return kind, keys.numpy().astype(np.uint32).tolist(), pos, has_gauss, cached

    def actual() -> tuple:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return kind, keys.tolist(), pos, has_gauss, cached

    np.random.seed(3)
    steps = [lambda: None, lambda: None, np.random.rand, np.random.standard_normal,
             np.random.standard_normal, lambda: None, lambda: np.random.seed(3), np.random.standard_normal]
    for step in steps:
        step()
        assert captured() == actual()


def test_a_checkpoint_of_another_optimizer_implementation_resumes_with_this_run_s(tmp_path: Path) -> None:
    # Written by a foreach AdamW (as an older run, or one on another device, may have), resumed
    # where fit chooses the fused kernel: the state carries over, the implementation is this run's.
    straight = trainers.fit(make_model(0), make_data(), config(tmp_path / "straight"))
    written = config(tmp_path / "resumed", optimizer={"name": "adamw", "foreach": True})
    with pytest.raises(Crash):
        trainers.fit(make_model(0), make_data(), written, [CrashAt(3)])
    assert checkpoint.load(tmp_path / "resumed" / "last.pt")["optimizer"]["param_groups"][0]["foreach"] is True
    resumed = trainers.fit(make_model(1), make_data(), config(tmp_path / "resumed"))
    group = resumed.optimizer.param_groups[0]
    assert resumed.resumed and group["fused"] is True and not group["foreach"]
    assert all(s["step"].dtype == torch.float32 and s["step"].device == p.device
               for p, s in resumed.optimizer.state.items())
    assert len(resumed.history) == len(straight.history)
    for a, b in zip(resumed.history, straight.history):
        assert all(abs(a[k] - b[k]) <= 1e-4 + 1e-4 * abs(b[k]) for k in a)
