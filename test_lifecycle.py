"""Session lifecycle under concurrent calls: the races a review found, each pinned by a test.

Calls on one session overlap in real use (an agent fires a second cell, a client cancels,
a human resets): every one must end with a clear status, no kernel may be left behind, and
no call may run inside another's cell or take its output.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

import ipython_mcp
from conftest import FAILED, POLL_S, QUICK_S, kernels_below, own_sessions, wait_for_file

pytestmark = pytest.mark.anyio


async def call(client: Client, tool: str, **arguments: Any) -> Any:
    return await client.call_tool(tool, arguments)


async def call_with(client: Client, tool: str, arguments: dict[str, Any]) -> Any:
    """``call`` with the arguments as a dict, for task groups (start_soon takes no keywords)."""
    return await client.call_tool(tool, arguments)


def structured(result: Any) -> dict[str, Any]:
    """The structured content of a call that answered with one; a failed cell is a tool error too."""
    assert result.structured_content is not None, result.content[0].text
    assert result.is_error == (result.structured_content.get("status") in FAILED)
    return result.structured_content


def kernel_pids() -> set[int]:
    """Live kernels of the in-memory servers of this test process (never another checkout's or run's)."""
    return kernels_below(os.getpid())


async def test_a_call_queued_behind_a_cell_left_running_answers_busy_and_takes_nothing_of_it(shared_server: Client, tmp_path: Path) -> None:
    release = tmp_path / "release"
    code = f"import os, time\nprint('A start', flush=True)\nwhile not os.path.exists({str(release)!r}): time.sleep(0.02)\nprint('A end')\n'A'"
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            results: dict[str, Any] = {}
            async with anyio.create_task_group() as group:

                async def first() -> None:
                    results["a"] = await call(client, "execute", session="s", code=code, timeout_s=0.5, on_timeout="continue")

                group.start_soon(first)
                while "s" not in {s["name"] for s in structured(await call(client, "list_sessions"))["sessions"]}:
                    await anyio.sleep(POLL_S)
                results["b"] = await call(client, "execute", session="s", code="print('B ran')", timeout_s=10)
            release.touch()
            final = structured(await call(client, "wait", session="s", timeout_s=10))
    a, b = structured(results["a"]), structured(results["b"])
    assert a["status"] == "running" and "A start" in a["stdout"]
    assert b["status"] == "busy" and "B ran" not in b["stdout"]
    assert final["status"] == "ok" and final["result"] == "'A'" and "A end" in final["stdout"]


async def test_shutdown_racing_a_first_start_leaves_no_kernel(shared_server: Client) -> None:
    before = kernel_pids()
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            results: dict[str, Any] = {}
            async with anyio.create_task_group() as group:

                async def start() -> None:
                    results["execute"] = await call(client, "execute", session="s", code="1")

                group.start_soon(start)
                while True:  # shut it down while its kernel is still starting
                    shut = await call(client, "shutdown", session="s")
                    if not shut.is_error:
                        break
                    await anyio.sleep(0.005)
            listing = structured(await call(client, "list_sessions"))
            leftover = kernel_pids() - before
    assert listing["sessions"] == []
    assert leftover == set(), "a kernel started for a shut-down session must not live on"
    if results["execute"].is_error:
        assert "shut down" in results["execute"].content[0].text


async def test_interrupt_during_a_large_display_keeps_the_kernel(shared_server: Client) -> None:
    code = "from IPython.display import display\nwhile True:\n    display({'text/plain': 'x' * 1_900_000}, raw=True)"
    with anyio.fail_after(QUICK_S * 2):
        async with own_sessions(shared_server) as client:
            pid = structured(await call(client, "execute", session="s", code="import os\nos.getpid()"))["result"]
            for _ in range(4):
                out = structured(await call(client, "execute", session="s", code=code, timeout_s=1))
                assert out["status"] == "timeout", out
                assert "killed" not in (out["warning"] or ""), out["warning"]
            again = structured(await call(client, "execute", session="s", code="import os\nos.getpid()"))
    assert again["result"] == pid, "the kernel survived every interrupt"


async def test_a_cell_that_replaces_sys_stdout_with_a_bare_object_does_not_kill_the_kernel(shared_server: Client) -> None:
    code = "import sys\nclass Sink:\n    def write(self, text): return len(text)\n    def flush(self): pass\nsys.stdout = Sink()"
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            out = structured(await call(client, "execute", session="s", code=code))
            after = structured(await call(client, "execute", session="s", code="x = 1\nx + 1"))
    assert out["status"] == "ok", out
    assert (after["status"], after["result"], after["warning"]) == ("ok", "2", None)


async def test_timeout_s_bounds_the_wait_for_a_busy_session_too(shared_server: Client, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    release = tmp_path / "release"
    slow = f"import os, time\nopen({str(marker)!r}, 'w').close()\nwhile not os.path.exists({str(release)!r}): time.sleep(0.02)"
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            async with anyio.create_task_group() as group:
                group.start_soon(call_with, client, "execute", {"session": "s", "code": slow, "timeout_s": 20})
                await wait_for_file(marker)
                started = time.monotonic()
                queued = structured(await call(client, "execute", session="s", code="'never'", timeout_s=1))
                elapsed = time.monotonic() - started
                release.touch()
    assert queued["status"] == "busy" and "was not run" in queued["error"]
    assert elapsed < 5, f"a 1 s call waited {elapsed:.1f} s"


async def test_a_cell_left_running_that_finished_shows_idle_and_interrupt_says_so(shared_server: Client, tmp_path: Path) -> None:
    done = tmp_path / "done"
    code = f"import time\ntime.sleep(1)\nopen({str(done)!r}, 'w').close()\n42"
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            first = structured(await call(client, "execute", session="s", code=code, timeout_s=0.3, on_timeout="continue"))
            await wait_for_file(done)
            while True:  # its reply is on its way: wait until the server has it
                info = structured(await call(client, "list_sessions"))["sessions"][0]
                if info["status"] == "idle":
                    break
                await anyio.sleep(POLL_S)
            interrupted = await call(client, "interrupt", session="s")
            final = structured(await call(client, "wait", session="s", timeout_s=5))
    assert first["status"] == "running"
    assert info["busy_s"] is None
    assert structured(interrupted)["outcome"] == "idle"
    assert (final["status"], final["result"]) == ("ok", "42")


async def test_reset_and_shutdown_at_once_leave_no_kernel(shared_server: Client) -> None:
    before = kernel_pids()
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            structured(await call(client, "execute", session="s", code="1"))
            async with anyio.create_task_group() as group:
                group.start_soon(call_with, client, "reset", {"session": "s"})
                group.start_soon(call_with, client, "shutdown", {"session": "s"})
            listing = structured(await call(client, "list_sessions"))
            while kernel_pids() - before:  # the killed kernels are being reaped
                await anyio.sleep(POLL_S)
    assert listing["sessions"] == []


async def test_reset_shutdown_and_interrupt_answer_with_structured_outcomes(shared_server: Client) -> None:
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            first = structured(await call(client, "execute", session="s", code="import os\nos.getpid()"))
            idle = structured(await call(client, "interrupt", session="s"))
            reset = structured(await call(client, "reset", session="s"))
            gone = structured(await call(client, "shutdown", session="s"))
    assert (idle["outcome"], idle["pid"]) == ("idle", int(first["result"]))
    assert reset["outcome"] == "reset" and reset["pid"] not in (None, int(first["result"]))
    assert gone == {"session": "s", "outcome": "shut_down", "message": "Session 's' was shut down.", "pid": None}


async def test_a_call_waiting_for_a_slow_kernel_start_answers_busy_at_its_timeout(shared_server: Client, tmp_path: Path) -> None:
    """An env whose interpreter takes seconds to start must not hold a 1 s call for seconds."""
    env = tmp_path / "slow"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text(f"#!/bin/sh\nsleep 3\nexec {sys.executable} \"$@\"\n")
    (env / "bin" / "python").chmod(0o755)
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            async with anyio.create_task_group() as group:
                group.start_soon(call_with, client, "execute", {"session": "s", "code": "1", "env": str(env)})
                while "s" not in {s["name"] for s in structured(await call(client, "list_sessions"))["sessions"]}:
                    await anyio.sleep(POLL_S)
                started = time.monotonic()
                second = structured(await call(client, "execute", session="s", code="2", timeout_s=1))
                elapsed = time.monotonic() - started
    assert second["status"] == "busy" and "was not run" in second["error"]
    assert elapsed < 2.5, f"a 1 s call waited {elapsed:.1f} s"


async def test_a_background_job_cancelled_before_it_runs_runs_nothing_and_its_waiters_wake() -> None:
    ran: list[str] = []
    ended: list[ipython_mcp.Job] = []

    async def work() -> None:
        ran.append("work")  # before its first await: must not run at all once cancelled
        await anyio.sleep(60)

    with anyio.fail_after(QUICK_S):
        async with ipython_mcp.Jobs.open() as jobs:
            job = jobs.start(work, name="cancelled-early", on_done=ended.append)
            job.cancel()
            assert await job.wait()
    assert (ran, ended, job.error) == ([], [job], None)


async def test_a_background_job_that_fails_and_whose_clean_up_fails_ends_alone(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise ValueError("inside the job")

    def clean_up_fails(_: ipython_mcp.Job) -> None:
        raise RuntimeError("inside its clean-up")

    with anyio.fail_after(QUICK_S):
        async with ipython_mcp.Jobs.open() as jobs:
            sibling = jobs.start(anyio.sleep, 60, name="sibling")
            job = jobs.start(fails, name="failing", on_done=clean_up_fails)
            assert await job.wait()  # its waiters wake
            assert not sibling.done()  # and nothing else was cancelled
            sibling.cancel()
    assert isinstance(job.error, ValueError)
    assert "background task failing failed" in caplog.text and "its clean-up failed" in caplog.text
