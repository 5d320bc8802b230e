"""Tests for ipython-mcp, through real MCP clients and real kernels (no mocks).

Most tests talk to an in-memory server (``Client(build_server(config))``): each test gets
its own server, so its sessions and kernels are its own and it ends with them killed.
The process-level guarantees (the wire, stdin EOF, SIGTERM, SIGKILL, a person starting the
server in a terminal) are tested with the server as a real child process: through the SDK's
stdio client, through raw pipes speaking JSON-RPC by hand, and through a pty with pexpect.

Every test is bounded with ``anyio.fail_after`` (or pexpect's own timeout) and waits for
output or events, never for a fixed time: a cell that must be running before the test acts
touches a marker file first, and the test waits for that file.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pexpect
import pytest
from mcp import Client

import ipython_mcp

from conftest import (
    SERVER_PID_CODE,
    POLL_S,
    QUICK_S,
    SERVER,
    RawServer,
    SLOW_S,
    connect,
    kernels_below,
    own_sessions,
    process_running,
    raw_server,
    run,
    sessions,
    stdio_parameters,
    text_of,
    touch,
    wait_for_file,
    wait_until_all_gone,
    wait_until_gone,
)

ANSI_ESCAPE = re.compile(r"\x1b\[")
SESSION_NAME_RULE = re.compile(r"1.64 characters")  # the rule as the error states it

pytestmark = pytest.mark.anyio


# --- Envs: one venv with IPython, one without, made once per test run -----------------------------


@pytest.fixture(scope="session")
def envs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<base>/envs`` holding ``good`` (IPython installed with uv) and ``bare`` (no IPython).

    ``<base>`` also serves as a HOME for the '~' test. uv's cache makes the install quick.
    """
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is needed to build the test venv with IPython")
    folder = tmp_path_factory.mktemp("home") / "envs"
    good = folder / "good"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(good)], check=True, timeout=120)
    install = [uv, "pip", "install", "--quiet", "--python", str(good / "bin" / "python"), "ipython"]
    subprocess.run(install, check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "bare")], check=True, timeout=120)
    return folder


@pytest.fixture(scope="module")
async def shared_env_server(tmp_path_factory: pytest.TempPathFactory, envs_dir: Path) -> AsyncIterator[Client]:
    async with connect(tmp_path_factory.mktemp("envs-server"), envs_dir=envs_dir) as client:
        yield client


@pytest.fixture
async def env_client(shared_env_server: Client) -> AsyncIterator[Client]:
    async with own_sessions(shared_env_server) as client:
        yield client


# --- Pure functions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"MCP_TOOL_TIMEOUT": "10000"}, 8.0),
        ({"MCP_TOOL_TIMEOUT": "60000"}, 58.0),
        ({"MCP_TOOL_TIMEOUT": "4000"}, 2.0),
        ({}, 58.0),
        ({"MCP_TOOL_TIMEOUT": ""}, 58.0),
        ({"MCP_TOOL_TIMEOUT": "soon"}, 58.0),
        ({"MCP_TOOL_TIMEOUT": "0"}, 58.0),
        ({"MCP_TOOL_TIMEOUT": "-5000"}, 58.0),
    ],
)
def test_default_timeout_is_client_timeout_minus_two_seconds_or_58(environ: dict[str, str], expected: float) -> None:
    assert ipython_mcp.default_timeout_s(environ) == expected


def test_a_short_client_timeout_still_leaves_the_cell_a_positive_timeout() -> None:
    assert 0 < ipython_mcp.default_timeout_s({"MCP_TOOL_TIMEOUT": "1000"}) < 1


# --- execute: every status, with every field ------------------------------------------------------


async def test_ok_cell_returns_stdout_stderr_and_result(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", "import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7")
    assert out["status"] == "ok"
    assert out["stdout"] == "out\n"
    assert out["stderr"] == "err\n"
    assert out["result"] == "42"
    assert out["error"] is None
    assert out["execution_count"] == 1
    assert out["warning"] is None


async def test_cell_without_final_expression_has_null_result(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", "x = 1")
    assert (out["status"], out["result"], out["stdout"], out["error"]) == ("ok", None, "", None)


async def test_error_is_plain_text_traceback_ending_with_exception(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", "print('before')\n1 / 0")
    assert out["status"] == "error"
    assert out["stdout"] == "before\n"
    assert out["result"] is None
    assert out["execution_count"] == 1
    assert out["warning"] is None
    assert not ANSI_ESCAPE.search(out["error"])
    assert out["error"].endswith("ZeroDivisionError: division by zero")
    assert "1 / 0" in out["error"]


async def test_syntax_error_is_an_error_status(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", "def (")
    assert out["status"] == "error"
    assert "SyntaxError" in out["error"]
    assert not ANSI_ESCAPE.search(out["error"])


async def test_execution_count_counts_like_ipython_prompt_errors_included(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        counts = [(await run(client, "s", code))["execution_count"] for code in ("a = 1", "1 / 0", "a", "b = a + 1")]
        info = (await sessions(client))["s"]
    assert counts == [1, 2, 3, 4]
    assert info["exec_count"] == 4


async def test_state_is_kept_between_calls(client: Client, tmp_path: Path) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "s", f"import os\nnumbers = [1, 2, 3]\ndef double(x):\n    return 2 * x\nos.chdir({str(tmp_path)!r})")
        out = await run(client, "s", "import os\n(double(sum(numbers)), os.getcwd())")
    assert ast.literal_eval(out["result"]) == (12, str(tmp_path)), "a long path wraps the repr"


async def test_sessions_are_independent(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "one", "x = 'one'")
        out = await run(client, "two", "x")
    assert out["status"] == "error"
    assert out["error"].endswith("NameError: name 'x' is not defined")


async def test_timeout_returns_partial_output_and_keeps_state(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "s", "kept = 'still here'")
        started = time.monotonic()
        out = await run(client, "s", "print('before', flush=True)\nimport time\ntime.sleep(30)", timeout_s=1)
        elapsed = time.monotonic() - started
        after = await run(client, "s", "kept")
    assert out["status"] == "timeout"
    assert (out["stdout"], out["stderr"], out["result"], out["warning"]) == ("before\n", "", None, None)
    assert "timeout_s=1" in out["error"]
    assert out["execution_count"] == 2, "an interrupted cell counts like any other"
    assert elapsed < 10
    assert after["status"] == "ok"
    assert after["result"] == "'still here'"
    assert after["warning"] is None


async def test_exit_in_a_cell_is_ignored_with_a_note(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "s", "x = 1")
        out = await run(client, "s", "exit()")
        after = await run(client, "s", "x")
    assert out["warning"] and "shutdown" in out["warning"]
    assert after["result"] == "1"


async def test_nonpositive_timeout_is_a_tool_error(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        result = await client.call_tool("execute", {"session": "s", "code": "1", "timeout_s": 0})
    assert result.is_error
    assert "timeout_s" in text_of(result)


def text_sections(text: str) -> tuple[str, dict[str, str]]:
    """The text block's head line, and its ``--- name ---`` sections by name."""
    head, *rest = re.split(r"^--- (\w+) ---\n", text, flags=re.MULTILINE)
    return head.rstrip("\n"), {name: body.rstrip("\n") for name, body in zip(rest[::2], rest[1::2])}


@pytest.mark.parametrize(
    "code",
    ["import sys\nprint('hello')\nprint('careful', file=sys.stderr)\n'the result'", "print('before')\n1 / 0", "x = 1"],
    ids=["ok", "error", "silent"],
)
async def test_text_block_mirrors_structured_result(client: Client, code: str) -> None:
    with anyio.fail_after(QUICK_S):
        result = await client.call_tool("execute", {"session": "s", "code": code})
    out = result.structured_content
    head, sections = text_sections(text_of(result))
    assert head == f"status: {out['status']} · In [{out['execution_count']}] · {out['duration_s']:.3g} s · session 's'"
    fields = {name: out[name] for name in ("stdout", "stderr", "result", "error", "warning") if out[name]}
    assert sections == {name: value.rstrip("\n") for name, value in fields.items()}, "each field once, nothing else"


# --- Output: file descriptors, bytes, size --------------------------------------------------------


async def test_fd_level_output_of_children_and_shell_commands_is_captured(client: Client) -> None:
    code = (
        "import os, subprocess, sys\n"
        "os.write(1, b'fd1\\n')\n"
        "os.system('echo sys')\n"
        "subprocess.run(['echo', 'sub'])\n"
        "os.write(2, b'fd2\\n')\n"
        "subprocess.run('echo suberr >&2', shell=True)\n"
        "!echo bang\n"
    )
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", code)
    assert out["status"] == "ok", out["error"]
    assert out["stdout"] == "fd1\nsys\nsub\nbang\n"
    assert out["stderr"] == "fd2\nsuberr\n"


async def test_non_utf8_bytes_come_back_replaced(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", "import os\nos.write(1, b'\\xff\\xfe ok\\n')")
    assert out["status"] == "ok"
    assert out["stdout"] == "\ufffd\ufffd ok\n"


# --- Bad input: session names, NUL bytes ----------------------------------------------------------


@pytest.mark.parametrize("name", ["", "x" * 10_000, "a/b", "../etc", "a\nb", "tab\there", "bell\x07", ".hidden", "x" * 65])
async def test_invalid_session_name_is_a_tool_error_stating_the_rule(client: Client, name: str) -> None:
    with anyio.fail_after(QUICK_S):
        result = await client.call_tool("execute", {"session": name, "code": "1"})
        live = await sessions(client)
    assert result.is_error
    assert SESSION_NAME_RULE.search(text_of(result))
    assert len(text_of(result)) < 1_000, "a long name is not echoed back whole"
    assert live == {}


async def test_longest_valid_session_name_is_accepted(client: Client) -> None:
    name = "a" + "b.-_9" * 12 + "xyz"  # 64 characters
    with anyio.fail_after(QUICK_S):
        out = await run(client, name, "1")
    assert out["status"] == "ok"


async def test_code_with_nul_byte_gets_a_clear_error(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        result = await client.call_tool("execute", {"session": "s", "code": "x = 1\x00"})
    assert result.is_error
    assert "NUL" in text_of(result)


# --- interrupt, cancellation, concurrency ---------------------------------------------------------


async def test_interrupt_stops_a_running_cell_and_keeps_state(client: Client, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    outcome: dict[str, Any] = {}

    async def long_cell() -> None:
        code = f"kept = 41\nprint('partial', flush=True)\n{touch(marker)}\nimport time\ntime.sleep(30)"
        outcome.update(await run(client, "s", code))

    with anyio.fail_after(QUICK_S):
        async with anyio.create_task_group() as group:
            group.start_soon(long_cell)
            await wait_for_file(marker)
            busy = (await sessions(client))["s"]  # list_sessions while a cell runs
            answer = await client.call_tool("interrupt", {"session": "s"})
        after = await run(client, "s", "kept + 1")
    assert busy["status"] == "busy"
    assert busy["busy_s"] is not None
    assert not answer.is_error
    assert outcome["status"] == "error"
    assert outcome["error"].endswith("KeyboardInterrupt")
    assert outcome["stdout"] == "partial\n"
    assert after["result"] == "42"


async def run_shell_cell_and_interrupt(client: Client, marker: Path) -> dict[str, Any]:
    """Run a cell whose `!sleep 100` is running when the interrupt comes, then a line after it."""
    outcome: dict[str, Any] = {}

    async def shell_cell() -> None:
        outcome.update(await run(client, "s", f"kept = 7\n!touch {marker} && sleep 100\nafter = 'ran'"))

    async with anyio.create_task_group() as group:
        group.start_soon(shell_cell)
        await wait_for_file(marker)
        await client.call_tool("interrupt", {"session": "s"})
    return outcome


async def test_interrupted_shell_command_ends_the_cell_with_keyboard_interrupt_and_keeps_state(client: Client, tmp_path: Path) -> None:
    with anyio.fail_after(QUICK_S):  # `sleep 100` would outlast this bound
        outcome = await run_shell_cell_and_interrupt(client, tmp_path / "running")
        rest = await run(client, "s", "'after' in dir()")
        after = await run(client, "s", "kept")
    assert outcome["status"] == "error"
    assert outcome["error"].endswith("KeyboardInterrupt")
    assert rest["result"] == "False", "the line after the interrupted command did not run"
    assert after["result"] == "7"


async def test_interrupt_of_an_idle_session_says_it_was_idle(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "s", "x = 1")
        answer = await client.call_tool("interrupt", {"session": "s"})
        after = await run(client, "s", "x")
    assert not answer.is_error
    assert answer.structured_content["outcome"] == "idle"
    assert after["result"] == "1"


async def test_interrupt_sent_before_the_kernel_starts_the_cell_still_stops_it(client: Client) -> None:
    outcome: dict[str, Any] = {}

    async def long_cell() -> None:
        outcome.update(await run(client, "s", "import time\ntime.sleep(8)", timeout_s=15))

    with anyio.fail_after(QUICK_S):
        await run(client, "s", "warm = 1")
        async with anyio.create_task_group() as group:
            group.start_soon(long_cell)
            # The first interrupt that finds the session busy: the request may still be in the pipe.
            while (await client.call_tool("interrupt", {"session": "s"})).structured_content["outcome"] != "interrupted":
                pass
    assert outcome["status"] == "error"
    assert outcome["error"].endswith("KeyboardInterrupt")
    assert outcome["duration_s"] < 5


async def test_cancelled_call_interrupts_the_cell_and_keeps_state(client: Client, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    with anyio.fail_after(QUICK_S):
        async with anyio.create_task_group() as group:

            async def long_cell() -> None:
                await run(client, "s", f"kept = 'yes'\n{touch(marker)}\nimport time\ntime.sleep(30)")

            group.start_soon(long_cell)
            await wait_for_file(marker)
            group.cancel_scope.cancel()
        after = await run(client, "s", "kept")
    assert after["status"] == "ok"
    assert after["result"] == "'yes'"


async def test_parallel_sessions_really_run_in_parallel(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "left", "import time")
        await run(client, "right", "import time")
        started = time.monotonic()
        async with anyio.create_task_group() as group:
            group.start_soon(run, client, "left", "time.sleep(1.5)")
            group.start_soon(run, client, "right", "time.sleep(1.5)")
        elapsed = time.monotonic() - started
    assert elapsed < 2.7


async def test_two_calls_on_one_session_run_one_after_another(client: Client, tmp_path: Path) -> None:
    marker = tmp_path / "first-running"
    results: dict[str, dict[str, Any]] = {}

    async def call(key: str, code: str) -> None:
        results[key] = await run(client, "s", code)

    with anyio.fail_after(QUICK_S):
        await run(client, "s", "import time\nlog = []")
        async with anyio.create_task_group() as group:
            first = f"log.append('first start')\n{touch(marker)}\ntime.sleep(0.5)\nlog.append('first end')"
            group.start_soon(call, "first", first)
            await wait_for_file(marker)
            group.start_soon(call, "second", "log.append('second')\nlist(log)")
    assert results["second"]["result"] == repr(["first start", "first end", "second"])
    assert results["second"]["execution_count"] == results["first"]["execution_count"] + 1


async def test_two_first_calls_to_a_new_session_create_one_kernel(client: Client) -> None:
    pids: list[str] = []

    async def first_call() -> None:
        pids.append((await run(client, "fresh", "import os\nos.getpid()"))["result"])

    with anyio.fail_after(QUICK_S):
        async with anyio.create_task_group() as group:
            group.start_soon(first_call)
            group.start_soon(first_call)
        live = await sessions(client)
    assert len(pids) == 2
    assert pids[0] == pids[1]
    assert list(live) == ["fresh"]
    assert str(live["fresh"]["pid"]) == pids[0]


# --- list_sessions, reset, shutdown, unknown sessions ---------------------------------------------


async def test_list_sessions_shows_every_field(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        assert await sessions(client) == {}
        pid = (await run(client, "s", "import os\nos.getpid()"))["result"]
        await run(client, "s", "1")
        info = (await sessions(client))["s"]
    assert info["name"] == "s"
    assert info["env"] == "default"
    assert info["python"] == sys.executable
    assert info["status"] == "idle"
    assert info["exec_count"] == 2
    assert info["uptime_s"] >= 0
    assert str(info["pid"]) == pid
    assert info["python_version"] == "{}.{}.{}".format(*sys.version_info[:3])


# list_sessions while a cell runs (busy, busy_s): test_interrupt_stops_a_running_cell_and_keeps_state.


async def test_reset_wipes_state_and_keeps_env(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        old_pid = (await run(client, "s", "import os\nx = 1\nos.getpid()"))["result"]
        before = (await sessions(client))["s"]
        answer = await client.call_tool("reset", {"session": "s"})
        out = await run(client, "s", "import os\nos.getpid()")
        gone = await run(client, "s", "x")
        after = (await sessions(client))["s"]
    assert not answer.is_error
    assert out["result"] != old_pid
    assert out["execution_count"] == 1
    assert gone["error"].endswith("NameError: name 'x' is not defined")
    assert (after["env"], after["python"]) == (before["env"], before["python"])
    assert not process_running(int(old_pid))


async def test_shutdown_forgets_the_session_and_ends_its_kernel(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "s", "x = 1")
        await run(client, "other", "y = 2")
        pid = (await sessions(client))["s"]["pid"]
        answer = await client.call_tool("shutdown", {"session": "s"})
        live = await sessions(client)
        with pytest.raises(ProcessLookupError):  # killed and reaped, not a zombie
            os.kill(pid, 0)
        again = await run(client, "s", "'x' in dir()")
    assert not answer.is_error
    assert list(live) == ["other"]
    assert again["result"] == "False"
    assert again["warning"] is None


async def test_shutdown_ends_the_shell_commands_a_cell_started(client: Client, tmp_path: Path) -> None:
    pid_file = tmp_path / "sleep.pid"
    with anyio.fail_after(QUICK_S):
        code = f"import subprocess\np = subprocess.Popen(['sleep', '100'])\nopen({str(pid_file)!r}, 'w').write(str(p.pid))"
        await run(client, "s", code)
        child = int(pid_file.read_text())
        assert process_running(child)
        await client.call_tool("shutdown", {"session": "s"})
        await wait_until_gone(child)


async def test_shutdown_during_a_cell_ends_that_call_with_a_clear_error(client: Client, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    outcome: dict[str, Any] = {}

    async def long_cell() -> None:
        outcome.update(await run(client, "s", f"{touch(marker)}\nimport time\ntime.sleep(30)"))

    with anyio.fail_after(QUICK_S):
        async with anyio.create_task_group() as group:
            group.start_soon(long_cell)
            await wait_for_file(marker)
            answer = await client.call_tool("shutdown", {"session": "s"})
        live = await sessions(client)
    assert not answer.is_error
    assert outcome["status"] == "error"
    assert "shut down" in outcome["error"]
    assert live == {}


@pytest.mark.parametrize("tool", ["reset", "shutdown", "interrupt"])
async def test_unknown_session_is_a_tool_error_naming_live_sessions(client: Client, tool: str) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "alive-one", "1")
        await run(client, "alive-two", "2")
        result = await client.call_tool(tool, {"session": "nope"})
    assert result.is_error
    text = text_of(result)
    assert "nope" in text
    assert "alive-one" in text and "alive-two" in text


# --- A kernel that dies ---------------------------------------------------------------------------


async def test_kernel_exit_is_reported_and_next_call_starts_fresh_with_a_warning(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "s", "x = 1")
        died = await run(client, "s", "import os\nos._exit(1)")
        info = (await sessions(client))["s"]
        interrupt_dead = await client.call_tool("interrupt", {"session": "s"})
        after = await run(client, "s", "'x' in dir()")
        later = await run(client, "s", "2")
    assert (died["status"], died["result"]) == ("error", None)
    assert "exit code 1" in died["error"]
    assert info["status"] == "dead"
    assert not interrupt_dead.is_error and interrupt_dead.structured_content["outcome"] == "no_kernel"
    assert after["status"] == "ok"
    assert after["result"] == "False"
    assert after["execution_count"] == 1
    assert re.search(r"lost|gone", after["warning"])
    assert later["warning"] is None, "the state-lost warning is given once"


# os._exit() drains the relay first; a SIGKILL or a segfault cannot be intercepted, and what
# the relay thread had not forwarded yet is collected by the server from the pipes it shares.
@pytest.mark.parametrize(
    ("death", "how"),
    [
        ("os._exit(3)", "exit code 3"),
        ("os.kill(os.getpid(), signal.SIGKILL)", "signal SIGKILL"),
        ("ctypes.string_at(0)", "signal SIGSEGV"),
    ],
)
async def test_output_written_just_before_the_kernel_dies_is_kept(client: Client, death: str, how: str) -> None:
    code = f"import ctypes, os, signal\nos.write(1, b'last words\\n')\nos.write(2, b'dying\\n')\n{death}"
    with anyio.fail_after(QUICK_S):
        died = await run(client, "s", code)
    assert died["status"] == "error"
    assert how in died["error"]
    assert (died["stdout"], died["stderr"]) == ("last words\n", "dying\n")


# --- Images ---------------------------------------------------------------------------------------


async def test_matplotlib_uses_the_inline_backend_by_default(client: Client) -> None:
    with anyio.fail_after(SLOW_S):
        out = await run(client, "s", "import matplotlib\nmatplotlib.get_backend()")
    assert out["result"] == repr("module://matplotlib_inline.backend_inline")


# A last expression with a PNG repr: test_rich_output.py (a Pillow image, its size, file and text).


# --- envs: default, bare names, paths, '~', changes, unusable ones --------------------------------


@pytest.mark.parametrize("env", [None, ""])
async def test_default_env_is_the_servers_own_python(client: Client, env: str | None) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", "import sys\nsys.executable", **({} if env is None else {"env": env}))
        info = (await sessions(client))["s"]
    assert out["result"] == repr(sys.executable)
    assert (info["env"], info["python"]) == ("default", sys.executable)


async def test_bare_env_name_runs_in_that_env_under_the_envs_dir(env_client: Client, envs_dir: Path) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(env_client, "s", "import sys\nsys.prefix", env="good")
        info = (await sessions(env_client))["s"]
    assert out["status"] == "ok", out["error"]
    assert out["result"] == repr(str(envs_dir / "good"))
    assert (info["env"], info["python"]) == ("good", str(envs_dir / "good" / "bin" / "python"))


async def test_env_path_with_a_slash_runs_in_that_env(env_client: Client, envs_dir: Path) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(env_client, "s", "import sys\nsys.prefix", env=str(envs_dir / "good"))
    assert out["status"] == "ok", out["error"]
    assert out["result"] == repr(str(envs_dir / "good"))


async def test_env_path_with_a_tilde_expands_home(env_client: Client, envs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(envs_dir.parent))
    with anyio.fail_after(QUICK_S):
        out = await run(env_client, "s", "import sys\nsys.prefix", env="~/envs/good")
        info = (await sessions(env_client))["s"]
    assert out["status"] == "ok", out["error"]
    assert out["result"] == repr(str(envs_dir / "good"))
    assert (info["env"], info["python"]) == ("~/envs/good", str(envs_dir / "good" / "bin" / "python"))


async def test_env_path_to_an_interpreter_or_a_project_with_dot_venv_works(
    env_client: Client, envs_dir: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / ".venv").symlink_to(envs_dir / "good")
    with anyio.fail_after(QUICK_S):
        by_interpreter = await run(env_client, "a", "import sys\nsys.prefix", env=str(envs_dir / "good" / "bin" / "python"))
        by_project = await run(env_client, "b", "import sys\nsys.prefix", env=str(project))
    assert by_interpreter["result"] == repr(str(envs_dir / "good"))
    assert by_project["status"] == "ok", by_project["error"]


async def test_reset_keeps_the_sessions_named_env(env_client: Client, envs_dir: Path) -> None:
    with anyio.fail_after(QUICK_S):
        await run(env_client, "s", "x = 1", env="good")
        answer = await env_client.call_tool("reset", {"session": "s"})
        out = await run(env_client, "s", "import sys\n('x' in dir(), sys.prefix)")
        info = (await sessions(env_client))["s"]
    assert not answer.is_error
    assert out["result"] == repr((False, str(envs_dir / "good")))
    assert info["env"] == "good"


async def test_other_env_on_existing_session_warns_and_runs_in_original_env(env_client: Client, envs_dir: Path) -> None:
    with anyio.fail_after(QUICK_S):
        await run(env_client, "s", "x = 1")
        out = await run(env_client, "s", "import sys\n(x, sys.executable)", env="good")
        same = await run(env_client, "s", "2", env="")
        info = (await sessions(env_client))["s"]
    assert out["status"] == "ok"
    assert out["result"] == repr((1, sys.executable))
    assert "good" in out["warning"]
    assert "default" in out["warning"]
    assert same["warning"] is None, "asking for the default again is no change"
    assert info["env"] == "default"


async def test_env_without_ipython_is_env_error_with_an_install_hint(env_client: Client, envs_dir: Path) -> None:
    python = envs_dir / "bare" / "bin" / "python"
    with anyio.fail_after(QUICK_S):
        out = await run(env_client, "s", "1", env="bare")
        live = await sessions(env_client)
    assert out["status"] == "env_error"
    assert (out["stdout"], out["stderr"], out["result"], out["execution_count"], out["warning"]) == ("", "", None, None, None)
    assert "'bare'" in out["error"]
    assert str(python) in out["error"]
    assert f"uv pip install --python {python} ipykernel" in out["error"] or f"{python} -m pip install ipykernel" in out["error"]
    assert live == {}, "a session that could not start is not kept"


async def test_missing_env_name_is_env_error_naming_the_interpreter(env_client: Client, envs_dir: Path) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(env_client, "s", "1", env="missing")
        live = await sessions(env_client)
    assert out["status"] == "env_error"
    assert "'missing'" in out["error"]
    assert str(envs_dir / "missing" / "bin" / "python") in out["error"]
    assert live == {}


async def test_missing_env_path_is_env_error(env_client: Client, tmp_path: Path) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(env_client, "s", "1", env=str(tmp_path / "nowhere"))
    assert out["status"] == "env_error"
    assert str(tmp_path / "nowhere") in out["error"]


async def test_env_error_then_a_good_env_under_the_same_name_works(env_client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        failed = await run(env_client, "s", "1", env="bare")
        out = await run(env_client, "s", "1", env="good")
    assert failed["status"] == "env_error"
    assert out["status"] == "ok"


# --- Over stdio: the SDK's stdio client -----------------------------------------------------------


async def test_stdio_client_runs_cells_and_leaves_no_process_behind_when_it_exits(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with Client(stdio_parameters(IPYTHON_MCP_ENVS_DIR=str(tmp_path))) as client:
            out = await run(client, "a", "x = 1\n" + SERVER_PID_CODE)
            await run(client, "b", "import subprocess\np = subprocess.Popen(['sleep', '100'])")
            state = await run(client, "a", "x + 1")
            live = await sessions(client)
            grandchild = int((await run(client, "b", "p.pid"))["result"])
        server_pid = int(out["result"])
        pids = [info["pid"] for info in live.values()]
        await wait_until_gone(server_pid)
        for pid in [*pids, grandchild]:
            await wait_until_gone(pid)
    assert state["result"] == "2"
    assert len(pids) == 2


async def test_mcp_tool_timeout_sets_the_default_cell_timeout(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with Client(stdio_parameters("--spare-kernels", "0", MCP_TOOL_TIMEOUT="4000")) as client:
            await run(client, "s", "import time\nkept = 1")
            started = time.monotonic()
            out = await run(client, "s", "print('napping', flush=True)\ntime.sleep(30)")
            elapsed = time.monotonic() - started
            after = await run(client, "s", "kept")
    assert out["status"] == "timeout"
    assert out["stdout"] == "napping\n"
    assert 1.5 <= elapsed < 6
    assert after["result"] == "1"


async def test_stdio_server_takes_named_envs_from_ipython_mcp_envs_dir(envs_dir: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with Client(stdio_parameters("--spare-kernels", "0", IPYTHON_MCP_ENVS_DIR=str(envs_dir))) as client:
            good = await run(client, "a", "import sys\nsys.prefix", env="good")
            bare = await run(client, "b", "1", env="bare")
    assert good["result"] == repr(str(envs_dir / "good"))
    assert bare["status"] == "env_error"
    assert str(envs_dir / "bare" / "bin" / "python") in bare["error"]
    assert "pip install" in bare["error"] and "ipykernel" in bare["error"]


# --- Over stdio: raw JSON-RPC lines on pipes ------------------------------------------------------


async def test_a_spare_kernel_serves_the_next_new_session_and_dies_with_the_server(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with raw_server(tmp_path, "--spare-kernels", "1") as server:
            while (await server.request("tools/call", {"name": "list_sessions", "arguments": {}}))["result"][
                "structuredContent"
            ]["spare_kernels"] < 1:
                await anyio.sleep(POLL_S)
            (spare,) = kernels_below(server.process.pid)
            out = await server.execute("new", "import os\nos.getpid()")
            assert int(out["result"]) == spare, "the new session runs in the spare kernel"
            while len(kernels_below(server.process.pid)) < 2:  # and a new spare is on its way
                await anyio.sleep(POLL_S)
            everything = kernels_below(server.process.pid)
            await server.process.stdin.aclose()
            with anyio.fail_after(5):
                assert await server.process.wait() == 0
            for pid in everything:
                await wait_until_gone(pid)


async def test_no_spare_kernel_with_spare_kernels_zero(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with raw_server(tmp_path, "--spare-kernels", "0") as server:
            out = await server.execute("s", "import os\nos.getpid()")
            # A spare would be spawned at start and again when a session took it: watch for one over
            # a window of two kernel starts (a measuring window, not a synchronisation).
            window_s = max(1.0, 2 * out["duration_s"])
            watched_until = time.monotonic() + window_s
            while time.monotonic() < watched_until:
                listing = await server.request("tools/call", {"name": "list_sessions", "arguments": {}})
                assert listing["result"]["structuredContent"]["spare_kernels"] == 0
                assert kernels_below(server.process.pid) == {int(out["result"])}, "only the session's own kernel"
                await anyio.sleep(0.1)


async def test_malformed_json_rpc_lines_get_a_parse_error_answer_and_do_not_stop_the_server(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with raw_server(tmp_path, "--spare-kernels", "0") as server:
            await server.send_line(b"this is not json")
            await server.send({"jsonrpc": "2.0", "id": 5, "method": "ping"})
            answers = [await server.receive(), await server.receive()]
            await server.execute("s", "x = 1")
            for line in [
                b"this is not json",
                b'{"jsonrpc": "2.0", "id": 77',
                b"[1, 2",
                b"{}",
                b"\xff\xfe",
                b"null",
                b'{"jsonrpc": "2.0", "id": 78}',
                b'{"jsonrpc": "2.0", "id": 79, "method": 5}',
            ]:
                await server.send_line(line)
            unknown = await server.request("no/such/method")
            after = await server.execute("s", "x + 1")
            assert server.process.returncode is None
    parse_errors = [answer for answer in answers if answer.get("id") is None]
    assert [answer["error"]["code"] for answer in parse_errors] == [-32700]
    assert any(answer.get("id") == 5 and "result" in answer for answer in answers), "still serving"
    assert unknown["error"]["code"] == -32601
    assert after["result"] == "2"


@pytest.fixture(scope="module")
async def flagged_raw_server(tmp_path_factory: pytest.TempPathFactory, envs_dir: Path) -> AsyncIterator[RawServer]:
    """A server process started with ``--envs-dir`` and spoken to in raw lines, shared by the tests
    below that are not about its start or its exit: each takes its turn with ``raw_turn``."""
    async with raw_server(tmp_path_factory.mktemp("flagged"), "--envs-dir", str(envs_dir), "--spare-kernels", "0") as server:
        yield server


@contextlib.asynccontextmanager
async def raw_turn(server: RawServer) -> AsyncIterator[RawServer]:
    """``own_sessions`` for a raw server: no session at the start, the test's shut down after."""
    def names(answer: dict[str, Any]) -> list[str]:
        return [info["name"] for info in answer["result"]["structuredContent"]["sessions"]]

    with anyio.fail_after(QUICK_S):
        assert names(await server.request("tools/call", {"name": "list_sessions", "arguments": {}})) == []
    yield server
    with anyio.fail_after(QUICK_S):
        for name in names(await server.request("tools/call", {"name": "list_sessions", "arguments": {}})):
            shut = await server.request("tools/call", {"name": "shutdown", "arguments": {"session": name}})
            assert not shut["result"].get("isError"), shut


async def test_envs_dir_flag_points_bare_env_names_at_that_folder(flagged_raw_server: RawServer, envs_dir: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with raw_turn(flagged_raw_server) as server:
            out = await server.execute("s", "import sys\nsys.prefix", env="good")
    assert out["result"] == repr(str(envs_dir / "good"))


async def test_cancelled_notification_interrupts_the_cell_and_keeps_state(flagged_raw_server: RawServer, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    with anyio.fail_after(QUICK_S):
        async with raw_turn(flagged_raw_server) as server:
            await server.execute("s", "kept = 5")
            code = f"{touch(marker)}\nimport time\ntime.sleep(30)"
            call = {"name": "execute", "arguments": {"session": "s", "code": code}}
            await server.send({"jsonrpc": "2.0", "id": 900, "method": "tools/call", "params": call})
            await wait_for_file(marker)
            await server.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 900}})
            after = await server.execute("s", "kept")  # waits behind the cell unless it was stopped
    assert after["result"] == "5"


async def test_stdin_eof_makes_the_server_exit_and_take_its_kernels(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with raw_server(tmp_path) as server:
            sessions_kernels = {int((await server.execute(name, "import os\nos.getpid()"))["result"]) for name in ("a", "b")}
            kernels = kernels_below(server.process.pid)
            await server.process.stdin.aclose()
            returncode = await server.exits()
            await wait_until_all_gone(kernels)
    assert returncode == 0
    assert sessions_kernels <= kernels


async def test_sigterm_to_the_server_kills_its_busy_kernel(tmp_path: Path) -> None:
    marker = tmp_path / "running"
    with anyio.fail_after(SLOW_S):
        async with raw_server(tmp_path) as server:
            kernel = int((await server.execute("s", "import os\nos.getpid()"))["result"])
            await server.start_execute("s", f"{touch(marker)}\nimport time\ntime.sleep(60)")
            await wait_for_file(marker)
            kernels = kernels_below(server.process.pid)
            server.process.send_signal(signal.SIGTERM)  # stdin stays open: the signal alone ends the server
            returncode = await server.exits()
            await wait_until_all_gone(kernels)
    assert returncode in (0, -signal.SIGTERM)
    assert kernel in kernels


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
async def test_sigint_or_sighup_makes_the_server_exit_and_take_its_kernels(tmp_path: Path, signum: int) -> None:
    with anyio.fail_after(QUICK_S):
        async with raw_server(tmp_path) as server:
            kernel = int((await server.execute("s", "import os\nos.getpid()"))["result"])
            kernels = kernels_below(server.process.pid)
            server.process.send_signal(signum)
            returncode = await server.exits()
            await wait_until_all_gone(kernels)
    assert returncode in (0, -signum)
    assert kernel in kernels


async def test_sigkill_of_the_server_makes_the_kernel_exit_by_itself(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with raw_server(tmp_path) as server:
            kernel = int((await server.execute("s", "import os\nos.getpid()"))["result"])
            kernels = kernels_below(server.process.pid)
            server.process.kill()
            returncode = await server.exits()
            await wait_until_all_gone(kernels)
    assert returncode == -signal.SIGKILL
    assert kernel in kernels


# --- A person starting the server in a terminal ---------------------------------------------------


def test_server_in_a_terminal_greets_on_stderr_and_keeps_stdout_json_rpc(tmp_path: Path) -> None:
    stderr_file = tmp_path / "stderr.txt"
    # stdin and stdout on the pty (echo off), stderr to a file: what each stream carries stays apart.
    command = f"exec {sys.executable} {SERVER} 2>{stderr_file}"
    child = pexpect.spawn("/bin/sh", ["-c", command], echo=False, timeout=QUICK_S, encoding="utf-8")
    try:
        request = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "tty", "version": "0"}},
        }
        child.sendline(json.dumps(request))
        child.expect(r"\{.*\}\r?\n")
        lines = [line for line in (child.before + child.after).splitlines() if line.strip()]
        child.sendeof()
        child.expect(pexpect.EOF)
        lines += [line for line in child.before.splitlines() if line.strip()]
    finally:
        child.close(force=True)
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in lines), lines
    assert json.loads(lines[0])["result"]["serverInfo"]["name"] == "ipython-mcp"
    greeting = stderr_file.read_text()
    assert "MCP client" in greeting
    assert "claude mcp add" in greeting
