"""Execution of planned tasks on a Dask cluster, with retries, placement and one progress display."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

from distributed import Client, as_completed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gmfx._errors import GmfxError
from gmfx.storage import RegionStore
from gmfx.types import Task

__all__ = ["StorePlan", "execute_plans", "one_display", "progress_bar", "run_tasks"]


_shared_display: ContextVar[Progress | None] = ContextVar("gmfx_shared_display", default=None)


@contextlib.contextmanager
def one_display(*, enabled: bool = True) -> Iterator[Progress]:
    """One progress display for several stages: inside it, every :func:`progress_bar` is this display,
    and each stage adds its own row to it."""
    with _new_display(enabled) as display:
        token = _shared_display.set(display)
        try:
            yield display
        finally:
            _shared_display.reset(token)


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
    :class:`GmfxError` as it is, anything else wrapped in one that names the task.
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
            futures = [
                client.submit(
                    _guarded, task.function, *task.args, key=task.key, resources=task.resources, retries=retries,
                    pure=False,
                )  # fmt: skip
                for task in tasks
            ]
            # as_completed looks up the current client: make it ours, even when it is not the default one
            stack.enter_context(client.as_current())
            completed = as_completed(futures)

            def cancel() -> None:
                client.cancel(futures)

        position = {future: i for i, future in enumerate(futures)}
        results: list = [None] * len(tasks)
        bar = stack.enter_context(progress_bar(enabled=progress))
        handle = bar.add_task(description, total=sum(task.weight for task in tasks))
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
