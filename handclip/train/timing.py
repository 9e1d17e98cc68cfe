"""How the benchmarks time and stop: torch.utils.benchmark's Timer, a Lightning loop paced by it, Ctrl-C and SIGTERM.

- `time_batches(advance, steps)`: the time of one batch (`advance()` runs the next), by `Timer.blocked_autorange`
- `timer_paced_loop(steps)`: a Lightning callback; the loop's batches run as that Timer asks for them
- `stopping_on_signals()`: Ctrl-C and SIGTERM raise `Stopped` at once, wherever the benchmark is
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Stopped(BaseException):
    """Ctrl-C or SIGTERM during a benchmark. Not a KeyboardInterrupt: Lightning turns that into exit status 1 and
    ignores every later Ctrl-C, where any other exception is passed on once the run is torn down."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_status(self) -> int:
        """130 for Ctrl-C, 143 for SIGTERM (128 + the signal's number), as a shell reports them."""
        return 143 if self.signal_name == "SIGTERM" else 130


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Within: Ctrl-C and SIGTERM raise `Stopped` in the main thread, inside whatever batch is running. Lightning
    keeps this SIGTERM handler beside its own (which only notes the signal)."""

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def time_batches(advance: Callable[[], None], steps: int):
    """The time of one batch (a `torch.utils.benchmark.Measurement`: `.median`, `.mean`, in seconds), `advance()`
    running the next batch each call: `blocked_autorange` warms up with its block-size estimate and times one block,
    then times at least `steps - 1` batches' worth more (after one more estimate). On all the process's threads
    (a Timer's default is one), synchronising CUDA around each block."""
    import torch
    from torch.utils.benchmark import Measurement, Timer

    timer = Timer(stmt="advance()", globals={"advance": advance}, num_threads=torch.get_num_threads())
    first = timer.blocked_autorange(min_run_time=0)
    if steps <= 1:
        return first
    rest = timer.blocked_autorange(min_run_time=(steps - 1) * first.median)
    return Measurement.merge([first, rest])[0]


class _Abandoned(BaseException):
    """The Lightning loop ended (an exception, a signal) while the Timer waited for a batch."""


def timer_paced_loop(steps: int):
    """A Lightning callback through which `time_batches` times the batches of `trainer.fit` as they follow each
    other (loading, the step, Lightning's own work between batches): the Timer runs in a thread of its own and
    lets the loop run one batch per call, from the end of one batch to the end of the next (its first call, the
    warm-up, from the start of the first batch); when it has enough, the loop stops after that batch. `.result()`
    after `fit`: the Measurement."""
    import lightning as L

    class TimerPacedLoop(L.Callback):
        def __init__(self):
            self._go, self._done = threading.Event(), threading.Event()
            self._thread: threading.Thread | None = None
            self._finished = self._abandoned = False
            self._measurement, self._error = None, None

        def _advance(self) -> None:  # the Timer's thread: one batch of the loop
            if self._abandoned:
                raise _Abandoned
            self._go.set()
            self._done.wait()
            self._done.clear()
            if self._abandoned:
                raise _Abandoned

        def _measure(self) -> None:
            try:
                self._measurement = time_batches(self._advance, steps)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread by result()
                self._error = error
            finally:
                self._finished = True
                self._go.set()

        def _wait_for_the_timer(self, trainer) -> None:
            self._go.wait()
            self._go.clear()
            if self._finished:
                trainer.should_stop = True

        def on_train_batch_start(self, trainer, module, batch, batch_index):
            if self._thread is None:
                self._thread = threading.Thread(target=self._measure, name="benchmark-timer", daemon=True)
                self._thread.start()
                self._wait_for_the_timer(trainer)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
            self._done.set()
            self._wait_for_the_timer(trainer)

        def on_exception(self, trainer, module, exception):
            self._abandon()

        def _abandon(self) -> None:
            self._abandoned = True
            self._done.set()
            if self._thread is not None:
                self._thread.join()

        def result(self):
            self._abandon()
            if self._error is not None and not isinstance(self._error, _Abandoned):
                raise self._error
            if self._measurement is None:
                raise RuntimeError("the training loop ended before the benchmark's timer had measured a batch")
            return self._measurement

    return TimerPacedLoop()
