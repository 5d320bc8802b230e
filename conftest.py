"""What the test files share: bounds, the server's path, the anyio backend, an in-memory client
on a fresh server, the server as a real process (SDK stdio client or raw JSON-RPC lines), and
small helpers for calling tools and waiting on processes and marker files.

Import the helpers with ``from conftest import ...``; fixtures are found by pytest.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp import Client
from mcp.client.stdio import StdioServerParameters

import ipython_mcp

# The server as a person starts it; its kernels run this checkout's bootstrap_kernel.py.
SERVER = Path(ipython_mcp.__file__).resolve()
BOOTSTRAP = SERVER.with_name("bootstrap_kernel.py")
# Generous bounds for one test on a noisy 2-core machine (a kernel starts in well under 1 s when
# idle): QUICK_S for a test of a few calls, SLOW_S for one that starts a server process, makes an
# env, or moves megabytes.
QUICK_S = 30
SLOW_S = 60
# How often a test polls for something it waits on (a marker file, a process going away);
# every such wait is bounded by the test's own anyio.fail_after.
POLL_S = 0.02
# The statuses that make an execute call an MCP tool error.
FAILED = frozenset({"error", "timeout", "env_error", "busy"})
# For tests that escalate an interrupt to a kill without testing the grace itself.
SHORT_INTERRUPT_GRACE_S = 0.5

# Matplotlib builds its font cache once per cache folder (seconds of CPU); kernels inherit this
# environment, so one folder kept between runs serves every kernel of every run.
os.environ.setdefault("MPLCONFIGDIR", str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "matplotlib"))
# Likewise bytecode: uv installs packages without .pyc files, so where PYTHONDONTWRITEBYTECODE is
# set (as on the shared machines) every kernel, server, `ipython-mcp attach` and pip this run
# starts would compile matplotlib, the MCP SDK or pip from source again: seconds of CPU each
# time. Every process of the run caches its bytecode instead (no test is about that setting).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
# pytest-xdist gives its workers COLUMNS=80 and LINES=24, which installers (uv) then wrap their
# messages to: the kernels of a test run see the terminal size of the person who started it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module-wide: one event loop per test module, so a module-scoped server can serve its tests


# --- The in-memory server ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connect(tmp_path: Path, **config: Any) -> AsyncIterator[Client]:
    """An in-memory MCP client on a fresh server whose kernels die with it."""
    config.setdefault("envs_dir", tmp_path / "no-envs-here")
    config.setdefault("output_dir", tmp_path / "output")
    config.setdefault("default_timeout_s", 30.0)
    config.setdefault("spare_kernels", 0)  # the spare kernel has tests of its own
    async with Client(ipython_mcp.build_server(ipython_mcp.Config(**config))) as client:
        yield client


@pytest.fixture(scope="module")
async def shared_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """The in-memory server behind ``client``: one per test module (and xdist worker), so its fork
    server (IPython imported, ~0.3 s of CPU) is started once, not once per test."""
    async with connect(tmp_path_factory.mktemp("shared")) as client:
        yield client


@pytest.fixture
async def client(shared_server: Client) -> AsyncIterator[Client]:
    """A client of the module's shared in-memory server, with no session when the test starts.
    A test about the server itself (its start, its exit, its config) uses ``connect`` for a fresh one."""
    async with own_sessions(shared_server) as client:
        yield client


@contextlib.asynccontextmanager
async def own_sessions(client: Client) -> AsyncIterator[Client]:
    """A test's turn on a shared server: it finds no session, and the ones it leaves are shut down."""
    with anyio.fail_after(QUICK_S):
        assert await sessions(client) == {}, "a previous test's session was left behind"
    yield client
    with anyio.fail_after(QUICK_S):
        for name in await sessions(client):
            result = await client.call_tool("shutdown", {"session": name})
            assert not result.is_error, text_of(result)


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def run(client: Client, session: str, code: str, **arguments: Any) -> dict[str, Any]:
    """``execute`` and return its structured result.

    The call must answer with structured content, and be an MCP tool error (``is_error``)
    exactly when its status is a failure: error, timeout, env_error or busy.
    """
    result = await client.call_tool("execute", {"session": session, "code": code, **arguments})
    assert result.structured_content is not None, text_of(result)
    status = result.structured_content["status"]
    assert result.is_error == (status in FAILED), (status, result.is_error)
    assert result.content[0].type == "text", "every result carries a readable text block"
    return result.structured_content


async def assert_usable(client: Client, session: str) -> None:
    """The session answers a plain cell after whatever went wrong before."""
    out = await run(client, session, "1+1")
    assert (out["status"], out["result"]) == ("ok", "2"), out


async def sessions(client: Client) -> dict[str, dict[str, Any]]:
    result = await client.call_tool("list_sessions", {})
    assert not result.is_error, text_of(result)
    assert result.content[0].type == "text"
    return {info["name"]: info for info in result.structured_content["sessions"]}


async def wait_for_file(path: Path) -> None:
    """Wait (bounded by the test's fail_after) for a cell to touch its marker file."""
    while not path.exists():
        await anyio.sleep(POLL_S)


def touch(marker: Path) -> str:
    """A line of cell code that signals, by creating ``marker``, that the cell is running."""
    return f"open({str(marker)!r}, 'w').close()"


# --- The server as a real process ---------------------------------------------------------------------


def stdio_parameters(
    *args: str, command: Sequence[str | Path] = (sys.executable,), cwd: Path | None = None, **env: str
) -> StdioServerParameters:
    """The SDK's stdio client parameters for ``command... ipython_mcp.py *args`` (command: this
    test run's Python, or another interpreter, or a wrapper that execs one).

    ``env`` is added to the SDK's small default environment (HOME, PATH, ...), not to ours.
    """
    first, *rest = map(str, command)
    return StdioServerParameters(command=first, args=[*rest, str(SERVER), *args], env=env, cwd=cwd)


class RawServer:
    """The server as a child process on pipes, spoken to in JSON-RPC lines written by hand."""

    def __init__(self, process: anyio.abc.Process):
        assert process.stdout is not None and process.stdin is not None
        self.process = process
        self.stdout = BufferedByteReceiveStream(process.stdout)
        self.ids = iter(range(1, 1_000_000))

    async def send_line(self, line: bytes) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(line + b"\n")

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_line(json.dumps(message).encode())

    async def receive(self) -> dict[str, Any]:
        return json.loads(await self.stdout.receive_until(b"\n", 64 * 1024 * 1024))

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        request_id = next(self.ids)
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}})
        while True:
            message = await self.receive()
            if message.get("id") == request_id:
                return message

    async def start_execute(self, session: str, code: str, **arguments: Any) -> None:
        """Send an execute call without waiting for its answer."""
        arguments.update(session=session, code=code)
        params = {"name": "execute", "arguments": arguments}
        await self.send({"jsonrpc": "2.0", "id": next(self.ids), "method": "tools/call", "params": params})

    async def execute(self, session: str, code: str, **arguments: Any) -> dict[str, Any]:
        arguments.update(session=session, code=code)
        answer = await self.request("tools/call", {"name": "execute", "arguments": arguments})
        return answer["result"]["structuredContent"]

    async def initialize(self) -> None:
        answer = await self.request(
            "initialize",
            {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw-test", "version": "0"}},
        )
        assert answer["result"]["serverInfo"]["name"] == "ipython-mcp"
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def exits(self) -> int:
        """The server's exit status, once it has exited (bounded: a stopping server takes well under a second)."""
        with anyio.fail_after(10):
            return await self.process.wait()


@contextlib.asynccontextmanager
async def raw_server(tmp_path: Path, *args: str, prefix: tuple[str, ...] = ()) -> AsyncIterator[RawServer]:
    """Start ``prefix... python ipython_mcp.py *args`` on pipes (``--envs-dir tmp_path`` unless given),
    initialize it, and make sure it is gone afterwards. Its stderr goes to ``tmp_path/server-stderr.txt``."""
    if "--envs-dir" not in args:
        args = ("--envs-dir", str(tmp_path), *args)
    command = [*prefix, sys.executable, str(SERVER), *args]
    with open(tmp_path / "server-stderr.txt", "wb") as stderr:  # noqa: ASYNC230 (a local file, opened once)
        process = await anyio.open_process(command, stderr=stderr, env=dict(os.environ))
    try:
        server = RawServer(process)
        await server.initialize()
        yield server
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await process.wait()


# --- Processes: only this test's, never the whole machine's ----------------------------------------------
# Test runs of several checkouts share the machine: a test looks below a process it started (the
# server, or this pytest process for in-memory servers), or at one process group it knows.


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command name: [0] state, [1] parent pid, [2] process group."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


# Code for a cell whose value is its server's pid: the kernel's parent, or, for a kernel forked
# by a fork server (comm "ipymcp-forksrv"), the fork server's parent.
SERVER_PID_CODE = (
    "(lambda p: int(open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1])"
    " if open(f'/proc/{p}/comm').read().strip() == 'ipymcp-forksrv' else p)(__import__('os').getppid())"
)


def parent_of(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return None


def process_running(pid: int) -> bool:
    """True while ``pid`` is a live process; a zombie waiting for its reaper counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = _stat_fields(pid)[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def live_processes(*, below: int | None = None, group: int | None = None, command_has: str | None = None) -> set[int]:
    """Live processes below pid ``below`` and/or in process group ``group`` (one of the two is
    required), whose command line contains ``command_has`` if given."""
    assert below is not None or group is not None, "look below a process or in a group, never at the whole machine"
    parents: dict[int, int] = {}
    groups: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = _stat_fields(entry)
                if fields[0] not in ("Z", "X"):
                    parents[int(entry)], groups[int(entry)] = int(fields[1]), int(fields[2])
    found = set(parents)
    if below is not None:
        children: dict[int, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        under, stack = set(), [below]
        while stack:
            for child in children.get(stack.pop(), []):
                under.add(child)
                stack.append(child)
        found &= under
    if group is not None:
        found = {pid for pid in found if groups[pid] == group}
    if command_has is not None:
        matching = set()
        for pid in found:
            with contextlib.suppress(OSError):
                if command_has.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    matching.add(pid)
        found = matching
    return found


def command_line(pid: int | None) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def is_fork_server(pid: int) -> bool:
    """A fork server's command line has --fork-server and its parent's has not; a kernel it
    forked shares its command line (and /proc/PID/comm says which only once it has started)."""
    return b"--fork-server" in command_line(pid) and b"--fork-server" not in command_line(parent_of(pid))


def kernels_below(pid: int) -> set[int]:
    """Live kernels of this checkout below ``pid`` (a server process, or this test process), spares
    included; not fork servers."""
    return {found for found in live_processes(below=pid, command_has=str(BOOTSTRAP)) if not is_fork_server(found)}


def fork_servers_below(pid: int) -> set[int]:
    return {found for found in live_processes(below=pid, command_has=str(BOOTSTRAP)) if is_fork_server(found)}


async def wait_until_gone(pid: int) -> None:
    """Poll (bounded by the test's fail_after) until ``pid`` is no longer running."""
    while process_running(pid):
        await anyio.sleep(POLL_S)


async def wait_until_all_gone(pids: set[int]) -> None:
    for pid in pids:
        await wait_until_gone(pid)


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A field of /proc/<pid>/status in KiB: VmRSS (now) or VmHWM (peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")
