"""The executor without a cluster: tasks run here, in order of their results, with the same errors."""

import threading

import pytest

from gmfx import GmfxError, ParameterError
from gmfx._execute import run_tasks
from gmfx.types import Task


def _square(x: int) -> int:
    return x * x


def test_tasks_run_here_and_results_keep_their_order():
    tasks = [Task(key=f"square-{i}", function=_square, args=(i,)) for i in range(7)]
    assert run_tasks(None, tasks, description="squares", progress=False) == [i * i for i in range(7)]


def test_a_failing_task_is_named_and_the_rest_do_not_start():
    started = []
    gate = threading.Event()

    def record(i: int) -> int:
        started.append(i)
        if i == 0:
            raise ZeroDivisionError("boom")
        gate.wait(5)
        return i

    tasks = [Task(key=f"work-{i}", function=record, args=(i,)) for i in range(50)]
    with pytest.raises(GmfxError) as info:
        run_tasks(None, tasks, description="work", progress=False)
    gate.set()
    assert "a work task failed (ZeroDivisionError: boom)" in str(info.value)
    assert "task work-0" in str(info.value)
    assert len(started) < 50  # queued tasks were cancelled


def test_gmfx_errors_pass_through_unchanged():
    def refuse() -> None:
        raise ParameterError("bad value", where="--x", fix="use another")

    with pytest.raises(ParameterError, match="bad value"):
        run_tasks(None, [Task(key="refuse", function=refuse)], description="check", progress=False)
