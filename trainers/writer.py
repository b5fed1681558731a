"""The checkpoint writer: a child process that pickles and writes what the training thread packed.

Pickling a checkpoint holds the GIL (about a millisecond for an MLP and its Adam state), and a
writer thread in the training process takes that time from the training loop. So the training
thread only copies the state's tensors into a shared-memory buffer (`Buffer`, a file in
/dev/shm that both processes map) and sends the rest, a small pickle, down a pipe; this process
rebuilds the checkpoint, pickles it and writes it atomically, then answers with the write's
error or None. One child serves every trial of a process: it starts at the first checkpoint
(or at `start()`) and exits when the pipe closes, i.e. when its parent exits or dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import itertools
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

_SHM = "/dev/shm"


class Buffer:
    """A file-backed byte tensor shared with the writer process; in /dev/shm when it has room."""

    _numbers = itertools.count()

    def __init__(self, nbytes: int, fallback_dir: Path) -> None:
        self.nbytes = max(nbytes, 1)
        _own()
        name = f"trainers-ckpt-{os.getpid()}-{next(self._numbers)}.buf"
        for directory in (_SHM, tempfile.gettempdir(), str(fallback_dir)):
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError:
                continue
            try:
                # Reserved now: a tmpfs that fills up later would kill the process with SIGBUS
                # at the first write to the mapping instead of raising here.
                os.posix_fallocate(fd, 0, self.nbytes)
            except OSError:
                os.close(fd)
                os.unlink(path)
                continue
            os.close(fd)
            self.path = path
            self.tensor = torch.from_file(path, shared=True, size=self.nbytes, dtype=torch.uint8)
            self.specs: list[tuple] | None = None  # the layout last filled in, and its views
            self.views: list[torch.Tensor] | None = None
            return
        raise OSError(f"no room for a {self.nbytes}-byte checkpoint buffer in {_SHM}, the temp dir or {fallback_dir}")

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Writer:
    """The parent's end: `submit` a packed checkpoint, `result` to learn how its write went."""

    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # The child imports this package the way the parent did, whatever sys.path hacks got it here.
        root = str(Path(__file__).resolve().parents[1])
        # The child holds the parent's claim on its buffers too, so that they outlive the parent
        # until the child has written the last of them.
        claim = [fd] if (fd := _own()) is not None else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        # Ctrl-C reaches the whole process group, and a batch scheduler's SIGTERM often every
        # process of the job: the parent then saves a last checkpoint, which the child must still
        # write. So the child ignores both; it exits when the parent has gone (end of file on the
        # pipe). It starts with them blocked (the mask is inherited through exec), since one that
        # came while its interpreter started, before its first line, would end it; its first line
        # ignores them, which discards any that are pending, then unblocks them.
        code = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM}); "
                f"from trainers.writer import serve; serve({to_child_r}, {from_child_w})")
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(to_child_r, from_child_w, *claim), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(to_child_r)
        os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._recv = Connection(from_child_r, writable=False)
        # Asked once an epoch whether an answer came: one poll(2), where Connection.poll builds
        # a selector each time.
        self._answers = select.poll()
        self._answers.register(from_child_r, select.POLLIN)
        self._lock = threading.Lock()
        self._tokens = itertools.count()
        self._results: dict[int, BaseException | None] = {}

    def _exited(self) -> RuntimeError:
        return RuntimeError(f"the checkpoint writer process exited (code {self._process.wait()}); "
                            "the next fit starts a new one")

    def alive(self) -> bool:
        return self._process.poll() is None

    def submit(self, buffer: Buffer, packed: dict[str, Any], targets: list[Path]) -> int:
        """Sends a checkpoint whose tensors are in `buffer` (`packed` without ``"buffer"``) to be
        written to each target; returns the token that `result` takes."""
        token = next(self._tokens)
        with self._lock:
            try:
                # The checkpoint's plain values are pickled apart, so that one the child cannot
                # unpickle (a class it cannot import) fails that write, not the child.
                self._send.send((token, buffer.path, pickle.dumps(packed), [str(t) for t in targets]))
            except BrokenPipeError:
                raise self._exited() from None
        return token

    def result(self, token: int, block: bool) -> tuple[bool, BaseException | None]:
        """(done, error) for the write `token`; waits for it when `block`."""
        with self._lock:
            while token not in self._results and (block or self._answers.poll(0)):
                try:
                    done, error = self._recv.recv()
                except EOFError:
                    raise self._exited() from None
                self._results[done] = error
            if token not in self._results:
                return False, None
            return True, self._results.pop(token)


_writer: Writer | None = None
_writer_lock = threading.Lock()


def start() -> Writer:
    """The process's writer, started now if it is not running (it takes about a second to import torch)."""
    global _writer
    with _writer_lock:
        if _writer is None or not _writer.alive():
            _writer = Writer()
        return _writer


def sweep_orphans() -> list[str]:
    """Deletes the /dev/shm buffers of training processes that are gone, writer included; returns
    their paths.

    A writer deletes its dead parent's buffers, but when both were killed (kill -9 of a whole
    job) nobody did, and /dev/shm is memory. Each process holds a shared lock on its
    ``trainers-ckpt-<pid>.lock`` there, and so does its writer (the descriptor is inherited);
    buffers are deleted only once an exclusive lock on it is granted, i.e. when neither holds it
    any more. Process ids alone would not do: a container sharing /dev/shm sees other ids, and a
    writer outlives its parent while it finishes the last writes. Only /dev/shm is swept: a buffer
    that fell back to a disk directory (no room in /dev/shm) is where the lock is not.
    """
    removed = []
    names = _names(_SHM)
    for name in names:
        match = _LOCK_NAME.fullmatch(name)
        if match is None:
            continue
        path = os.path.join(_SHM, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its process or its writer is still there
            if not _same_file(fd, path):
                continue  # swept meanwhile by another process; the name may be a new owner's now
            # Listed before the lock was taken: a new owner of the same pid makes buffers only
            # after it holds the lock, which it cannot while this sweep holds it.
            prefix = f"trainers-ckpt-{match.group(1)}-"
            for other in names:
                if other.startswith(prefix) and other.endswith(".buf"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(_SHM, other))
                        removed.append(os.path.join(_SHM, other))
            with contextlib.suppress(OSError):
                os.unlink(path)
        finally:
            os.close(fd)
    return removed


_LOCK_NAME = re.compile(r"trainers-ckpt-(\d+)\.lock")
_owner: tuple[int, int | None] | None = None  # (pid, descriptor of its held lock file, if any)
_owner_lock = threading.Lock()


def _own() -> int | None:
    """This process's claim on its /dev/shm buffers (see `sweep_orphans`), taken before its first
    buffer after sweeping those of owners that are gone; returns the lock's descriptor, or None
    where /dev/shm cannot hold one (its buffers then go elsewhere or stay unclaimed)."""
    global _owner
    with _owner_lock:
        if _owner is None or _owner[0] != os.getpid():  # a forked child claims its own
            sweep_orphans()
            _owner = (os.getpid(), _lock_file(os.path.join(_SHM, f"trainers-ckpt-{os.getpid()}.lock")))
        return _owner[1]


def _lock_file(path: str) -> int | None:
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # a sweeper unlinked it between our open and our lock: take the new one
    return None


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def serve(read_fd: int, write_fd: int) -> None:
    """The child's loop: one message per checkpoint, answered once it is on disk (or failed)."""
    from trainers.checkpoint import _atomic_write

    torch.set_num_threads(1)
    # torch.load never checks the zip's CRC-32 (a flipped byte in a tensor loads without a word),
    # so computing it was a quarter of this process's CPU per checkpoint, taken from the training
    # process's neighbour core for nothing; the rename is what keeps a file whole.
    with contextlib.suppress(ImportError, AttributeError):
        import torch.utils.serialization.config as serialization

        serialization.save.compute_crc32 = False
    # Background work: woken by the parent's message, a child at the same priority may take the
    # parent's core at once (the scheduler places a woken task near its waker) and stall the
    # training thread for the whole pickling; at the lowest priority it waits for a free core.
    os.nice(19)
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    seen: set[str] = set()
    try:
        while True:
            try:
                token, path, pickled, targets = inbox.recv()
            except EOFError:
                return
            seen.add(path)
            error = None
            try:
                packed = pickle.loads(pickled)
                # Read, not mapped: a buffer its parent has already deleted must fail this write,
                # not be created anew full of zeros.
                with open(path, "rb") as file:
                    data = bytearray(packed["nbytes"])
                    if file.readinto(data) != len(data):
                        raise EOFError(f"checkpoint buffer {path} is shorter than {len(data)} bytes")
                blob = io.BytesIO()
                torch.save({**packed, "buffer": torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)}, blob)
                for target in targets:
                    _atomic_write(lambda file, blob=blob: file.write(blob.getbuffer()), Path(target))
            except Exception as err:  # sent back and raised on the training thread
                error = err if _picklable(err) else RuntimeError(f"{type(err).__name__}: {err}")
            outbox.send((token, error))
    finally:
        # A parent killed mid-run leaves its buffers behind: they are only ever in use here now.
        for path in seen:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:
        return False
    return True
