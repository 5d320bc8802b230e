"""Fault tests for ipython-mcp (issue 5): never hang, never lose a session, never leave a process.

Each test feeds a real kernel something that misbehaves (a cell that swallows or blocks SIGINT,
asks for a person at the keyboard, floods its output, forks, segfaults, runs out of memory, writes
half a UTF-8 character, or names an env that tries to leave its folder) and checks that the call
returns within a bound, says what happened, and leaves the session usable (``1+1`` still gives
``2`` wherever the session still exists). Like ``test_ipython_mcp.py``, the tests speak to an
in-memory server through the SDK's client, and to the server as a real process over stdio where
the process itself is measured.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from conftest import (
    SERVER_PID_CODE,
    QUICK_S,
    SHORT_INTERRUPT_GRACE_S,
    SLOW_S,
    assert_usable,
    connect,
    memory_kib,
    process_running,
    run,
    sessions,
    stdio_parameters,
    touch,
    wait_for_file,
    wait_until_gone,
)

# A cell ignoring SIGINT costs timeout_s + the server's interrupt grace + a kernel restart.
ESCALATED_WITHIN_S = 10
# Cells that must not wait for a person (pdb, help()) end far sooner than this.
PROMPT_FREE_WITHIN_S = 5
MIB = 1024 * 1024

pytestmark = pytest.mark.anyio


# --- Helpers of this file (the shared ones are in conftest.py) -------------------------------------


async def timed_run(client: Client, session: str, code: str, **arguments: Any) -> tuple[dict[str, Any], float]:
    """``run``, plus the wall-clock seconds the call took as the client saw it."""
    started = time.monotonic()
    out = await run(client, session, code, **arguments)
    return out, time.monotonic() - started


def tree(folder: Path) -> set[str]:
    """Every path under ``folder``, relative to it: a snapshot to compare before and after."""
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


# --- Cells that do not stop on SIGINT are escalated ------------------------------------------------


SWALLOWS_SIGINT = (
    "import time\n"
    "print('spinning', flush=True)\n"
    "while True:\n"
    "    try:\n"
    "        time.sleep(0.05)\n"
    "    except KeyboardInterrupt:\n"
    "        pass\n"
)
# With SIGINT blocked in the main thread, the signal lands in one of the kernel's helper threads;
# Python notes it there, but the main thread sleeps on in C and never runs the handler.
BLOCKS_SIGINT_IN_C = (
    "import signal, time\n"
    "print('blocking', flush=True)\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
    "time.sleep(60)\n"
)


@pytest.mark.parametrize(
    ("code", "printed"),
    [(SWALLOWS_SIGINT, "spinning\n"), (BLOCKS_SIGINT_IN_C, "blocking\n")],
    ids=["swallows-keyboard-interrupt", "blocks-sigint-in-c"],
)
async def test_cell_that_outlives_its_interrupt_is_killed_restarted_and_says_state_is_gone(
    tmp_path: Path, code: str, printed: str
) -> None:
    # The grace itself is tested in test_trust_time.py; a short one keeps this test quick.
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, interrupt_grace_s=SHORT_INTERRUPT_GRACE_S) as client:
            old_pid = int((await run(client, "s", "import os\nlost = 1\nos.getpid()"))["result"])
            out, elapsed = await timed_run(client, "s", code, timeout_s=1)
            after = await run(client, "s", "import os\n('lost' in dir(), os.getpid())")
            await wait_until_gone(old_pid)
            await assert_usable(client, "s")
    assert elapsed < ESCALATED_WITHIN_S
    assert out["status"] == "timeout"
    assert out["stdout"] == printed, "partial output survives the kill"
    assert re.search(r"killed", out["warning"]) and re.search(r"restarted", out["warning"]), out["warning"]
    assert re.search(r"gone|lost", out["warning"]), out["warning"]
    assert after["status"] == "ok"
    lost_still_there, new_pid = ast.literal_eval(after["result"])
    assert lost_still_there is False
    assert new_pid != old_pid
    assert after["execution_count"] == 1, "a fresh kernel counts from 1"


# --- Nobody is at the keyboard -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    ["name = input('Your name? ')", "import getpass\ngetpass.getpass('Password: ')", "breakpoint()"],
    ids=["input", "getpass", "breakpoint"],
)
async def test_prompt_for_a_person_fails_at_once_saying_there_is_no_stdin(client: Client, code: str) -> None:
    with anyio.fail_after(QUICK_S):
        out, elapsed = await timed_run(client, "s", code, timeout_s=15)
        await assert_usable(client, "s")
    assert elapsed < PROMPT_FREE_WITHIN_S
    assert out["status"] == "error"
    assert "no standard input" in out["error"]
    assert "in code" in out["error"], "the error suggests passing the value in code"


@pytest.mark.parametrize(
    "code",
    ["import pdb; pdb.set_trace()", "help()", "help(len)"],
    ids=["pdb-set-trace", "interactive-help", "help-pager"],
)
async def test_debugger_and_help_finish_quickly_whatever_their_status(client: Client, code: str) -> None:
    with anyio.fail_after(QUICK_S):
        out, elapsed = await timed_run(client, "s", code, timeout_s=15)
        await assert_usable(client, "s")
    assert elapsed < PROMPT_FREE_WITHIN_S, out
    assert out["status"] in ("ok", "error")


async def test_reading_stdin_gets_end_of_file_at_once(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        out, elapsed = await timed_run(client, "s", "import sys\nsys.stdin.read()", timeout_s=15)
        await assert_usable(client, "s")
    assert elapsed < PROMPT_FREE_WITHIN_S
    assert (out["status"], out["result"]) == ("ok", "''")


# --- Floods of output, huge code -------------------------------------------------------------------


FIFTY_MB = "import sys\nsys.stdout.write('x' * 50_000_000)\nNone"


async def test_fifty_megabytes_of_stdout_are_bounded_and_kept_whole_in_the_named_file(client: Client) -> None:
    with anyio.fail_after(SLOW_S):
        out = await run(client, "s", FIFTY_MB)
        await assert_usable(client, "s")
    assert out["status"] == "ok"
    assert len(out["stdout"]) < 150_000
    assert out["stdout"].startswith("x") and out["stdout"].endswith("x")
    full_text = Path(out["output_files"]["stdout"])
    assert str(full_text) in out["warning"] and "stdout" in out["warning"]
    assert full_text.stat().st_size == 50_000_000


async def test_server_memory_stays_flat_while_fifty_megabytes_pass_through_it(tmp_path: Path) -> None:
    parameters = stdio_parameters("--output-dir", str(tmp_path / "output"), "--envs-dir", str(tmp_path), "--spare-kernels", "0")
    with anyio.fail_after(SLOW_S):
        async with Client(parameters) as client:
            server_pid = int((await run(client, "s", SERVER_PID_CODE))["result"])
            before_kib = memory_kib(server_pid, "VmRSS")
            out = await run(client, "s", FIFTY_MB)
            peak_kib = memory_kib(server_pid, "VmHWM")
            await assert_usable(client, "s")
            saved_bytes = Path(out["output_files"]["stdout"]).stat().st_size  # the server's files go with it
    assert out["status"] == "ok"
    assert len(out["stdout"]) < 150_000
    assert saved_bytes == 50_000_000
    assert (peak_kib - before_kib) * 1024 < 100 * MIB, f"server RSS grew from {before_kib} KiB to a peak of {peak_kib} KiB"


async def test_a_million_tiny_prints_return_in_bounded_time_with_head_and_tail(client: Client) -> None:
    with anyio.fail_after(70):
        out, elapsed = await timed_run(client, "s", "for i in range(1_000_000):\n    print(i)", timeout_s=65)
        await assert_usable(client, "s")
    assert elapsed < 60
    assert out["status"] == "ok"
    assert len(out["stdout"]) < 150_000
    assert out["stdout"].startswith("0\n1\n2\n")
    assert out["stdout"].endswith("999998\n999999\n")
    assert "stdout" in out["output_files"]


async def test_giant_repr_is_bounded_and_names_the_file_with_its_full_text(client: Client) -> None:
    with anyio.fail_after(SLOW_S):
        out = await run(client, "s", "'y' * 20_000_000")
        await assert_usable(client, "s")
    assert out["status"] == "ok"
    assert len(out["result"]) < 150_000
    assert out["result"].startswith("'yyy") and out["result"].endswith("yyy'")
    named = re.search(r"Full text: (\S+)", out["warning"] or "")
    assert named, out["warning"]
    assert Path(named.group(1)).stat().st_size == 20_000_002  # the repr: 20 M characters and two quotes


async def test_a_megabyte_of_code_runs(client: Client) -> None:
    code = "x = '" + "a" * 1_000_000 + "'\nlen(x)"
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", code)
        await assert_usable(client, "s")
    assert (out["status"], out["result"]) == ("ok", "1000000")


# --- Threads, forks and children ---------------------------------------------------------------------


TICKER = re.compile(r"tick \d+")


async def test_background_thread_output_never_mixes_with_another_calls_result(client: Client, tmp_path: Path) -> None:
    code = (
        "import os, threading, time\n"
        "def ticker():\n"
        "    for i in range(40):\n"  # every 50 ms for 2 s; os.write keeps each line whole
        "        os.write(1, b'tick %d\\n' % i)\n"
        "        time.sleep(0.05)\n"
        "threading.Thread(target=ticker, daemon=True).start()\n"
        "'started'"
    )
    with anyio.fail_after(QUICK_S):
        first = await run(client, "s", code)
        second = await run(client, "s", "time.sleep(0.3)\nos.write(1, b'mine\\n')\n'second'")
        await assert_usable(client, "s")
    assert (first["status"], first["result"]) == ("ok", "'started'")
    assert all(TICKER.fullmatch(line) for line in first["stdout"].splitlines()), first["stdout"]
    assert (second["status"], second["result"]) == ("ok", "'second'")
    assert second["execution_count"] == first["execution_count"] + 1
    lines = second["stdout"].splitlines()
    assert lines.count("mine") == 1, second["stdout"]
    assert all(TICKER.fullmatch(line) or line == "mine" for line in lines), second["stdout"]


async def test_multiprocessing_fork_pool_maps_a_function_defined_in_the_cell(client: Client) -> None:
    code = (
        "import multiprocessing\n"
        "def square(x):\n"
        "    return x * x\n"
        "with multiprocessing.get_context('fork').Pool(2) as pool:\n"
        "    squares = pool.map(square, range(10))\n"
        "squares"
    )
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", code)
        await assert_usable(client, "s")
    assert out["status"] == "ok", out["error"]
    assert out["result"] == repr([x * x for x in range(10)])


async def test_reset_ends_the_processes_a_cell_started(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", "import subprocess\np = subprocess.Popen(['sleep', '100'])\np.pid")
        child = int(out["result"])
        assert process_running(child)
        answer = await client.call_tool("reset", {"session": "s"})
        await wait_until_gone(child)
        await assert_usable(client, "s")
    assert not answer.is_error


async def test_shutdown_ends_an_orphaned_grandchild_left_in_the_background(client: Client) -> None:
    # The shell exits at once; its `sleep` is reparented away from the kernel but keeps its process group.
    code = "import subprocess\nint(subprocess.run('sleep 100 >/dev/null 2>&1 & echo $!', shell=True, capture_output=True, text=True).stdout)"
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", code)
        grandchild = int(out["result"])
        assert process_running(grandchild)
        answer = await client.call_tool("shutdown", {"session": "s"})
        await wait_until_gone(grandchild)
    assert not answer.is_error


async def test_shutdown_ends_a_child_that_started_its_own_session(client: Client) -> None:
    code = "import subprocess\nsubprocess.Popen(['sleep', '100'], start_new_session=True).pid"
    child = None
    try:
        with anyio.fail_after(QUICK_S):
            child = int((await run(client, "s", code))["result"])
            await client.call_tool("shutdown", {"session": "s"})
        with anyio.fail_after(2):  # killing a process group takes milliseconds
            await wait_until_gone(child)
    finally:
        if child is not None and process_running(child):  # never leave it behind, bug or not
            os.kill(child, signal.SIGKILL)


async def test_reset_during_a_cell_ends_that_call_promptly_and_the_fresh_kernel_works(client: Client, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    outcome: dict[str, Any] = {}
    returned_at: list[float] = []

    async def long_cell() -> None:
        outcome.update(await run(client, "s", f"kept = 1\n{touch(marker)}\nimport time\ntime.sleep(30)"))
        returned_at.append(time.monotonic())

    with anyio.fail_after(QUICK_S):
        async with anyio.create_task_group() as group:
            group.start_soon(long_cell)
            await wait_for_file(marker)
            old_pid = (await sessions(client))["s"]["pid"]
            reset_at = time.monotonic()
            answer = await client.call_tool("reset", {"session": "s"})
        after = await run(client, "s", "'kept' in dir()")
        await assert_usable(client, "s")
    assert not answer.is_error
    assert returned_at[0] - reset_at < 5
    assert outcome["status"] == "error"
    assert "reset" in outcome["error"]
    assert after["status"] == "ok"
    assert after["result"] == "False"
    assert not process_running(old_pid)


# --- Kernels that die or run out of memory -----------------------------------------------------------


async def test_segfault_names_the_signal_with_the_faulthandler_dump_and_the_next_call_works(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "s", "x = 1")
        died = await run(client, "s", "import ctypes\nctypes.string_at(0)")
        info = (await sessions(client))["s"]
        after = await run(client, "s", "'x' in dir()")
        await assert_usable(client, "s")
    assert died["status"] == "error"
    assert "signal SIGSEGV" in died["error"]
    assert "Fatal Python error" in died["error"] or "Segmentation fault" in died["error"], died["error"]
    assert info["status"] == "dead"
    assert (after["status"], after["result"]) == ("ok", "False")
    assert re.search(r"lost|gone", after["warning"] or ""), after["warning"]


async def test_allocation_over_the_memory_limit_is_a_memory_error_and_the_session_lives(client: Client) -> None:
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))\n"
        "x = bytearray(4 * 1024**3)"
    )
    with anyio.fail_after(QUICK_S):
        await run(client, "s", "kept = 'here'")
        out = await run(client, "s", code)
        after = await run(client, "s", "kept")
        await assert_usable(client, "s")
    assert out["status"] == "error"
    assert out["error"].rstrip().endswith("MemoryError"), out["error"]
    assert after["result"] == "'here'"


# --- Bytes that are not (yet) UTF-8 ------------------------------------------------------------------


async def test_utf8_character_split_across_two_writes_comes_back_whole(client: Client) -> None:
    # The pause makes the relay read the two halves as separate chunks.
    code = "import os, time\nos.write(1, 'é'.encode()[:1])\ntime.sleep(0.2)\nos.write(1, 'é'.encode()[1:] + b'\\n')\nNone"
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", code)
        await assert_usable(client, "s")
    assert out["status"] == "ok"
    assert out["stdout"] == "é\n"


async def test_half_a_character_at_the_end_of_a_cell_does_not_leak_into_the_next_call(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        first = await run(client, "s", "import os\nos.write(1, b'A\\xc3')\nNone")
        second = await run(client, "s", "os.write(1, b'\\xa9B\\n')\nNone")
    assert first["stdout"] == "A\ufffd"
    assert second["stdout"] == "\ufffdB\n"


# --- A cell that closes its own stdout ----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_closing_fd1_in_a_cell_does_not_break_printing_in_later_cells(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        closed = await run(client, "s", "import os\nos.close(1)")
        await assert_usable(client, "s")
        later = await run(client, "s", "print('still heard')")
    assert closed["status"] == "ok"
    assert (later["status"], later["stdout"]) == ("ok", "still heard\n"), later["error"]


async def test_closing_fd1_in_a_cell_does_not_leave_the_idle_kernel_spinning(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        kernel = int((await run(client, "s", "import os\nos.close(1)\nos.getpid()"))["result"])
        await assert_usable(client, "s")
        before = cpu_seconds(kernel)
        await anyio.sleep(1.0)  # a measuring window over an idle kernel, not a synchronisation
        used = cpu_seconds(kernel) - before
    assert used < 0.5, f"the idle kernel used {used:.2f} s of CPU in 1 s"


# --- Env strings that try to leave their folder ------------------------------------------------------


@pytest.mark.parametrize("env", ["../../etc", "..", ".", "~root", "a/../../b"])
async def test_env_that_tries_to_escape_is_env_error_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    root = tmp_path / "root"
    envs_dir = root / "home" / "envs"
    cwd = root / "work" / "here"  # relative paths resolve inside `root`, where we can watch
    for folder in (envs_dir, cwd):
        folder.mkdir(parents=True)
    # Decoys: working interpreters where '..' and '.' would lead if they were taken as folders.
    decoys = [envs_dir.parent / "bin" / "python", envs_dir / "bin" / "python"]
    for decoy in decoys:
        decoy.parent.mkdir()
        decoy.symlink_to(sys.executable)
    monkeypatch.chdir(cwd)
    before = tree(root)
    async with connect(tmp_path, envs_dir=envs_dir, output_dir=root / "output") as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", "1", env=env)
            live = await sessions(client)
            await assert_usable(client, "s")  # the name is free: a default-env session starts
    assert out["status"] == "env_error", "a decoy interpreter sits where '..' or '.' would lead"
    assert repr(env) in out["error"]
    assert not any(str(decoy) in out["error"] for decoy in decoys), out["error"]
    assert out["result"] is None
    assert live == {}
    created = tree(root) - before
    assert all(path.startswith("output") for path in created), created


async def test_an_unwritable_output_folder_costs_the_files_not_the_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    monkeypatch.setattr(tempfile, "tempdir", str(blocked))  # and where the fresh folder instead would go
    code = "print('x' * 300_000)\nimport matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()\n'y' * 300_000"
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, output_dir=blocked / "output") as client:
            out = await run(client, "s", code)
            await assert_usable(client, "s")
    assert out["status"] == "ok"
    assert len(out["stdout"]) < 150_000 and len(out["result"]) < 150_000
    assert "could not be saved" in out["warning"]
    assert out["images"][0]["path"] is None and out["images"][0]["bytes"] > 0
