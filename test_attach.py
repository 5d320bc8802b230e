"""A person steps into the agent's live session: ``ipython-mcp attach`` and ``watch``.

The agent is an SDK client of a real stdio server process; the person is a real terminal
(pexpect) running ``ipython-mcp attach`` / ``watch``, which reach the same server through its
Unix socket in the private runtime folder. A second local user must not get in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pexpect
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

import ipython_mcp

from conftest import SERVER, own_sessions, run, touch, wait_for_file

# A person's terminal (pexpect) waits this long for what it expects: the machine is shared and
# loaded, so bounds are generous and synchronisation exact.
TERMINAL_S = 90
OTHER_USER = "ipymcp-other"
PROMPT = r"In \[\d+\]:"  # its trailing space is drawn as a cursor move


def prompt(count: int) -> str:
    """The prompt for cell ``count``: waiting for it (not the redrawn line just typed) means the last cell ended."""
    return rf"In \[{count}\]:"

pytestmark = pytest.mark.anyio


@pytest.fixture
def runtime() -> Iterator[Path]:
    """An XDG_RUNTIME_DIR others may pass through (0755), so a refusal is the server's doing, not a parent folder's."""
    folder = Path(tempfile.mkdtemp(prefix="ipymcp-run-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def environment(runtime: Path) -> dict[str, str]:
    # No cursor-position requests (pexpect does not answer them), no colours to match around.
    return {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "PROMPT_TOOLKIT_NO_CPR": "1", "NO_COLOR": "1", "TERM": "xterm"}


@contextlib.asynccontextmanager
async def agent(runtime: Path, tmp_path: Path) -> AsyncIterator[tuple[Client, int, Path]]:
    """The agent: an SDK client of a stdio server process; yields it with the server's pid and socket."""
    arguments = [str(SERVER), "--spare-kernels", "0", "--output-dir", str(tmp_path / "out")]
    env = {"XDG_RUNTIME_DIR": str(runtime), "IPYTHON_MCP_ENVS_DIR": str(tmp_path)}
    async with Client(StdioServerParameters(command=sys.executable, args=arguments, env=env)) as client:
        sockets = list((runtime / "ipython-mcp").glob("*.sock"))
        assert len(sockets) == 1, sockets  # made before the server answers the handshake
        yield client, int(sockets[0].stem), sockets[0]


@dataclasses.dataclass
class SharedAgent:
    runtime: Path
    client: Client
    pid: int
    path: Path


@pytest.fixture(scope="module")
async def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SharedAgent]:
    """One agent server for the tests about what a person does in its sessions (not about the
    server's start or exit): each test takes a turn (``turn``) with sessions of its own."""
    folder = Path(tempfile.mkdtemp(prefix="ipymcp-run-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        async with agent(folder, tmp_path_factory.mktemp("agent")) as (client, pid, path):
            yield SharedAgent(folder, client, pid, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def turn(shared: SharedAgent) -> AsyncIterator[tuple[Client, int, Path]]:
    """The shared agent with no session at the start; the sessions the test leaves are shut down."""
    async with own_sessions(shared.client) as client:
        yield client, shared.pid, shared.path


def person(runtime: Path, *arguments: str) -> pexpect.spawn:
    """``ipython-mcp attach|watch ...`` in a terminal of its own."""
    return pexpect.spawn(
        sys.executable, [str(SERVER), *arguments], env=environment(runtime), encoding="utf-8",
        timeout=TERMINAL_S, dimensions=(50, 200),
    )


def type_cell(terminal: pexpect.spawn, code: str) -> None:
    """Type a cell as a person does: each line, then Enter (an empty line ends a block)."""
    for line in code.split("\n"):
        terminal.send(line + "\r")


async def history(client: Client, session: str, last: int = 20) -> list[dict[str, Any]]:
    result = await client.call_tool("history", {"session": session, "last": last})
    return result.structured_content["entries"]


def finish(terminal: pexpect.spawn) -> None:
    if terminal.isalive():
        terminal.sendcontrol("d")
        with contextlib.suppress(pexpect.ExceptionPexpect):
            terminal.expect(pexpect.EOF, timeout=TERMINAL_S)
    terminal.close(force=True)


def stop_watching(terminal: pexpect.spawn) -> None:
    """Ctrl-C ends `watch`: it must exit on it."""
    terminal.sendcontrol("c")
    terminal.expect(pexpect.EOF)
    terminal.close(force=True)


def waiting_cell(release: Path, first: str, last: str) -> str:
    """A cell that prints ``first``, waits for ``release`` to exist, prints ``last`` and shows 42."""
    return (
        "import os, time\n"
        f"print({first!r}, flush=True)\n"
        f"while not os.path.exists({str(release)!r}):\n"
        "    time.sleep(0.05)\n"
        f"print({last!r})\n"
        "6 * 7"
    )


# --- attach -------------------------------------------------------------------------------------


async def test_person_and_agent_share_one_kernel_and_the_record_marks_the_persons_cells(shared_agent: SharedAgent) -> None:
    runtime = shared_agent.runtime
    with anyio.fail_after(TERMINAL_S * 3):
        async with turn(shared_agent) as (client, _, _):
            await run(client, "s", "agent_value = 41")
            terminal = person(runtime, "attach", "s")
            try:
                terminal.expect("Attached to session 's'")
                terminal.expect(prompt(2))
                type_cell(terminal, "print('the person sees', agent_value + 1)")
                terminal.expect("the person sees 42")
                terminal.expect(prompt(3))
                type_cell(terminal, "def double(v):\n    return 2 * v\n")  # multi-line: Enter on the empty line runs it
                terminal.expect(prompt(4))
                type_cell(terminal, "person_value = double(agent_value)")  # a complete line runs on Enter
                terminal.expect(prompt(5))
                type_cell(terminal, "person_value")
                terminal.expect(r"Out\[5\]: 82")
                terminal.expect(prompt(6))
                seen = await run(client, "s", "person_value, double(1)")
            finally:
                finish(terminal)
            entries = await history(client, "s")
    assert seen["status"] == "ok" and seen["result"] == "(82, 2)"
    assert [(entry["by"], entry["status"]) for entry in entries] == [
        ("agent", "ok"), ("person", "ok"), ("person", "ok"), ("person", "ok"), ("person", "ok"), ("agent", "ok"),
    ]
    assert entries[2]["code"] == "def double(v):\n    return 2 * v"
    assert [entry["execution_count"] for entry in entries] == [1, 2, 3, 4, 5, 6]  # one kernel, one count


async def test_attach_shows_the_persons_output_as_it_streams_and_the_rest_when_the_cell_ends(shared_agent: SharedAgent, tmp_path: Path) -> None:
    runtime = shared_agent.runtime
    release = tmp_path / "release"
    waits = f"[time.sleep(0.05) for _ in iter(lambda: os.path.exists({str(release)!r}), True)]"
    with anyio.fail_after(TERMINAL_S * 3):
        async with turn(shared_agent) as (client, _, _):
            await run(client, "s", "import os, time")
            terminal = person(runtime, "attach", "s")
            try:
                terminal.expect(prompt(2))
                type_cell(terminal, f"print('streamed' + ' early', flush=True); {waits}; print('after' + ' release'); 6 * 7")
                terminal.expect("streamed early")  # while the cell still waits for `release`
                release.touch()
                terminal.expect(prompt(3))
                rest = terminal.before
            finally:
                finish(terminal)
    assert "after release" in rest and "Out[2]: 42" in rest
    assert "streamed early" not in rest  # shown once, not again when the cell ended


async def test_ctrl_c_interrupts_the_persons_cell_and_the_session_keeps_its_state(shared_agent: SharedAgent, tmp_path: Path) -> None:
    runtime = shared_agent.runtime
    with anyio.fail_after(TERMINAL_S * 3):
        async with turn(shared_agent) as (client, _, _):
            await run(client, "s", "kept = 'still here'")
            terminal = person(runtime, "attach", "s")
            try:
                terminal.expect(prompt(2))
                started = tmp_path / "started"
                type_cell(terminal, f"{touch(started)}; import time; time.sleep(600)")
                await wait_for_file(started)
                terminal.sendcontrol("c")
                terminal.expect("KeyboardInterrupt: your cell was interrupted")
                terminal.expect(PROMPT)
                type_cell(terminal, "print(kept)")
                terminal.expect("still here")
                terminal.expect(PROMPT)  # the next one
            finally:
                finish(terminal)
            after = await run(client, "s", "kept")
            entries = await history(client, "s")
    assert after["status"] == "ok" and after["result"] == "'still here'"
    # The interrupted cell is in the record too, as the person's and cancelled (its call was).
    assert [(entry["by"], entry["status"], entry["code"].split(";")[-1].strip()) for entry in entries] == [
        ("agent", "ok", "kept = 'still here'"), ("person", "cancelled", "time.sleep(600)"), ("person", "ok", "print(kept)"),
        ("agent", "ok", "kept"),
    ]


async def test_ctrl_d_detaches_and_the_session_lives_on(shared_agent: SharedAgent) -> None:
    runtime = shared_agent.runtime
    with anyio.fail_after(TERMINAL_S * 3):
        async with turn(shared_agent) as (client, _, _):
            await run(client, "s", "n = 1")
            terminal = person(runtime, "attach", "s")
            try:
                terminal.expect(prompt(2))
                type_cell(terminal, "n += 1")
                terminal.expect(prompt(3))
                terminal.sendcontrol("d")
                terminal.expect("Detached from session 's'")
                terminal.expect(pexpect.EOF)
            finally:
                terminal.close(force=True)
            listed = await client.call_tool("list_sessions", {})
            after = await run(client, "s", "n")
    assert terminal.exitstatus == 0
    assert [(s["name"], s["status"]) for s in listed.structured_content["sessions"]] == [("s", "idle")]
    assert after["result"] == "2"


async def test_attach_detaches_when_the_agent_shuts_the_session_down_and_starts_no_new_one(shared_agent: SharedAgent) -> None:
    runtime = shared_agent.runtime
    with anyio.fail_after(TERMINAL_S * 3):
        async with turn(shared_agent) as (client, _, _):
            await run(client, "s", "1")
            terminal = person(runtime, "attach", "s")
            try:
                terminal.expect(prompt(2))
                await client.call_tool("shutdown", {"session": "s"})
                type_cell(terminal, "x = 2")
                terminal.expect("Session 's' is gone")
                terminal.expect(pexpect.EOF)
            finally:
                terminal.close(force=True)
            listed = await client.call_tool("list_sessions", {})
    assert terminal.exitstatus == 1
    assert listed.structured_content["sessions"] == []


async def test_attach_without_a_name_lists_live_sessions_and_their_server(shared_agent: SharedAgent) -> None:
    runtime = shared_agent.runtime
    with anyio.fail_after(TERMINAL_S * 2):
        async with turn(shared_agent) as (client, pid, path):
            await run(client, "analysis", "1")
            listing = await anyio.run_process([sys.executable, str(SERVER), "attach"], env=environment(runtime), check=False)
            unknown = await anyio.run_process([sys.executable, str(SERVER), "attach", "nope"], env=environment(runtime), check=False)
    text = listing.stdout.decode()
    assert listing.returncode == 0
    assert f"server pid {pid} ({path}): 1 session" in text
    assert "  analysis: env default, idle, 1 cells" in text
    assert unknown.returncode == 1
    assert f"No live session named 'nope'. Live sessions: analysis (server {pid})." in unknown.stderr.decode()
    # Once the server has ended, `attach` finds none: test_the_socket_is_0600_in_a_0700_folder_and_is_gone_when_the_server_ends.


# --- watch --------------------------------------------------------------------------------------


async def test_watch_shows_the_agents_next_cell_and_its_output_as_it_streams(shared_agent: SharedAgent, tmp_path: Path) -> None:
    runtime = shared_agent.runtime
    release = tmp_path / "release"
    code = waiting_cell(release, "first line", "second line")
    with anyio.fail_after(TERMINAL_S * 3):
        async with turn(shared_agent) as (client, _, _):
            await run(client, "s", "x = 1")
            terminal = person(runtime, "watch", "s")
            try:
                terminal.expect(r"Watching session 's' of server pid \d+ \(1 cells before now")
                async with anyio.create_task_group() as group:
                    results: list[dict[str, Any]] = []

                    async def agent_cell() -> None:
                        results.append(await run(client, "s", code))

                    group.start_soon(agent_cell)
                    # The cell's code and its first line show while it still runs (it waits for `release`).
                    await anyio.to_thread.run_sync(terminal.expect, r"In \[2\]: import os, time")
                    await anyio.to_thread.run_sync(terminal.expect, "\nfirst line")  # the output, not the code
                    assert not results
                    release.touch()
                await anyio.to_thread.run_sync(terminal.expect, "second line")
                await anyio.to_thread.run_sync(terminal.expect, r"Out\[2\]: 42")
                await run(client, "s", "1 / 0")
                await anyio.to_thread.run_sync(terminal.expect, r"In \[3\]: 1 / 0")
                await anyio.to_thread.run_sync(terminal.expect, "ZeroDivisionError: division by zero")
            finally:
                stop_watching(terminal)
    assert results[0]["result"] == "42"


async def test_a_server_over_http_serves_the_persons_socket_too_without_its_token(runtime: Path, tmp_path: Path) -> None:
    token = "attach-test-token-0123456789"
    arguments = [str(SERVER), "--transport", "http", "--port", "0", "--spare-kernels", "0", "--output-dir", str(tmp_path / "out")]
    server = pexpect.spawn(
        sys.executable, arguments, env={**environment(runtime), "IPYTHON_MCP_TOKEN": token}, encoding="utf-8", timeout=TERMINAL_S
    )
    try:
        with anyio.fail_after(TERMINAL_S * 2):
            await anyio.to_thread.run_sync(server.expect, r"serving MCP over HTTP at (http://\S+)")
            url = server.match.group(1)
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(TERMINAL_S, read=300))
            async with http, Client(streamable_http_client(url, http_client=http)) as client:
                await run(client, "web", "shared = 'set over http'")
                listing = await anyio.run_process([sys.executable, str(SERVER), "attach"], env=environment(runtime), check=False)
                async with ipython_mcp.person_client(runtime / "ipython-mcp" / f"{server.pid}.sock") as person_side:
                    seen = await run(person_side, "web", "shared")
                entries = await history(client, "web")
    finally:
        server.kill(signal.SIGTERM)
        server.expect(pexpect.EOF)
        server.close(force=True)
    assert f"server pid {server.pid} (" in listing.stdout.decode() and "  web: env default, idle, 1 cells" in listing.stdout.decode()
    assert seen["result"] == "'set over http'"
    assert [entry["by"] for entry in entries] == ["agent", "person"]
    assert not (runtime / "ipython-mcp" / f"{server.pid}.sock").exists()


# --- Only the user who runs the server gets in ---------------------------------------------------


def other_user_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as the second local user (the system Python: our venv lives in root's home)."""
    return subprocess.run(
        ["runuser", "-u", OTHER_USER, "--", "/usr/bin/python3", "-c", code, *args],
        capture_output=True, text=True, timeout=TERMINAL_S, check=False,
    )


CONNECT_AND_ASK = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("refused:", type(exc).__name__); sys.exit(3)
try:
    s.sendall(b"POST /mcp HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Type: application/json\\r\\nContent-Length: 2\\r\\n\\r\\n{}")
    answer = s.recv(100)
except OSError:  # hung up before or after the request was sent
    answer = b""
print("answer:", repr(answer[:8]))
"""


@pytest.fixture
def other_user() -> str:
    if os.getuid() != 0 or not shutil.which("runuser") or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root, runuser and /usr/bin/python3 to act as a second user")
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", OTHER_USER], check=True)
    return OTHER_USER


async def test_a_second_user_can_neither_connect_nor_list_and_the_peer_check_hangs_up_on_them(
    shared_agent: SharedAgent, other_user: str
) -> None:
    with anyio.fail_after(TERMINAL_S * 2):
        async with turn(shared_agent) as (client, _, path):
            await run(client, "s", "secret = 1")
            refused = other_user_python(CONNECT_AND_ASK, str(path))
            listed = other_user_python("import os, sys; os.listdir(sys.argv[1])", str(path.parent))
            # Were the modes loosened (by mistake, or by someone), the peer's uid still keeps them out.
            path.parent.chmod(0o711)
            path.chmod(0o666)
            try:
                hung_up = other_user_python(CONNECT_AND_ASK, str(path))
                ours = subprocess.run(
                    ["/usr/bin/python3", "-c", CONNECT_AND_ASK, str(path)], capture_output=True, text=True, timeout=TERMINAL_S, check=False
                )
            finally:
                path.chmod(0o600)
                path.parent.chmod(0o700)
            still = await run(client, "s", "secret")
    assert refused.returncode == 3 and "refused: PermissionError" in refused.stdout
    assert listed.returncode != 0 and "PermissionError" in listed.stderr
    assert hung_up.stdout.strip() == "answer: b''", hung_up  # the server hung up without a word
    assert ours.stdout.strip() == "answer: b'HTTP/1.1'", ours  # the server's own user gets an HTTP answer (an error: `{}` is no MCP request)
    assert still["result"] == "1"


async def test_the_socket_is_0600_in_a_0700_folder_and_is_gone_when_the_server_ends(runtime: Path, tmp_path: Path) -> None:
    with anyio.fail_after(TERMINAL_S):
        async with agent(runtime, tmp_path) as (client, pid, path):
            await run(client, "s", "1")
            folder, sock = path.parent.lstat(), path.lstat()
        after = await anyio.run_process([sys.executable, str(SERVER), "attach"], env=environment(runtime), check=False)
    assert path == runtime / "ipython-mcp" / f"{pid}.sock"
    assert stat.S_ISDIR(folder.st_mode) and stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600 and sock.st_uid == os.getuid()
    assert not path.exists()
    assert "No running ipython-mcp server of yours was found" in after.stdout.decode(), "attach finds no server once it ended"


async def test_a_runtime_folder_others_may_write_gets_no_socket_and_the_agent_is_served_as_before(
    runtime: Path, tmp_path: Path
) -> None:
    unsafe = runtime / "ipython-mcp"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    with anyio.fail_after(TERMINAL_S):
        arguments = [str(SERVER), "--spare-kernels", "0", "--output-dir", str(tmp_path / "out")]
        parameters = StdioServerParameters(command=sys.executable, args=arguments, env={"XDG_RUNTIME_DIR": str(runtime)})
        async with Client(parameters) as client:
            result = await run(client, "s", "2 + 2")
            found = list(unsafe.iterdir())
    assert result["result"] == "4"
    assert found == []


def test_socket_path_and_peer_check_helpers(tmp_path: Path) -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert ipython_mcp.peer_uid(left) == os.getuid()
    assert ipython_mcp.input_is_complete("x = 1")
    assert not ipython_mcp.input_is_complete("def f():")
    assert not ipython_mcp.input_is_complete("def f():\n    return 1")
    assert ipython_mcp.input_is_complete("def f():\n    return 1\n")
    assert ipython_mcp.input_is_complete("%timeit 1")


async def test_watch_follows_a_cell_left_running_to_the_end_that_wait_fetches(shared_agent: SharedAgent, tmp_path: Path) -> None:
    runtime = shared_agent.runtime
    release = tmp_path / "release"
    code = waiting_cell(release, "started", "finished")
    with anyio.fail_after(TERMINAL_S * 3):
        async with turn(shared_agent) as (client, _, _):
            await run(client, "left", "x = 1")
            terminal = person(runtime, "watch", "left")
            seen = terminal.logfile_read = io.StringIO()
            try:
                terminal.expect(r"Watching session 'left' of server pid \d+")
                running = await run(client, "left", code, timeout_s=1, on_timeout="continue")
                await anyio.to_thread.run_sync(terminal.expect, "still running")  # the running reply, as recorded
                release.touch()
                final = await client.call_tool("wait", {"session": "left", "timeout_s": 30})
                await anyio.to_thread.run_sync(terminal.expect, "finished")
                await anyio.to_thread.run_sync(terminal.expect, r"Out\[2\]: 42")
                await run(client, "left", "1 + 1")
                await anyio.to_thread.run_sync(terminal.expect, r"In \[3\]: 1 \+ 1")
            finally:
                stop_watching(terminal)
    assert running["status"] == "running" and final.structured_content["result"] == "42"
    shown = seen.getvalue()
    assert shown.count("In [2]: import os, time") == 1, shown  # one cell, shown once, from start to end
    lines = shown.splitlines()
    assert lines.count("started") == 1 and lines.count("finished") == 1, shown
    assert shown.count("still running") == 1, shown  # the running reply's warning, not again at the end


async def test_watch_started_while_a_cell_is_left_running_shows_it_from_its_start_to_its_end(shared_agent: SharedAgent, tmp_path: Path) -> None:
    runtime = shared_agent.runtime
    release = tmp_path / "release"
    code = waiting_cell(release, "started", "finished")
    with anyio.fail_after(TERMINAL_S * 3):
        async with turn(shared_agent) as (client, _, _):
            running = await run(client, "late", code, timeout_s=1, on_timeout="continue")
            terminal = person(runtime, "watch", "late")
            try:
                terminal.expect(r"Watching session 'late' of server pid \d+ \(1 cells before now")
                terminal.expect(r"In \[1\]: import os, time")
                terminal.expect("\nstarted")
                release.touch()
                final = await client.call_tool("wait", {"session": "late", "timeout_s": 30})
                await anyio.to_thread.run_sync(terminal.expect, "finished")
                await anyio.to_thread.run_sync(terminal.expect, r"Out\[1\]: 42")
            finally:
                stop_watching(terminal)
    assert running["status"] == "running" and final.structured_content["result"] == "42"
