"""Execution of planned tasks on a Dask cluster, with retries, placement and one progress display."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

from distributed import Client, as_completed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gmfx._errors import GmfxError
from gmfx.storage import RegionStore
from gmfx.types import Task

__all__ = [
    "Cancellation", "StorePlan", "cancellation", "execute_plans", "one_display", "progress_bar", "run_tasks",
    "submission_priority",
]  # fmt: skip


_shared_display: ContextVar[Progress | None] = ContextVar("gmfx_shared_display", default=None)
_rows = threading.Lock()  # finding or adding a display's row, from several threads at once


@contextlib.contextmanager
def one_display(*, enabled: bool = True) -> Iterator[Progress]:
    """One progress display for several stages: inside it, every :func:`progress_bar` is this display
    (an enclosing one's, when nested), and the calls of :func:`run_tasks` with the same description
    share one row, whose total grows with each call (so a stage run recording by recording, from
    several threads, shows as one row)."""
    shared = _shared_display.get()
    if shared is not None:
        yield shared
        return
    with _new_display(enabled) as display:
        token = _shared_display.set(display)
        try:
            yield display
        finally:
            _shared_display.reset(token)


def _row(display: Progress, description: str, total: int) -> int:
    """The display's row called ``description`` with ``total`` more to do (added when there is none)."""
    with _rows:
        for row in display.tasks:
            if row.description == description:
                display.update(row.id, total=(row.total or 0) + total)  # a finished row runs again
                return row.id
        return display.add_task(description, total=total)


class Cancellation:
    """Cancels the work :func:`run_tasks` has in flight under :func:`cancellation`, from any thread (an
    interrupt in the thread that waits on several others' calls); calls that start later are cancelled
    as soon as they submit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancels: list[Callable[[], None]] = []
        self.cancelled = False

    def _register(self, cancel: Callable[[], None]) -> None:
        with self._lock:
            self._cancels.append(cancel)
            cancelled = self.cancelled
        if cancelled:
            cancel()

    def _unregister(self, cancel: Callable[[], None]) -> None:
        with self._lock:
            self._cancels.remove(cancel)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            cancels = list(self._cancels)
        for cancel in cancels:
            cancel()


_cancellation: ContextVar[Cancellation | None] = ContextVar("gmfx_cancellation", default=None)
_priority: ContextVar[int] = ContextVar("gmfx_priority", default=0)


@contextlib.contextmanager
def cancellation() -> Iterator[Cancellation]:
    """Inside it (and in threads started with a copy of its context), :func:`run_tasks` registers
    its work with the :class:`Cancellation` yielded."""
    scope = Cancellation()
    token = _cancellation.set(scope)
    try:
        yield scope
    finally:
        _cancellation.reset(token)


@contextlib.contextmanager
def submission_priority(priority: int) -> Iterator[None]:
    """Inside it, :func:`run_tasks` submits with Dask's ``priority`` (higher runs first among queued tasks)."""
    token = _priority.set(priority)
    try:
        yield
    finally:
        _priority.reset(token)


def progress_bar(*, enabled: bool = True) -> contextlib.AbstractContextManager[Progress]:
    """The progress display for long work: the run's shared one inside :func:`one_display`, else a new one."""
    shared = _shared_display.get()
    return contextlib.nullcontext(shared) if shared is not None else _new_display(enabled)


def _new_display(enabled: bool) -> Progress:
    """A rich progress display on stderr (static when stderr is not a terminal)."""
    from rich.console import Console

    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
        auto_refresh=sys.stderr.isatty(),
    )


def run_tasks(
    client: Client | None,
    tasks: Sequence[Task],
    *,
    description: str,
    retries: int = 2,
    progress: bool = True,
) -> list:
    """Run ``tasks`` and wait for all of them; return their results in order.

    On a ``client``, each task runs under its own deterministic key with ``retries`` (a killed worker's
    tasks rerun elsewhere) and its resources (``{"GPU": 1}`` pins it to GPU workers). Without one, the
    tasks run here on a thread per core (gmfx's task bodies spend their time in code that releases the
    GIL). On the first failure the remaining tasks are cancelled and the error is raised: a
    :class:`GmfxError` as it is, anything else wrapped in one that names the task. Safe to call from
    several threads at once on one client (see :func:`cancellation`, :func:`submission_priority`).
    """
    if not tasks:
        return []
    with contextlib.ExitStack() as stack:
        if client is None:
            pool = stack.enter_context(ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, len(tasks)))))
            futures = [pool.submit(_guarded, task.function, *task.args) for task in tasks]
            completed = concurrent.futures.as_completed(futures)

            def cancel() -> None:
                for future in futures:
                    future.cancel()

        else:
            priority = _priority.get()
            futures = [
                client.submit(
                    _guarded, task.function, *task.args, key=task.key, resources=task.resources, retries=retries,
                    pure=False, priority=priority,
                )  # fmt: skip
                for task in tasks
            ]
            # our client's loop, not the current client's (client.as_current() would set dask's global
            # config, which calls from several threads would leave set to theirs when they end out of order)
            completed = as_completed(futures, loop=client.loop)

            def cancel() -> None:
                client.cancel(futures)

        if (scope := _cancellation.get()) is not None:
            scope._register(cancel)
            stack.callback(scope._unregister, cancel)
        position = {future: i for i, future in enumerate(futures)}
        results: list = [None] * len(tasks)
        bar = stack.enter_context(progress_bar(enabled=progress))
        handle = _row(bar, description, sum(task.weight for task in tasks))
        try:
            for future in completed:
                i = position[future]
                try:
                    results[i] = future.result()
                    if isinstance(results[i], _Failed):
                        raise results[i].error
                except GmfxError:
                    raise
                except Exception as error:
                    raise GmfxError(
                        f"a {description} task failed ({type(error).__name__}: {error})",
                        where=f"task {tasks[i].key}",
                        fix="see the error above; rerun the same command to resume from the finished regions",
                    ) from error
                bar.advance(handle, tasks[i].weight)
        except BaseException:  # a failure or Ctrl-C: nothing more starts
            cancel()
            raise
    return results


@dataclass(frozen=True)
class _Failed:
    """A task's deliberate error, returned as its result: a :class:`GmfxError` is deterministic (bad
    input, a spent storage retry budget), so Dask must neither retry the task nor log its traceback on
    every worker; the client raises it once."""

    error: GmfxError


def _guarded(function, *args):
    try:
        return function(*args)
    except GmfxError as error:
        return _Failed(error)


@dataclass
class StorePlan:
    """The work one stage has left for one recording's store.

    Attributes
    ----------
    store
        The store the tasks write (its template is already written).
    tasks
        One task per region still to do (done regions have none).
    regions
        How many regions the store has in all.
    attrs
        Attributes set on the store when it is finalized (provenance).
    label
        What to call it in messages and the summary (the recording's name).
    """

    store: RegionStore
    tasks: list[Task]
    regions: int
    attrs: dict = field(default_factory=dict)
    label: str = ""


def execute_plans(
    client: Client | None, plans: Sequence[StorePlan], *, description: str, retries: int = 2, progress: bool = True
) -> None:
    """Run every plan's tasks as one submission (recordings in parallel), then finalize each store."""
    run_tasks(
        client,
        [task for plan in plans for task in plan.tasks],
        description=description,
        retries=retries,
        progress=progress,
    )
    for plan in plans:
        plan.store.finalize(plan.attrs)
