"""Time and processes (issue 11): every call returns by its timeout_s plus a small grace, and no
kernel outlives the server, however the server ends.

Slow envs are real: an env whose ``bin/python`` is a shell script that waits for a gate file
before it execs the real interpreter, so a test decides exactly when a kernel start may finish.
Where the server's own death is the point, the server runs as a real process on pipes, spoken
to in JSON-RPC lines; elsewhere the in-memory client from conftest's ``connect`` drives it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import ipython_mcp
from conftest import (
    POLL_S,
    parent_of,
    QUICK_S,
    SERVER,
    SLOW_S,
    connect,
    live_processes,
    raw_server,
    run,
    sessions,
    text_of,
    wait_for_file,
    wait_until_gone,
)

# What "returns by timeout_s + grace" may cost on a loaded machine beyond the graces it names.
SCHEDULING_SLACK_S = 3.0

pytestmark = pytest.mark.anyio


# --- Helpers of this file ---------------------------------------------------------------------------


def gated_env(folder: Path, gate: Path) -> Path:
    """An env whose python waits until ``gate`` exists, then execs the real one (same pid)."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f'#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.05; done\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return folder


async def wait_for_processes(below: int, command_has: str) -> set[int]:
    while not (found := live_processes(below=below, command_has=command_has)):
        await anyio.sleep(POLL_S)
    return found


async def wait_until_group_gone(pgid: int) -> None:
    while live_processes(group=pgid):
        await anyio.sleep(POLL_S)


def stdio_server(tmp_path: Path, *prefix: str) -> Any:
    """The server on pipes (behind ``prefix``, e.g. setpriv), with no spare kernel, spoken to in JSON-RPC lines."""
    return raw_server(tmp_path, "--envs-dir", str(tmp_path / "envs"), "--spare-kernels", "0", prefix=prefix)


# --- Every call returns by timeout_s + grace: first calls and restarts included ------------------------


async def test_a_first_call_whose_kernel_is_still_starting_answers_by_its_timeout_and_the_start_goes_on(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    env = gated_env(tmp_path / "slow", gate)
    timeout_s, start_grace_s = 1.0, 1.0
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, start_grace_s=start_grace_s) as client:
            started = time.monotonic()
            first = await run(client, "s", "import os\nos.getpid()", env=str(env), timeout_s=timeout_s)
            elapsed = time.monotonic() - started
            listed = (await sessions(client))["s"]
            (starting,) = live_processes(below=os.getpid(), command_has=str(env))  # the start, still waiting at the gate
            gate.touch()
            second = await run(client, "s", "import os\nos.getpid()")
            parent = parent_of(int(second["result"]))
    assert elapsed < max(timeout_s, start_grace_s) + SCHEDULING_SLACK_S, f"a {timeout_s:g} s call took {elapsed:.1f} s"
    assert first["status"] == "busy" and first["execution_count"] is None
    assert "still starting" in first["error"] and repr(str(env)) in first["error"] and "was not run" in first["error"]
    assert listed["status"] == "starting"
    assert (second["status"], second["warning"]) == ("ok", None)
    assert starting in (int(second["result"]), parent), "the next call found the kernel the first call began to start (or forked from it)"


async def test_a_call_that_begins_a_start_waits_the_start_grace_even_with_a_shorter_timeout(tmp_path: Path) -> None:
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, start_grace_s=20.0) as client:
            out = await run(client, "s", "1 + 1", timeout_s=0.01)
    assert (out["status"], out["result"]) == ("ok", "2")


async def test_a_cell_ignoring_sigint_in_a_slow_env_returns_right_after_the_kill_and_the_next_call_says_state_was_lost(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    env = gated_env(tmp_path / "slow", gate)
    stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('stubborn', flush=True)\ntime.sleep(60)"
    timeout_s, interrupt_grace_s = 1.0, 0.5
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, interrupt_grace_s=interrupt_grace_s) as client:
            old = int((await run(client, "s", "import os\nlost = 1\nos.getpid()", env=str(env)))["result"])
            gate.unlink()  # from now on a kernel start in this env waits
            started = time.monotonic()
            out = await run(client, "s", stubborn, timeout_s=timeout_s)
            elapsed = time.monotonic() - started
            await wait_until_gone(old)
            listed = (await sessions(client))["s"]
            gate.touch()
            after = await run(client, "s", "'lost' in dir()")
    assert elapsed < timeout_s + interrupt_grace_s + SCHEDULING_SLACK_S, f"the call took {elapsed:.1f} s"
    assert out["status"] == "timeout" and out["stdout"] == "stubborn\n"
    assert "killed" in out["warning"] and "restarted" in out["warning"] and "gone" in out["warning"]
    assert listed["status"] == "starting", "the restart goes on after the reply"
    assert (after["status"], after["result"]) == ("ok", "False")
    assert "did not stop on interrupt" in after["warning"] and "gone" in after["warning"]


async def test_a_start_that_fails_after_its_call_returned_is_reported_to_the_next_call(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    env = tmp_path / "broken"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text(
        f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.05; done\necho 'no python here' >&2\nexit 3\n"
    )
    (env / "bin" / "python").chmod(0o755)
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, start_grace_s=0.5) as client:
            first = await run(client, "s", "1", env=str(env), timeout_s=0.5)
            gate.touch()
            while (await sessions(client)).get("s"):  # the failed start forgets the session it was for
                await anyio.sleep(POLL_S)
            second = await run(client, "s", "1", env=str(env))
    assert first["status"] == "busy"
    assert second["status"] == "env_error"
    assert "exited before it was ready (exit code 3)" in second["error"] and "no python here" in second["error"]


# --- No kernel outlives the server ----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=["SIGTERM", "SIGHUP", "SIGKILL"])
async def test_a_signal_while_a_kernel_is_still_starting_leaves_nothing_behind(tmp_path: Path, signum: int) -> None:
    env = gated_env(tmp_path / "slow", tmp_path / "never")
    with anyio.fail_after(QUICK_S):
        async with stdio_server(tmp_path) as server:
            await server.start_execute("s", "1", env=str(env))
            (starting,) = await wait_for_processes(server.process.pid, str(env))
            assert live_processes(group=starting), "the start runs in its own process group"
            server.process.send_signal(signum)
            with anyio.fail_after(10):
                await server.process.wait()
            await wait_until_group_gone(starting)


@pytest.mark.parametrize("start", [(), ("--no-fork-server",)], ids=["forked", "spawned"])
async def test_a_kernel_holding_the_gil_dies_with_its_server_by_itself(tmp_path: Path, start: tuple[str, ...]) -> None:
    """Without the orphan guard (killed first), and with no kernel thread that can run: a forked
    kernel is killed by its fork server, a spawned one by PR_SET_PDEATHSIG."""
    marker = tmp_path / "matching"
    code = f"open({str(marker)!r}, 'w').close()\nimport re\nre.match(r'(a+)+$', 'a' * 40 + 'b')"
    with anyio.fail_after(SLOW_S):
        async with raw_server(tmp_path, "--envs-dir", str(tmp_path / "envs"), "--spare-kernels", "0", *start) as server:
            kernel = int((await server.execute("s", "import os\nos.getpid()"))["result"])
            (guard,) = live_processes(below=server.process.pid, command_has="killpg")
            await server.start_execute("s", code)
            await wait_for_file(marker)
            os.kill(guard, signal.SIGKILL)
            await wait_until_gone(guard)
            server.process.kill()
            await server.process.wait()
            await wait_until_gone(kernel)


async def test_a_server_sigkilled_while_a_cell_holds_the_gil_leaves_no_kernel_and_no_child(tmp_path: Path) -> None:
    child_pid_file = tmp_path / "child.pid"
    code = (
        "import re, subprocess\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(child_pid_file) + '.tmp'!r}, 'w').write(str(child.pid))\n"
        f"import os; os.rename({str(child_pid_file) + '.tmp'!r}, {str(child_pid_file)!r})\n"
        "re.match(r'(a+)+$', 'a' * 40 + 'b')  # hours in C code, holding the GIL"
    )
    with anyio.fail_after(SLOW_S):
        async with stdio_server(tmp_path) as server:
            kernel = int((await server.execute("s", "import os\nos.getpid()"))["result"])
            await server.start_execute("s", code)
            await wait_for_file(child_pid_file)
            child = int(child_pid_file.read_text())
            server.process.kill()
            await server.process.wait()
            await wait_until_gone(kernel)
            await wait_until_gone(child)


async def test_a_client_that_stops_reading_makes_the_server_exit_and_take_its_kernels(tmp_path: Path) -> None:
    # Plain pipes, so the test can really close its read end of the server's stdout.
    command = [sys.executable, str(SERVER), "--envs-dir", str(tmp_path / "envs"), "--spare-kernels", "0"]
    with open(tmp_path / "server-stderr.txt", "wb") as stderr:  # noqa: ASYNC230 (a local file, opened once)
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)  # noqa: ASYNC220
    assert process.stdin is not None and process.stdout is not None
    stdin, stdout = process.stdin, process.stdout

    def send(message: dict[str, Any]) -> None:
        stdin.write(json.dumps(message).encode() + b"\n")
        stdin.flush()

    async def answer_to(request_id: int) -> dict[str, Any]:
        while True:
            line = await anyio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
            assert line, "the server closed its stdout"
            if (message := json.loads(line)).get("id") == request_id:
                return message

    try:
        with anyio.fail_after(QUICK_S):
            init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "time-test", "version": "0"}}
            send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init})
            await answer_to(1)
            send({"jsonrpc": "2.0", "method": "notifications/initialized"})
            call = {"name": "execute", "arguments": {"session": "s", "code": "import os\nos.getpid()"}}
            send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call})
            kernel = int((await answer_to(2))["result"]["structuredContent"]["result"])
            stdout.close()  # the client stops reading: the server's next write gets EPIPE
            send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "list_sessions", "arguments": {}}})
            with anyio.fail_after(10):
                while process.poll() is None:  # stdin is still open: only the broken stdout can end it
                    await anyio.sleep(POLL_S)
            await wait_until_gone(kernel)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(5)
        stdin.close()
    assert "the client closed its end of our stdout" in (tmp_path / "server-stderr.txt").read_text()


# --- Envs the server may not read -------------------------------------------------------------------------


def without_dac_override() -> tuple[str, ...]:
    """A command prefix under which permission bits bind this process, even as root (which passes them by capability)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, and no setpriv to drop root's capabilities: permission bits would not apply")
    return (setpriv, "--inh-caps=-all", "--bounding-set=-all")


async def test_an_env_inside_a_folder_the_server_may_not_enter_is_an_env_error_naming_that_folder(tmp_path: Path) -> None:
    prefix = without_dac_override()
    locked = tmp_path / "locked"
    env = locked / "env"
    (env / "bin").mkdir(parents=True)
    locked.chmod(0o000)
    try:
        with anyio.fail_after(QUICK_S):
            async with stdio_server(tmp_path, *prefix) as server:
                out = await server.execute("s", "1", env=str(env))
                listing = await server.request("tools/call", {"name": "list_sessions", "arguments": {}})
    finally:
        locked.chmod(0o755)
    assert out["status"] == "env_error", out
    assert "permission denied" in out["error"] and f"may not enter the folder {locked}," in out["error"], out["error"]
    assert listing["result"]["structuredContent"]["sessions"] == []


# --- Limits: live sessions, idle kernels -------------------------------------------------------------------


async def test_a_session_past_max_sessions_is_a_tool_error_naming_the_live_ones_and_shutdown(tmp_path: Path) -> None:
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, max_sessions=2) as client:
            await run(client, "a", "1")
            await run(client, "b", "1")
            refused = await client.call_tool("execute", {"session": "c", "code": "1"})
            again = await run(client, "a", "2")  # existing sessions still work
            await client.call_tool("shutdown", {"session": "a"})
            after = await run(client, "c", "3")
            listed = await sessions(client)
    assert refused.is_error
    text = text_of(refused)
    assert "'c' was not created" in text and "Live sessions: a, b." in text and "shutdown" in text and "--max-sessions" in text
    assert again["result"] == "2" and after["result"] == "3"
    assert sorted(listed) == ["b", "c"]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, 32),
        ({"IPYTHON_MCP_MAX_SESSIONS": "5"}, 5),
        ({"IPYTHON_MCP_MAX_SESSIONS": "0"}, 32),
        ({"IPYTHON_MCP_MAX_SESSIONS": "x"}, 32),
    ],
)
def test_max_sessions_comes_from_its_environment_variable(environ: dict[str, str], expected: int) -> None:
    assert ipython_mcp.max_sessions_default(environ) == expected


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"IPYTHON_MCP_IDLE_TIMEOUT_S": "600"}, 600.0),
        ({"IPYTHON_MCP_IDLE_TIMEOUT_S": "0"}, None),
        ({"IPYTHON_MCP_IDLE_TIMEOUT_S": "soon"}, None),
    ],
)
def test_idle_timeout_comes_from_its_environment_variable_and_is_off_by_default(
    environ: dict[str, str], expected: float | None
) -> None:
    assert ipython_mcp.idle_timeout_default(environ) == expected


async def test_an_idle_session_has_its_kernel_stopped_and_its_next_call_says_the_state_was_lost(tmp_path: Path) -> None:
    idle_s = 0.5
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, idle_timeout_s=idle_s) as client:
            busy = await run(client, "s", f"import os, time\nkept = 1\ntime.sleep({idle_s * 4})\nos.getpid()")
            stayed = await run(client, "s", "import os\n(kept, os.getpid())")  # a cell longer than idle_s is not idleness
            while (await sessions(client))["s"]["status"] != "stopped":
                await anyio.sleep(POLL_S)
            await wait_until_gone(int(busy["result"]))
            listed = (await sessions(client))["s"]
            after = await run(client, "s", "'kept' in dir()")
    assert stayed["result"] == f"(1, {busy['result']})"
    assert listed["pid"] is None
    assert (after["status"], after["result"]) == ("ok", "False")
    assert "idle" in after["warning"] and "gone" in after["warning"]
