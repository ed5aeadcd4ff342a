"""The served model in a process of its own, driven over a socket by the server's engine.

Python runs one thread of a process at a time (the GIL). With the model on a thread of
the HTTP process, every request, every stream chunk and every first token waited for
the model's Python code between tensor operations; under load that tripled time to
first token. `toolbox serve` therefore loads the model in a child process
(`python -m toolbox.serving.worker FD`, spawned, never forked: CUDA and thread pools
do not survive a fork) and talks to it over a socket pair.

The parent's `WorkerModel` is what the server needs of a `LoadedModel` (`tokenizer`,
`context_length`, `describe`, `score`, `batcher`); its `RemoteBatcher` forwards the
`toolbox.batching.Batcher` protocol. Only the engine thread calls them, one call and one
reply at a time. Cancellations wait for the next step and travel with it, so a step
costs one round trip. The child ignores SIGINT and SIGTERM (the parent decides when the
server stops) and exits when the parent closes the socket or dies.
"""

from __future__ import annotations

import builtins
import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from toolbox.errors import ToolboxError
from toolbox.types import LoadOptions, SequenceRequest, TokenEvent


class WorkerError(RuntimeError):
    """The model process failed or went away."""


class WorkerModel:
    """A model loaded in a child process; see the module docstring."""

    def __init__(self, model: str | None, revision: str | None, backend: str, options: LoadOptions, nice: int = 0):
        """Start the child and load the model there (blocks until loaded; raises ToolboxError on failure)."""
        ours, theirs = socket.socketpair()
        # OpenMP threads that sleep when idle instead of spinning: on a busy host spinning threads
        # fight the HTTP side and other work for the cores (the user's own setting wins)
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        with ours, theirs:
            self._proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                          pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
            self._conn = Connection(ours.detach())
        self._lock = threading.Lock()
        self.failure: WorkerError | None = None  # set once the process is gone
        try:
            self.backend, self.tokenizer, self.context_length, self._description = self.call(
                "load", model, revision, backend, options, nice)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    def call(self, op: str, *args):
        """Run `op` in the child and return its result, re-raising its error here."""
        with self._lock:
            try:
                self._conn.send((op, args))
                status, value = self._conn.recv()
            except (EOFError, OSError) as exc:
                self.failure = WorkerError(f"the model process exited ({self._exit_status()})")
                raise self.failure from exc
        if status == "error":
            raise _rebuild(*value)
        return value

    def describe(self) -> dict:
        return self._description

    def score(self, sequences):
        return self.call("score", sequences)

    def score_from(self, sequences, first):
        return self.call("score_from", sequences, first)

    def score_top(self, sequences, first, k):
        return self.call("score_top", sequences, first, k)

    def batcher(self, capacity: int) -> RemoteBatcher:
        """A fresh batcher in the child (replacing any earlier one)."""
        return RemoteBatcher(self, capacity, self.call("batcher", capacity))

    def close(self, timeout: float = 10) -> None:
        """Ask the child to exit and wait for it (killed after `timeout` s)."""
        try:
            self._conn.close()
        finally:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _exit_status(self) -> str:
        try:
            code = self._proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return "connection lost"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


class RemoteBatcher:
    """The `Batcher` protocol, forwarded to the model process.

    `add` and `cancel` are held until the next `step`, which carries them: one round trip
    per step however many requests arrive. A request the child's batcher refuses is
    reported by `take_refused` after that step.
    """

    def __init__(self, worker: WorkerModel, capacity: int, runs_groups: bool):
        self.capacity = capacity
        self.runs_groups = runs_groups
        self._worker = worker
        self._adds: list[SequenceRequest] = []
        self._cancels: list[int] = []
        self._refused: list[tuple[int, Exception]] = []
        self._pending = self._running = 0

    def add(self, request: SequenceRequest) -> None:
        self._adds.append(request)

    def cancel(self, request_id: int) -> None:
        self._cancels.append(request_id)

    def step(self) -> list[TokenEvent]:
        adds, cancels = self._adds, self._cancels
        self._adds, self._cancels = [], []
        events, refused, self._pending, self._running = self._worker.call("step", adds, cancels)
        self._refused += [(request_id, _rebuild(*error)) for request_id, error in refused]
        return [TokenEvent(*e) for e in events]

    def take_refused(self) -> list[tuple[int, Exception]]:
        """(request id, why) of the requests the model's batcher refused since the last call."""
        refused, self._refused = self._refused, []
        return refused

    def pending(self) -> int:
        return self._pending + len(self._adds)

    def running(self) -> int:
        return self._running


def load_in_process(model: str | None, revision: str | None, backend: str, options: LoadOptions, nice: int = 0):
    """Like `toolbox.load`: a `toolbox.Model`, but with the model in a child process `nice` levels below this one."""
    from toolbox.api import Model
    from toolbox.checkpoints import parse_model

    worker = WorkerModel(model, revision, backend, options, nice)
    return Model(parse_model(model, revision), worker, worker.backend)


def _describe(exc: Exception) -> tuple[str, str, str]:
    """What the parent needs to rebuild `exc` (see `_rebuild`); exceptions themselves may not pickle."""
    if isinstance(exc, ToolboxError):
        return "toolbox", type(exc).__name__, str(exc)
    return "other", type(exc).__name__, str(exc)


def _rebuild(kind: str, name: str, message: str) -> Exception:
    """The parent's copy of an exception raised in the child."""
    if kind == "toolbox":
        return ToolboxError(message)
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls(message)
    return WorkerError(f"{name}: {message}")


# -- the child ------------------------------------------------------------------------


class _Served:
    """The child's side: the loaded model and its current batcher."""

    def __init__(self):
        self.model = self.current = None  # the LoadedModel; its batcher

    def load(self, model, revision, backend, options, nice):
        from toolbox.api import load

        if nice > 0:
            os.nice(nice)
        loaded = load(model, backend, options.dtype, options.device, options.threads, revision, options.extra,
                      options.workload)
        self.model = loaded.loaded
        return loaded.backend, self.model.tokenizer, self.model.context_length, self.model.describe()

    def batcher(self, capacity):
        self.current = self.model.batcher(capacity)
        return getattr(self.current, "runs_groups", False)

    def step(self, adds, cancels):
        batcher, refused = self.current, []
        for request in adds:
            try:
                batcher.add(request)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                refused.append((request.id, _describe(exc)))
        for request_id in cancels:
            batcher.cancel(request_id)
        events = batcher.step() if batcher.pending() else []
        refused += [(request_id, _describe(exc)) for request_id, exc in getattr(batcher, "take_refused", list)()]
        return ([(e.seq, e.token_id, e.logprob, e.finish_reason, e.top) for e in events], refused,
                batcher.pending(), batcher.running())

    def score(self, sequences):
        return self.model.score(sequences)

    def score_from(self, sequences, first):
        return self.model.score_from(sequences, first)

    def score_top(self, sequences, first, k):
        return self.model.score_top(sequences, first, k)


def _serve(conn: Connection) -> None:
    served = _Served()
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", getattr(served, op)(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it there
            reply = ("error", _describe(exc))
        try:
            conn.send(reply)
        except OSError:
            return


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _serve(Connection(int(sys.argv[1])))


if __name__ == "__main__":
    main()
