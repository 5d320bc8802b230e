"""Benchmark: ipython-mcp against jupyter_client + ipykernel, in one interleaved run.

Run from the repository root:

    uv run --extra bench --extra test python bench/bench.py            # default, ~10 min on a loaded 2-core VM
    uv run --extra bench --extra test python bench/bench.py --quick    # fewer repetitions

Systems measured (same machine, same Python, same run, alternating order per repetition):

    ours       ipython_mcp.py started by a real MCP stdio client (the SDK's ``Client``);
               every number is an end-to-end ``call_tool`` unless said otherwise.
    ours-direct
               bootstrap_kernel.py driven straight over its pipes (JSON lines), no server:
               what our kernel costs without the MCP layer.
    ours-Kernel
               ipython_mcp.Kernel used in-process (the server's kernel layer, no MCP).
    baseline   jupyter_client.AsyncKernelManager + ipykernel, driven directly with the
               leanest loop that still waits for the whole reply (shell execute_reply and
               iopub idle): no MCP layer, so the comparison is generous to it. Its kernels
               are started from a kernelspec this run writes (the same argv as ipykernel's
               own, plus --HistoryManager.enabled=False, as our kernels have no history),
               and a start is ready at the kernel_info reply plus the first IOPub message
               (jupyter_client's wait_for_ready() without its 0.2 s quiet wait; that one is
               shown in one row of its own).
    floor      the cheapest thing that does the same job at all: ``python -c pass``,
               ``python -c "import IPython"``, a tiny child echoing lines over pipes, ...

Ratios are baseline / ours, so bigger is better for us. Results go to
bench/results/latest.json (raw samples, statistics, machine info, date).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "ipython_mcp.py"
BOOTSTRAP = ROOT / "bootstrap_kernel.py"
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
PY = sys.executable

# Every wait is bounded by one of these.
START_TIMEOUT_S = 60.0  # a kernel (ours or ipykernel) starting, or the MCP server connecting
CALL_TIMEOUT_S = 30.0  # one short cell
OUTPUT_TIMEOUT_S = 120.0  # one output-heavy cell
INTERRUPT_TIMEOUT_S = 15.0  # from interrupt to the reply
BUSY_WAIT_S = 10.0  # until a cell is seen running
SETTLE_S = 0.2  # a running cell is surely inside time.sleep() after this
MEMORY_SETTLE_S = 0.5  # an idle kernel has finished its start-up work after this
CONCURRENT_SETTLE_S = 0.5  # between bursts of 10 starts, so one burst's teardown does not slow the next
SHUTDOWN_TIMEOUT_S = 15.0

WARM_CODE = "1+1"
PRINTS_CODE = "for i in range(100000): print(i)"
PRINTS_CHARS = sum(len(str(i)) + 1 for i in range(100000))  # 588 890: past our default output limit
SMALL_PRINTS_CODE = "for i in range(10000): print(i)"
SMALL_PRINTS_CHARS = sum(len(str(i)) + 1 for i in range(10000))  # 48 890: within it, all inline on both sides
BIG_CODE = "print('x'*10_000_000)"
BIG_CHARS = 10_000_001
SLEEP_CODE = "import time; time.sleep(30)"
CONCURRENT = 10
# Every process this run starts carries this variable (kernels inherit it), so the final
# check finds what we left behind, and only that.
RUN_MARKER = "IPYTHON_MCP_BENCH_RUN"
# The baseline's kernels: ipykernel's own argv, with its SQLite history off like ours.
BASELINE_KERNEL_OPTIONS = ["--HistoryManager.enabled=False"]
BASELINE_SPEC = "bench-default"  # kernelspec names this run writes into its work folder
BASELINE_VENV_SPEC = "bench-venv"
# The SDK's own floor for our warm call: a bare MCPServer whose `execute` tool takes the same
# arguments as ours and answers what ours answers to `1+1` (the same ExecuteResult model as
# structured content, validated by the client against the same output schema, and the same
# text block), doing nothing else. Also a tool returning a plain str. argv[1]: the folder
# holding the ipython_mcp.py under test, for its ExecuteResult model.
SDK_FLOOR_SERVER = """\
import sys
from typing import Annotated, Literal
sys.path.insert(0, sys.argv[1])
from ipython_mcp import ExecuteResult
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent

server = MCPServer("sdk-floor")
count = 0

@server.tool()
def execute(
    session: str, code: str, env: str | None = None, timeout_s: float | None = None,
    on_timeout: Literal["interrupt", "continue"] = "interrupt",
) -> Annotated[CallToolResult, ExecuteResult]:
    global count
    count += 1
    result = ExecuteResult(
        status="ok", session=session, stdout="", stderr="", result="2", error=None,
        execution_count=count, warning=None, duration_s=0.0005,
    )
    text = f"status: ok · In [{count}] · {result.duration_s:.3g} s · session {session!r}\\n--- result ---\\n2"
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=result.model_dump(mode="json"))

@server.tool()
def noop(session: str, code: str) -> str:
    return "2"

server.run()
"""


@dataclasses.dataclass
class Reps:
    cold: int = 9
    warm: int = 200
    warm_block: int = 20
    warmup: int = 10
    output: int = 5
    interrupt: int = 7
    concurrent: int = 5
    echo: int = 1000
    reset: int = 9
    env: int = 9
    tree: int = 3
    ssh: int = 9  # new sessions over ssh (and local ones beside them); warm over ssh: warm and warm_block


QUICK = Reps(cold=3, warm=40, warm_block=10, warmup=5, output=1, interrupt=2, concurrent=1, echo=200, reset=2, env=2, tree=1, ssh=2)


# --- statistics ---------------------------------------------------------------------


def summarize(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    p95 = ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p95": p95,
        "min": ordered[0],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
        "samples": samples,
    }


def rotate(items: list[Any], k: int) -> list[Any]:
    k %= len(items)
    return items[k:] + items[:k]


class Results:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.notes: dict[str, Any] = {}
        self.errors: list[str] = []
        self.incomplete: list[str] = []  # replies missing some of their output
        self.baseline_failures: list[str] = []  # the baseline failing where it should not (not our error)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def stat(self, key: str, field: str = "median") -> float | None:
        values = self.samples.get(key)
        if not values:
            return None
        return summarize(values)[field]


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def memory_of(pid: int) -> tuple[float, float]:
    """(RSS, USS) in bytes."""
    info = psutil.Process(pid).memory_full_info()
    return float(info.rss), float(info.uss)


def pss_of(pid: int) -> float:
    """PSS in bytes (Linux; 0 elsewhere): shared pages split between the processes mapping them."""
    return float(getattr(psutil.Process(pid).memory_full_info(), "pss", 0.0))


# What ps shows for a fork server (bootstrap_kernel.py --fork-server). Its kernels are its
# children and keep its command line; only this name tells the fork server apart.
FORK_SERVER_NAME = "ipymcp-forksrv"


def kind_of(process: psutil.Process) -> str:
    """What one process under our server is: 'fork_server', 'kernel' (forked or spawned) or 'other'
    (the orphan guard, say)."""
    if process.name() == FORK_SERVER_NAME:
        return "fork_server"
    if any(arg.endswith(BOOTSTRAP.name) for arg in process.cmdline()[1:4]):
        return "kernel"
    return "other"


def server_of(pid: int) -> int:
    """Our MCP server holding this kernel: the kernel's ancestor that is this process's child.

    A spawned kernel is the server's child; a forked one is its fork server's, a grandchild."""
    process = psutil.Process(pid)
    while process.ppid() != os.getpid():
        parent = process.parent()
        if parent is None or parent.pid <= 1:
            raise RuntimeError(f"process {pid} is not under a server this run started")
        process = parent
    return process.pid


def tree_memory(root_pid: int) -> dict[str, Any]:
    """Memory of a process and all its descendants, summed over the processes (bytes).

    USS (pages only that process maps) adds up to what the tree alone holds, short of the
    pages its processes share with each other (a forked kernel's pages still shared with its
    fork server are in no USS); RSS counts shared pages (libraries, pages a forked child still
    shares) once per process; PSS splits each shared page between the processes mapping it
    (Linux only), so summed over a tree it is what the tree holds, shared pages included.
    Also split by kind: the root, fork servers, kernels, others (the orphan guard).
    """
    root = psutil.Process(root_pid)
    processes = [root, *root.children(recursive=True)]
    total: dict[str, Any] = {"rss": 0.0, "uss": 0.0, "pss": 0.0, "processes": 0, "names": [], "by_kind": {}}
    for process in processes:
        try:
            info = process.memory_full_info()
            name = " ".join(process.cmdline()[1:3])[-60:]
            kind = "root" if process.pid == root_pid else kind_of(process)
        except psutil.Error:  # gone meanwhile: not part of the tree any more
            continue
        part = total["by_kind"].setdefault(kind, {"rss": 0.0, "uss": 0.0, "pss": 0.0, "processes": 0})
        for field in ("rss", "uss", "pss"):
            value = float(getattr(info, field, 0.0))
            total[field] += value
            part[field] += value
        part["processes"] += 1
        total["processes"] += 1
        total["names"].append(f"{kind}: {name}")
    return total


def tree_cpu(root_pid: int) -> float:
    """CPU seconds used so far by a process and its live descendants."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(root_pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += cpu_of(process.pid)
    return total


IDLE_WINDOW_S = 0.5  # a tree is idle when it used less than IDLE_CPU_S of CPU in this long
IDLE_CPU_S = 0.01


async def tree_idle(root_pid: int) -> bool:
    """Whether a process tree stays (almost) idle for IDLE_WINDOW_S: nothing in it is starting."""
    before = tree_cpu(root_pid)
    await asyncio.sleep(IDLE_WINDOW_S)
    return tree_cpu(root_pid) - before < IDLE_CPU_S


@contextlib.asynccontextmanager
async def fresh_server(parameters: Any) -> Any:
    """A new MCP server of ours behind a stdio Client; yields (Ours, the server's pid)."""
    from mcp import Client

    me = psutil.Process()
    before = {child.pid for child in me.children()}
    async with Client(parameters, read_timeout_seconds=START_TIMEOUT_S) as client:
        new = []
        for child in me.children():
            with contextlib.suppress(psutil.Error):
                if child.pid not in before and str(SERVER) in child.cmdline():
                    new.append(child.pid)
        if len(new) != 1:
            raise RuntimeError(f"cannot tell the new server's process among {new}")
        yield Ours(client, new[0]), new[0]


# --- ours: the MCP server through a real MCP client -------------------------------------


class Ours:
    """ipython_mcp.py behind the MCP SDK's stdio Client."""

    def __init__(self, client: Any, pid: int | None = None):
        self.client = client
        self.pid = pid  # the server's process, when known: its tree tells when it is idle
        self.spare_seen = False
        self.spare_missing = False

    async def call(self, tool: str, arguments: dict[str, Any], timeout: float) -> Any:
        result = await asyncio.wait_for(self.client.call_tool(tool, arguments, read_timeout_seconds=timeout), timeout + 5)
        if result.is_error and result.structured_content is None:  # a failed cell is is_error too, with its reply
            text = " ".join(getattr(block, "text", "") for block in result.content)
            raise RuntimeError(f"tool {tool} failed: {text[:500]}")
        return result

    async def execute(self, session: str, code: str, timeout: float = CALL_TIMEOUT_S, env: str | None = None) -> dict[str, Any]:
        arguments: dict[str, Any] = {"session": session, "code": code, "timeout_s": timeout}
        if env is not None:
            arguments["env"] = env
        result = await self.call("execute", arguments, timeout + 10)
        return result.structured_content

    async def ok(self, session: str, code: str, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        reply = await self.execute(session, code, timeout)
        if reply.get("status") != "ok":
            raise RuntimeError(f"ours: {code!r} in {session!r} gave {reply.get('status')}: {str(reply.get('error'))[:500]}")
        return reply

    async def sessions(self) -> dict[str, dict[str, Any]]:
        result = await self.call("list_sessions", {}, CALL_TIMEOUT_S)
        return {info["name"]: info for info in result.structured_content["sessions"]}

    async def spares_ready(self) -> int | None:
        """Spare kernels the server has started ahead of need (None: the server has no such thing)."""
        result = await self.call("list_sessions", {}, CALL_TIMEOUT_S)
        return result.structured_content.get("spare_kernels")

    async def wait_for_spare(self) -> bool:
        """Until a spare kernel is ready, when the server keeps them, or (server pid known) until
        nothing under the server is starting any more (a server keeping no spare, whose fork
        server has finished importing); bounded. True if a spare kernel is ready.

        Without the pid, a server that never showed a spare (spares off, or the machine short
        of memory) is not waited for again."""
        if self.spare_missing:
            return False
        deadline = time.monotonic() + START_TIMEOUT_S / 4
        while (count := await self.spares_ready()) is not None and count < 1:
            if self.pid is not None and await tree_idle(self.pid):
                if (await self.spares_ready() or 0) < 1:
                    return False
                continue
            if time.monotonic() > deadline:
                self.spare_missing = self.pid is None and not self.spare_seen
                return False
            await asyncio.sleep(0.02)
        self.spare_seen = self.spare_seen or count is not None
        return count is not None

    async def shutdown(self, session: str) -> None:
        await self.call("shutdown", {"session": session}, SHUTDOWN_TIMEOUT_S)

    async def drop(self, session: str) -> None:
        """Shutdown for a finally block: a session that was never created is no error of its own
        (the failure that prevented it is what gets reported; leaks are caught at the end)."""
        try:
            await self.shutdown(session)
        except Exception as exc:  # noqa: BLE001
            if "No session named" not in str(exc):
                print(f"[bench] shutdown of {session!r} failed: {exc}", file=sys.stderr)


@contextlib.asynccontextmanager
async def http_server(work: Path) -> Any:
    """The same server over streamable HTTP (``--transport http``), and an SDK client of it.

    Yields None when the server under test has no HTTP transport (an older version)."""
    if not server_has_option("--transport"):
        yield None
        return
    import re

    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    token = "bench-token-" + os.urandom(8).hex()
    runtime = work / "http-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    stderr_path = work / "http-server.log"
    environ = dict(os.environ, IPYTHON_MCP_TOKEN=token, XDG_RUNTIME_DIR=str(runtime))
    with open(stderr_path, "wb") as stderr:  # noqa: ASYNC230
        process = await asyncio.create_subprocess_exec(
            PY, str(SERVER), "--transport", "http", "--port", "0", "--output-dir", str(work / "http-output"),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr, env=environ,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        url = None
        while url is None:
            found = re.search(r"serving MCP over HTTP at (http://\S+)", stderr_path.read_text(errors="replace"))
            if found:
                url = found.group(1)
            elif process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start: {stderr_path.read_text(errors='replace')[-500:]}")
            else:
                await asyncio.sleep(0.02)
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=300))
        async with http, Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            yield Ours(client)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), SHUTDOWN_TIMEOUT_S)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()


# --- ours without the server: bootstrap_kernel.py over its pipes -------------------------


def kernel_environment() -> dict[str, str]:
    environ = dict(os.environ)
    environ["PYTHONUNBUFFERED"] = "1"
    environ["PYTHONIOENCODING"] = "utf-8"
    return environ


class DirectKernel:
    """bootstrap_kernel.py driven over its JSON-lines pipes, as the server does, minus the server."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.process: asyncio.subprocess.Process | None = None
        self.ids = 0

    async def start(self) -> dict[str, Any]:
        with open(self.log_dir / f"direct-{time.monotonic_ns()}.log", "wb") as log:  # noqa: ASYNC230
            self.process = await asyncio.create_subprocess_exec(
                PY, "-u", str(BOOTSTRAP),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                start_new_session=True, env=kernel_environment(), limit=256 * 1024 * 1024,
            )
        hello = await asyncio.wait_for(self._next_message(), START_TIMEOUT_S)
        if hello.get("kind") != "hello" or hello.get("error"):
            raise RuntimeError(f"direct kernel: bad hello {hello}")
        return hello

    async def _next_message(self) -> dict[str, Any]:
        assert self.process and self.process.stdout
        while True:
            line = await self.process.stdout.readline()
            if not line:
                raise RuntimeError("direct kernel: protocol pipe closed")
            if line.strip():  # the kernel writes a newline before its hello (start-up output stays apart)
                return json.loads(line)

    async def send(self, message: dict[str, Any]) -> None:
        assert self.process and self.process.stdin
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        await self.process.stdin.drain()

    async def execute(self, code: str, timeout: float = CALL_TIMEOUT_S) -> tuple[dict[str, Any], int]:
        """Send a cell; return (done message, characters of stream output)."""
        self.ids += 1
        request_id = self.ids
        await self.send({"kind": "execute", "id": request_id, "code": code, "max_result_chars": 100_000})

        async def collect() -> tuple[dict[str, Any], int]:
            chars = 0
            while True:
                message = await self._next_message()
                if message.get("kind") == "stream":
                    chars += len(message.get("text", ""))
                elif message.get("kind") == "done" and message.get("id") == request_id:
                    return message, chars

        return await asyncio.wait_for(collect(), timeout)

    async def close(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.process.wait(), SHUTDOWN_TIMEOUT_S)
        self.process = None


# --- the baseline: jupyter_client + ipykernel, no MCP ------------------------------------


def write_kernelspec(kernels_dir: Path, name: str, python: str) -> list[str]:
    """A kernelspec like ipykernel's own (`python -m ipykernel_launcher -f {connection_file}`),
    for `python`, with the baseline's options; returns its argv."""
    argv = [python, "-m", "ipykernel_launcher", "-f", "{connection_file}", *BASELINE_KERNEL_OPTIONS]
    folder = kernels_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))
    return argv


async def lean_ready(manager: Any, client: Any, timeout: float = START_TIMEOUT_S) -> None:
    """jupyter_client's wait_for_ready() without its last step (reading IOPub until it has
    been quiet for 0.2 s): a kernel_info reply on shell, then one IOPub message, which shows
    the IOPub subscription is connected. Like wait_for_ready, it asks again every second
    until the kernel answers, and again when IOPub stays silent for 0.2 s.

    Unlike it, it first drops what is already queued and takes only a reply to one of its
    own requests: after a restart, on the same client, a late reply to an earlier
    kernel_info must not pass for the new kernel's.
    """
    from queue import Empty

    for get in (client.get_shell_msg, client.get_iopub_msg):
        with contextlib.suppress(Empty):
            while True:
                await get(timeout=0)
    deadline = time.monotonic() + timeout
    sent: set[str] = set()
    while True:
        sent.add(client.kernel_info())
        ask_again = time.monotonic() + 1
        while (left := ask_again - time.monotonic()) > 0:
            try:
                reply = await client.get_shell_msg(timeout=left)
            except Empty:
                break
            if reply["msg_type"] == "kernel_info_reply" and reply["parent_header"].get("msg_id") in sent:
                try:
                    await client.get_iopub_msg(timeout=0.2)
                except Empty:
                    break  # IOPub not connected yet: ask again
                return
        if not await manager.is_alive():
            raise RuntimeError("kernel died before replying to kernel_info")
        if time.monotonic() > deadline:
            raise TimeoutError(f"kernel did not answer kernel_info within {timeout:g} s")


class Jupyter:
    """AsyncKernelManager + ipykernel; every kernel started is tracked and shut down."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.kernels_dir = log_dir / "kernels"
        self.live: dict[Any, Any] = {}  # manager -> client
        self.logs: dict[Any, Any] = {}  # manager -> its kernel's log file (a restart writes there too)
        self.argv: dict[str, list[str]] = {}  # kernelspec name -> argv
        self.argv[BASELINE_SPEC] = write_kernelspec(self.kernels_dir, BASELINE_SPEC, PY)
        self._specs: Any = None

    def add_env(self, name: str, python: Path) -> None:
        self.argv[name] = write_kernelspec(self.kernels_dir, name, str(python))

    async def start(self, spec: str = BASELINE_SPEC, lean: bool = True) -> tuple[Any, Any]:
        """A started kernel, ready (lean: see lean_ready; else jupyter_client's wait_for_ready)."""
        from jupyter_client import AsyncKernelManager
        from jupyter_client.kernelspec import KernelSpecManager

        if self._specs is None:
            self._specs = KernelSpecManager(kernel_dirs=[str(self.kernels_dir)])
        manager = AsyncKernelManager(kernel_name=spec, kernel_spec_manager=self._specs)
        self.live[manager] = None
        log_path = self.log_dir / f"ipykernel-{time.monotonic_ns()}.log"
        log = self.logs[manager] = open(log_path, "wb")  # noqa: ASYNC230, SIM115 (closed by stop)
        try:
            await asyncio.wait_for(manager.start_kernel(stdout=log, stderr=log), START_TIMEOUT_S)
            client = manager.client()
            self.live[manager] = client
            client.start_channels()
            if lean:
                await asyncio.wait_for(lean_ready(manager, client), START_TIMEOUT_S + 5)
            else:
                await asyncio.wait_for(client.wait_for_ready(timeout=START_TIMEOUT_S), START_TIMEOUT_S + 5)
        except Exception as exc:
            try:
                alive = manager.has_kernel and psutil.pid_exists(self.pid(manager))
            except Exception:  # noqa: BLE001
                alive = False
            tail = log_path.read_text(errors="replace")[-800:].strip() if log_path.exists() else ""
            raise RuntimeError(
                f"ipykernel did not start: {type(exc).__name__}: {exc} (kernel process {'alive' if alive else 'gone'}; "
                f"its log ends: {tail!r})"
            ) from exc
        return manager, client

    @staticmethod
    async def restart(manager: Any, client: Any) -> None:
        """What a reset is with jupyter_client: kill the kernel, start it again, until ready."""
        await asyncio.wait_for(manager.restart_kernel(now=True), START_TIMEOUT_S)
        await asyncio.wait_for(lean_ready(manager, client), START_TIMEOUT_S + 5)

    @staticmethod
    def pid(manager: Any) -> int:
        return manager.provisioner.pid

    @staticmethod
    async def execute(client: Any, code: str, timeout: float = CALL_TIMEOUT_S, msg_id: str | None = None) -> tuple[dict[str, Any], int]:
        """Send a cell (unless msg_id names one already sent); wait for iopub idle and the shell reply.

        Returns (execute_reply content, characters of stream output).
        """
        if msg_id is None:
            msg_id = client.execute(code, store_history=True)
        deadline = time.monotonic() + timeout
        chars = 0
        while True:
            message = await client.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.001))
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind = message["msg_type"]
            if kind == "stream":
                chars += len(message["content"]["text"])
            elif kind == "status" and message["content"]["execution_state"] == "idle":
                break
        while True:
            reply = await client.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.001))
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"], chars

    async def ok(self, client: Any, code: str, timeout: float = CALL_TIMEOUT_S) -> int:
        content, chars = await self.execute(client, code, timeout)
        if content.get("status") != "ok":
            raise RuntimeError(f"baseline: {code!r} gave {content.get('status')}: {content.get('ename')} {content.get('evalue')}")
        return chars

    async def stop(self, manager: Any) -> None:
        client = self.live.pop(manager, None)
        try:
            if client is not None:
                client.stop_channels()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(manager.shutdown_kernel(now=True), SHUTDOWN_TIMEOUT_S)
            with contextlib.suppress(Exception):
                if manager.has_kernel:
                    os.killpg(self.pid(manager), signal.SIGKILL)
            log = self.logs.pop(manager, None)
            if log is not None:
                log.close()

    async def close_all(self) -> None:
        for manager in list(self.live):
            await self.stop(manager)


# --- floors -------------------------------------------------------------------------------


ECHO_CHILD = "import sys\nfor line in sys.stdin.buffer:\n    sys.stdout.buffer.write(line); sys.stdout.buffer.flush()\n"
OUTPUT_CHILD = (
    # Python's default for a pipe, block buffering: the least it costs to get the text out at all
    # (a kernel that forwards output while the cell runs does more: it cannot wait for 8 KB).
    "import sys, time\n"
    "sys.stdout = open(sys.stdout.fileno(), 'w', closefd=False)\n"  # block-buffered even under PYTHONUNBUFFERED
    "t = time.perf_counter()\nexec(sys.argv[1])\nsys.stdout.flush()\n"
    "sys.stderr.write(repr(time.perf_counter() - t))\n"
)
SLEEP_CHILD = (
    # A shell starts background jobs with SIGINT ignored, and children inherit that: undo it.
    "import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\nprint('ready', flush=True)\n"
    "try:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    print('interrupted', flush=True)\n"
)
IDLE_CHILD = "import sys\n{imports}\nprint('ready', flush=True)\nsys.stdin.read()\n"


async def read_until_ready(stream: asyncio.StreamReader) -> bool:
    """Skip what a child prints before its 'ready' line (IPython's Out[1]: 2, say)."""
    while line := await stream.readline():
        if line.strip() == b"ready":
            return True
    return False


async def spawn_until_ready(code: str, python: str = PY, launch: tuple[str, ...] = ()) -> float:
    """Seconds from spawning `python -c code` until it says it is ready (its exit is not timed).

    The end of a cell is what a session start is compared with, so the floor stops at
    the same point: when the child has done its work and said so, before interpreter
    teardown (about 10 ms after importing IPython). With `launch` (ssh and its host), the
    command runs through it, quoted for the far side's shell.
    """
    argv = [python, "-c", f"{code}\nprint('ready', flush=True)"]
    if launch:
        argv = [*launch, shlex.join(argv)]
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout
        ready = await asyncio.wait_for(read_until_ready(process.stdout), START_TIMEOUT_S)
        elapsed = time.perf_counter() - started
        if not ready:
            raise RuntimeError(f"python -c {code!r} failed (exit code {await process.wait()})")
        await asyncio.wait_for(process.wait(), SHUTDOWN_TIMEOUT_S)
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return elapsed


class Child:
    """A tiny Python child on pipes, killed on exit."""

    def __init__(self, code: str, *args: str):
        self.code, self.args = code, args
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> asyncio.subprocess.Process:
        self.process = await asyncio.create_subprocess_exec(
            PY, "-c", self.code, *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=256 * 1024 * 1024,
        )
        return self.process

    async def __aexit__(self, *exc: object) -> None:
        assert self.process
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.process.wait(), SHUTDOWN_TIMEOUT_S)


async def output_floor(code: str) -> float:
    """Seconds a plain Python process takes to write `code`'s output into a pipe we drain."""
    async with Child(OUTPUT_CHILD, code) as process:
        assert process.stdout and process.stderr

        async def drain() -> int:
            total = 0
            while chunk := await process.stdout.read(1 << 20):
                total += len(chunk)
            return total

        _, err = await asyncio.wait_for(asyncio.gather(drain(), process.stderr.read()), OUTPUT_TIMEOUT_S)
        await asyncio.wait_for(process.wait(), SHUTDOWN_TIMEOUT_S)
        return float(err.decode())


# The baseline's side of the whole-tree memory rows: a process that imported jupyter_client
# (nothing else) and holds N kernels, each started from the baseline's kernelspec, ready and
# having run 1+1, with its channels open: what an MCP-less host of N ipykernels costs.
# stdin: a number per line, "start that many more kernels"; answered by a line "ready N".
# End of stdin: shut every kernel down and exit. argv: kernelspec folder, kernelspec name.
BASELINE_HOST = """\
import asyncio, subprocess, sys, time
from queue import Empty
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager

async def ready(manager, client):
    deadline = time.monotonic() + 60
    while True:  # as the benchmark's lean_ready
        client.kernel_info()
        try:
            reply = await client.get_shell_msg(timeout=1)
        except Empty:
            pass
        else:
            if reply["msg_type"] == "kernel_info_reply":
                try:
                    await client.get_iopub_msg(timeout=0.2)
                    return
                except Empty:
                    pass
        if not await manager.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("kernel did not start")

async def one_plus_one(client):
    msg_id = client.execute("1+1")
    while True:
        message = await client.get_iopub_msg(timeout=30)
        if message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == "status" \\
                and message["content"]["execution_state"] == "idle":
            break
    while (await client.get_shell_msg(timeout=30))["parent_header"].get("msg_id") != msg_id:
        pass

async def main():
    specs = KernelSpecManager(kernel_dirs=[sys.argv[1]])
    kernels = []
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        while line := await stdin.readline():
            for _ in range(int(line)):
                manager = AsyncKernelManager(kernel_name=sys.argv[2], kernel_spec_manager=specs)
                kernels.append((manager, None))
                await manager.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                client = manager.client()
                kernels[-1] = (manager, client)
                client.start_channels()
                await ready(manager, client)
                await one_plus_one(client)
            print("ready", len(kernels), flush=True)
    finally:
        for manager, client in kernels:
            if client is not None:
                client.stop_channels()
            await manager.shutdown_kernel(now=True)

asyncio.run(main())
"""


def make_venv(folder: Path) -> Path:
    """A fresh venv with this run's IPython and ipykernel versions (ipykernel for the baseline;
    ours needs only IPython), by `uv venv` + `uv pip install` (from uv's cache when it can),
    else `python -m venv` + pip. Bytecode compiled, as an installer that does so leaves it."""
    packages = [f"{name}=={importlib.metadata.version(name)}" for name in ("ipython", "ipykernel")]
    python = folder / "bin" / "python"

    def run(*argv: str | Path) -> bool:
        out = subprocess.run([str(a) for a in argv], check=False, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            print(f"[bench] {' '.join(map(str, argv))} failed: {out.stderr.strip()[-500:]}", file=sys.stderr)
        return out.returncode == 0

    uv = shutil.which("uv")
    if uv is not None:
        if not run(uv, "venv", "--quiet", "--python", PY, folder):
            raise RuntimeError("uv venv failed")
        install = [uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", python, *packages]
        if not (run(*install, "--offline") or run(*install)):
            raise RuntimeError(f"could not install {' '.join(packages)} into the venv")
    else:
        if not (run(PY, "-m", "venv", folder) and run(python, "-m", "pip", "install", "--quiet", *packages)):
            raise RuntimeError(f"python -m venv + pip install {' '.join(packages)} failed")
    return python


async def interrupt_floor() -> float:
    """SIGINT to a Python child in time.sleep(30) until its line comes back."""
    async with Child(SLEEP_CHILD) as process:
        assert process.stdout
        line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        assert line.strip() == b"ready", line
        await asyncio.sleep(SETTLE_S)
        started = time.perf_counter()
        process.send_signal(signal.SIGINT)
        line = await asyncio.wait_for(process.stdout.readline(), INTERRUPT_TIMEOUT_S)
        elapsed = time.perf_counter() - started
        assert line.strip() == b"interrupted", line
        return elapsed


async def idle_memory_floor(imports: str) -> tuple[float, float]:
    async with Child(IDLE_CHILD.format(imports=imports)) as process:
        assert process.stdout
        if not await asyncio.wait_for(read_until_ready(process.stdout), START_TIMEOUT_S):
            raise RuntimeError(f"memory floor child ({imports!r}) failed")
        await asyncio.sleep(MEMORY_SETTLE_S)
        return memory_of(process.pid)


# --- machine info -----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (3.10)
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpus_logical": psutil.cpu_count(logical=True),
        "cpus_physical": psutil.cpu_count(logical=False),
        "memory_total_bytes": psutil.virtual_memory().total,
        "load_average_at_start": list(os.getloadavg()),
        "python": sys.version.split()[0],
        "python_executable": PY,
        "packages": {name: version(name) for name in ("mcp", "ipython", "ipykernel", "jupyter_client", "pyzmq", "psutil", "tornado")},
        "git_commit": git("rev-parse", "HEAD"),
        # The files measured, as they were (the work tree may differ from the commit).
        "sources_sha256": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for path in (SERVER, BOOTSTRAP)},
        "git_dirty": bool(git("status", "--porcelain", "--", "ipython_mcp.py", "bootstrap_kernel.py")),
        "source_dir": str(SERVER.parent),
    }


# --- a real sshd on 127.0.0.1, for the sessions-over-ssh rows (as test_remote.py's fixture) ---------


SSH_HOST = "benchhost"  # the ssh_config's name for this machine's sshd
SSH_ENV = "localssh"  # the configured env whose launcher is ssh to SSH_HOST


def ssh_missing() -> str | None:
    """Why this run cannot start an sshd on 127.0.0.1 and reach it (None: it can)."""
    missing = [tool for tool in ("ssh", "ssh-keygen") if shutil.which(tool) is None]
    if not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")):
        missing.append("sshd")
    if missing:
        return f"needs OpenSSH, server and client (Debian: apt install openssh-server); missing: {', '.join(missing)}"
    if os.geteuid() != 0:
        return "sshd needs root here (privilege separation, /run/sshd)"
    return None


class LocalSshd:
    """sshd on 127.0.0.1 with a throwaway host key and user key, and an ssh_config whose
    SSH_HOST reaches it as this user without a prompt. Far-side processes are its descendants."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(mode=0o700, exist_ok=True)
        self.config = folder / "ssh_config"
        self.ssh = ("ssh", "-F", str(self.config))
        self.process: asyncio.subprocess.Process | None = None

    def keygen(self, name: str) -> Path:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.folder / name)], check=True)
        return self.folder / name

    async def start(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        host_key, user_key = self.keygen("host_key"), self.keygen("user_key")
        shutil.copy(f"{user_key}.pub", self.folder / "authorized_keys")
        (self.folder / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {self.folder}/authorized_keys\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
            f"UsePAM no\nStrictModes no\nPidFile {self.folder}/sshd.pid\nLogLevel ERROR\nMaxStartups 100\nMaxSessions 100\n"
        )
        self.config.write_text(
            f"Host {SSH_HOST}\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {user_key}\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n  IdentitiesOnly yes\n"
        )
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation folder sshd insists on
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        with open(self.folder / "sshd.log", "wb") as log:  # noqa: ASYNC230
            self.process = await asyncio.create_subprocess_exec(
                sshd, "-D", "-e", "-f", str(self.folder / "sshd_config"), stdin=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # until `ssh SSH_HOST true` works
            if self.process.returncode is not None:
                raise RuntimeError(f"sshd exited: {(self.folder / 'sshd.log').read_text(errors='replace')[-500:]}")
            probe_ssh = await asyncio.create_subprocess_exec(
                *self.ssh, SSH_HOST, "true", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            _, said = await probe_ssh.communicate()
            if probe_ssh.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"ssh {SSH_HOST} did not work: {said.decode(errors='replace')[-500:]}")
            await asyncio.sleep(0.05)

    def far_side(self) -> list[psutil.Process]:
        """Processes under sshd: its connections and what they run (the far-side kernels)."""
        if self.process is None or self.process.returncode is not None:
            return []
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.process.pid).children(recursive=True)
        return []

    async def stop(self) -> list[str]:
        """Stop sshd; first wait (bounded) for its far-side processes to end. Returns those
        that did not (now killed): the run's leak check cannot see them once sshd is gone."""
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while self.far_side() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        left = [describe(process) for process in self.far_side()]
        for process in self.far_side():
            with contextlib.suppress(psutil.Error):
                process.kill()
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        return left


# --- the benchmark ------------------------------------------------------------------------------


class Bench:
    def __init__(self, reps: Reps, work: Path):
        self.reps = reps
        self.work = work
        self.r = Results()
        self.jupyter = Jupyter(work)
        self.ours: Ours | None = None
        self.ours_no_spare: Ours | None = None  # a second server with spare kernels off, when it has them
        self.ours_no_fork: Ours | None = None  # a third: spare kernels and fork servers off (every kernel spawned)
        self.parameters_no_fork: Any = None  # as shipped but --no-fork-server (the spare kernel kept)
        self.server_pid: int | None = None
        self.direct: list[DirectKernel] = []
        self.counter = 0
        self.parameters: Any = None  # how our server is started (as shipped), for fresh servers
        self.venv: Path | None = None  # the non-default env this run made

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    @contextlib.contextmanager
    def unrecorded(self) -> Any:
        """Warm-up: whatever is measured inside is thrown away."""
        saved = self.r.samples
        self.r.samples = {}
        try:
            yield
        finally:
            self.r.samples = saved

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    async def section(self, title: str, coroutine: Any) -> None:
        self.log(f"[bench] {title} ...")
        started = time.perf_counter()
        try:
            await coroutine
        except Exception as exc:  # noqa: BLE001 (reported; the other sections still run)
            self.r.errors.append(f"{title}: {type(exc).__name__}: {exc}")
            self.log(f"[bench] {title} FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        self.log(f"[bench] {title} done in {time.perf_counter() - started:.1f} s")

    async def new_direct(self) -> DirectKernel:
        kernel = DirectKernel(self.work)
        self.direct.append(kernel)
        await kernel.start()
        return kernel

    async def close_direct(self, kernel: DirectKernel) -> None:
        await kernel.close()
        if kernel in self.direct:
            self.direct.remove(kernel)

    # -- cold start (plus idle memory of each fresh kernel)

    async def cold(self) -> None:
        assert self.ours
        r = self.r

        async def floor_pass() -> None:
            r.add("cold.floor_python", await spawn_until_ready("pass"))

        async def floor_ipython() -> None:
            r.add("cold.floor_import_ipython", await spawn_until_ready("import IPython"))

        async def floor_shell() -> None:
            r.add("cold.floor_shell", await spawn_until_ready("from IPython.core.interactiveshell import InteractiveShell as S; S.instance().run_cell('1+1')"))

        async def ours() -> None:
            """A spare kernel (--spare-kernels 1) is ready, as when sessions start seconds apart."""
            assert self.ours
            has_spare = await self.ours.wait_for_spare()
            name = self.name("cold")
            started = time.perf_counter()
            reply = await self.ours.ok(name, WARM_CODE)
            r.add("cold.ours", time.perf_counter() - started)
            assert reply.get("result") == "2", reply
            try:
                await asyncio.sleep(MEMORY_SETTLE_S)
                pid = (await self.ours.sessions())[name]["pid"]
                r.add("cold.ours_kernel_cpu", cpu_of(pid))
                rss, uss = memory_of(pid)
                r.add("memory.ours_rss", rss)
                r.add("memory.ours_uss", uss)
                r.add("memory.ours_pss", pss_of(pid))
                # A forked kernel is its fork server's child: the server is the ancestor we started.
                self.server_pid = server_of(pid)
                rss, uss = memory_of(self.server_pid)
                r.add("memory.server_rss", rss)
                r.add("memory.server_uss", uss)
                under = psutil.Process(self.server_pid).children(recursive=True)
                fork_servers = [p for p in under if kind_of(p) == "fork_server"]
                r.notes["fork_servers"] = len(fork_servers)
                if fork_servers:
                    rss = uss = pss = 0.0
                    for process in fork_servers:
                        info = process.memory_full_info()
                        rss, uss, pss = rss + info.rss, uss + info.uss, pss + getattr(info, "pss", 0.0)
                    r.add("memory.fork_server_rss", rss)
                    r.add("memory.fork_server_uss", uss)
                    r.add("memory.fork_server_pss", pss)
                if has_spare and await self.ours.wait_for_spare():
                    # Kernels under the server (its children, or its fork servers') that belong to
                    # no session: the spares, idle.
                    session_pids = {info["pid"] for info in (await self.ours.sessions()).values()}
                    under = psutil.Process(self.server_pid).children(recursive=True)
                    spares = [p for p in under if kind_of(p) == "kernel" and p.pid not in session_pids]
                    rss = uss = pss = 0.0
                    for spare in spares:
                        info = spare.memory_full_info()
                        rss, uss, pss = rss + info.rss, uss + info.uss, pss + getattr(info, "pss", 0.0)
                    r.add("memory.spares_rss", rss)
                    r.add("memory.spares_uss", uss)
                    r.add("memory.spares_pss", pss)
                    r.notes["spare_kernels"] = len(spares)
            finally:
                await self.ours.drop(name)

        async def ours_no_spare() -> None:
            """The kernel start itself: a server that keeps no spare kernel."""
            assert self.ours_no_spare
            name = self.name("cold")
            started = time.perf_counter()
            try:
                reply = await self.ours_no_spare.ok(name, WARM_CODE)
                r.add("cold.ours_no_spare", time.perf_counter() - started)
                assert reply.get("result") == "2", reply
            finally:
                await self.ours_no_spare.drop(name)

        async def ours_no_fork() -> None:
            """The same kernel start with fork servers off (--no-fork-server): a fresh interpreter."""
            assert self.ours_no_fork
            name = self.name("cold")
            started = time.perf_counter()
            try:
                reply = await self.ours_no_fork.ok(name, WARM_CODE)
                r.add("cold.ours_no_fork", time.perf_counter() - started)
                assert reply.get("result") == "2", reply
                await asyncio.sleep(MEMORY_SETTLE_S)
                pid = (await self.ours_no_fork.sessions())[name]["pid"]
                r.add("cold.ours_no_fork_kernel_cpu", cpu_of(pid))
                rss, uss = memory_of(pid)
                r.add("memory.ours_no_fork_rss", rss)
                r.add("memory.ours_no_fork_uss", uss)
                r.add("memory.ours_no_fork_pss", pss_of(pid))
            finally:
                await self.ours_no_fork.drop(name)

        async def direct() -> None:
            kernel = DirectKernel(self.work)
            self.direct.append(kernel)
            try:
                started = time.perf_counter()
                await kernel.start()
                r.add("cold.ours_direct_hello", time.perf_counter() - started)
                done, _ = await kernel.execute(WARM_CODE)
                r.add("cold.ours_direct", time.perf_counter() - started)
                assert done.get("status") == "ok", done
            finally:
                await self.close_direct(kernel)

        async def baseline_wait_for_ready() -> None:
            """The baseline as jupyter_client's own wait_for_ready() starts it (quiet IOPub for 0.2 s)."""
            started = time.perf_counter()
            manager, client = await self.jupyter.start(lean=False)
            try:
                await self.jupyter.ok(client, WARM_CODE)
                r.add("cold.baseline_wait_for_ready", time.perf_counter() - started)
            finally:
                await self.jupyter.stop(manager)

        async def baseline() -> None:
            started = time.perf_counter()
            manager, client = await self.jupyter.start()
            try:
                await self.jupyter.ok(client, WARM_CODE)
                r.add("cold.baseline", time.perf_counter() - started)
                await asyncio.sleep(MEMORY_SETTLE_S)
                r.add("cold.baseline_kernel_cpu", cpu_of(self.jupyter.pid(manager)))
                rss, uss = memory_of(self.jupyter.pid(manager))
                r.add("memory.baseline_rss", rss)
                r.add("memory.baseline_uss", uss)
                r.add("memory.baseline_pss", pss_of(self.jupyter.pid(manager)))
            finally:
                await self.jupyter.stop(manager)

        steps = [floor_pass, floor_ipython, floor_shell, ours, direct, baseline, baseline_wait_for_ready]
        if self.ours_no_spare is not None:
            steps.insert(4, ours_no_spare)
        if self.ours_no_fork is not None:
            steps.insert(5, ours_no_fork)
        with self.unrecorded():  # first starts write .pyc files and fill the page cache
            for step in steps:
                await step()
        for rep in range(self.reps.cold):
            for step in rotate(steps, rep):
                await step()

    # -- warm round trip and the MCP layer

    async def warm(self) -> None:
        assert self.ours
        r = self.r
        import_error = None
        sys.path.insert(0, str(SERVER.parent))
        try:
            import ipython_mcp
        except Exception as exc:  # noqa: BLE001 (the server module changed shape: skip that one row)
            ipython_mcp = None
            import_error = f"{type(exc).__name__}: {exc}"
        finally:
            sys.path.remove(str(SERVER.parent))

        session = self.name("warm")
        await self.ours.ok(session, WARM_CODE)
        direct = await self.new_direct()
        manager, client = await self.jupyter.start()
        kernel_obj = None
        kernel_jobs = contextlib.AsyncExitStack()  # the task group a server lifespan gives its kernels
        spill_dir = self.work / "spill"
        spill_dir.mkdir(exist_ok=True)
        counter = iter(range(1 << 30))

        def spill(stream: str, create: bool = True, **_: Any) -> Path:
            return spill_dir / f"{next(counter)}-{stream}.txt"

        spill_files = None
        if ipython_mcp is not None and hasattr(ipython_mcp, "SpillTarget"):  # the server's own spill target, as a session has
            spill_files = ipython_mcp.OutputFiles(spill_dir, 50 * 2**20, 2**30)
            spill = ipython_mcp.SpillTarget(spill_files, "bench")  # type: ignore[assignment]

        try:
            if ipython_mcp is not None:
                jobs = await kernel_jobs.enter_async_context(ipython_mcp.Jobs.open())
                kernel_obj = ipython_mcp.Kernel(Path(PY), "default", jobs)
                await asyncio.wait_for(kernel_obj.start(), START_TIMEOUT_S)
            else:
                r.notes["warm.ours_kernel_class_error"] = import_error

            async def ours_mcp() -> None:
                started = time.perf_counter()
                reply = await self.ours.execute(session, WARM_CODE)
                r.add("warm.ours", time.perf_counter() - started)
                assert reply.get("result") == "2", reply

            async def ours_http() -> None:
                started = time.perf_counter()
                reply = await over_http.execute(session, WARM_CODE)
                r.add("warm.ours_http", time.perf_counter() - started)
                assert reply.get("result") == "2", reply

            async def mcp_floor() -> None:
                started = time.perf_counter()
                await self.ours.call("list_sessions", {}, CALL_TIMEOUT_S)
                r.add("warm.ours_list_sessions", time.perf_counter() - started)

            async def ours_direct() -> None:
                started = time.perf_counter()
                done, _ = await direct.execute(WARM_CODE)
                r.add("warm.ours_direct", time.perf_counter() - started)
                assert done.get("result") == "2", done

            async def ours_kernel_class() -> None:
                started = time.perf_counter()
                execution = await kernel_obj.start_execution(WARM_CODE, 100_000, spill)
                try:
                    reply = await asyncio.wait_for(execution.reply.wait(), CALL_TIMEOUT_S)
                finally:
                    kernel_obj.finish_execution(execution)
                r.add("warm.ours_kernel_class", time.perf_counter() - started)
                assert reply.get("result") == "2", reply

            async def baseline() -> None:
                started = time.perf_counter()
                await self.jupyter.ok(client, WARM_CODE)
                r.add("warm.baseline", time.perf_counter() - started)

            from mcp import Client
            from mcp.client.stdio import StdioServerParameters

            floor_parameters = StdioServerParameters(
                command=PY, args=["-c", SDK_FLOOR_SERVER, str(SERVER.parent)], env={RUN_MARKER: os.environ[RUN_MARKER]}
            )
            async with Child(ECHO_CHILD) as echo, Client(floor_parameters, read_timeout_seconds=START_TIMEOUT_S) as noop, \
                    http_server(self.work) as over_http:
                assert echo.stdin and echo.stdout

                async def sdk_floor() -> None:
                    """The SDK's floor for our call: same arguments, same ExecuteResult reply, no work."""
                    started = time.perf_counter()
                    result = await asyncio.wait_for(noop.call_tool("execute", {"session": session, "code": WARM_CODE, "timeout_s": CALL_TIMEOUT_S}), CALL_TIMEOUT_S)
                    r.add("warm.floor_sdk", time.perf_counter() - started)
                    assert not result.is_error and result.structured_content["result"] == "2", result

                async def noop_mcp() -> None:
                    started = time.perf_counter()
                    result = await asyncio.wait_for(noop.call_tool("noop", {"session": session, "code": WARM_CODE}), CALL_TIMEOUT_S)
                    r.add("warm.floor_mcp_noop", time.perf_counter() - started)
                    assert not result.is_error, result

                async def floor_echo() -> None:
                    started = time.perf_counter()
                    echo.stdin.write(b"1+1\n")
                    await echo.stdin.drain()
                    line = await asyncio.wait_for(echo.stdout.readline(), CALL_TIMEOUT_S)
                    r.add("warm.floor_echo", time.perf_counter() - started)
                    assert line == b"1+1\n", line

                steps = [ours_mcp, mcp_floor, sdk_floor, noop_mcp, ours_direct, baseline, floor_echo]
                if over_http is not None:  # its own session: the HTTP server is another process
                    await over_http.ok(session, WARM_CODE)
                    steps.insert(1, ours_http)
                if kernel_obj is not None:
                    try:  # the server's internal API may have moved on: then skip this one row
                        with self.unrecorded():
                            await ours_kernel_class()
                        steps.insert(3, ours_kernel_class)
                    except Exception as exc:  # noqa: BLE001
                        r.notes["warm.ours_kernel_class_error"] = f"{type(exc).__name__}: {exc}"
                        self.log(f"[bench] ipython_mcp.Kernel row skipped: {type(exc).__name__}: {exc}")
                with self.unrecorded():
                    for _ in range(self.reps.warmup):
                        for step in steps:
                            await step()
                blocks = max(self.reps.warm // self.reps.warm_block, 1)
                for block in range(blocks):
                    for step in rotate(steps, block):
                        for _ in range(self.reps.warm_block):
                            await step()
                # The echo floor gets more samples, cheaply.
                for _ in range(max(self.reps.echo - blocks * self.reps.warm_block, 0)):
                    await floor_echo()
        finally:
            if kernel_obj is not None:
                with contextlib.suppress(Exception):
                    await kernel_obj.kill("shutdown")
            await kernel_jobs.aclose()
            if spill_files is not None:
                spill_files.remove_all()
            await self.close_direct(direct)
            await self.jupyter.stop(manager)
            await self.ours.drop(session)

    # -- sessions over ssh to this machine (a real sshd on 127.0.0.1), beside local ones

    async def over_ssh(self) -> None:
        assert self.ours and self.parameters
        from mcp import Client

        r = self.r
        missing = ssh_missing()
        if missing:
            r.notes["ssh_skipped"] = missing
            self.log(f"[bench] ssh rows skipped: {missing}")
            return
        sshd = LocalSshd(self.work / "sshd")
        config = self.work / "ssh-envs.toml"
        launch = (*sshd.ssh, SSH_HOST)
        # The far side's Python is this run's own, so IPython is there.
        config.write_text(
            f"ssh_command = {json.dumps(list(sshd.ssh))}\n\n[envs.{SSH_ENV}]\nlaunch = {json.dumps(list(launch))}\npython = {json.dumps(PY)}\n"
        )
        r.notes["ssh_env"] = {"launch": [*launch], "python": PY, "baseline": "none: jupyter_client has no ssh launcher to compare with"}
        parameters = self.parameters.model_copy(update={"args": [*self.parameters.args, "--config", str(config)]})
        local = self.ours_no_spare or self.ours  # an ssh env has no spare kernel: compare with a local start without one
        r.notes["ssh_local_cold_server"] = "no spare kernel" if self.ours_no_spare is not None else "as shipped"
        try:
            await sshd.start()
            async with Client(parameters, read_timeout_seconds=START_TIMEOUT_S) as client:
                remote = Ours(client)

                async def ssh_cold() -> None:
                    name = self.name("ssh")
                    started = time.perf_counter()
                    try:
                        reply = await remote.execute(name, WARM_CODE, timeout=START_TIMEOUT_S, env=SSH_ENV)
                        r.add("ssh.cold", time.perf_counter() - started)
                        if reply.get("status") != "ok" or reply.get("result") != "2":
                            raise RuntimeError(f"ours over ssh gave {reply.get('status')}: {str(reply.get('error'))[:500]}")
                    finally:
                        await remote.drop(name)

                async def local_cold() -> None:
                    name = self.name("cold")
                    started = time.perf_counter()
                    try:
                        reply = await local.ok(name, WARM_CODE)
                        r.add("ssh.local_cold", time.perf_counter() - started)
                        assert reply.get("result") == "2", reply
                    finally:
                        await local.drop(name)

                async def floor_connect() -> None:
                    started = time.perf_counter()
                    done = await asyncio.create_subprocess_exec(*launch, "true", stdin=subprocess.DEVNULL)
                    await asyncio.wait_for(done.wait(), START_TIMEOUT_S)
                    r.add("ssh.floor_connect", time.perf_counter() - started)
                    if done.returncode != 0:
                        raise RuntimeError(f"ssh {SSH_HOST} true exited {done.returncode}")

                async def floor_ipython() -> None:
                    r.add("ssh.floor_import_ipython", await spawn_until_ready("import IPython", PY, launch))

                steps = [ssh_cold, local_cold, floor_ipython, floor_connect]
                with self.unrecorded():
                    for step in steps:
                        await step()
                for rep in range(self.reps.ssh):
                    for step in rotate(steps, rep):
                        await step()

                # Warm: one live session over ssh, one local (the server as shipped), and a line
                # echoed by a Python at the far side of the same ssh: the floor.
                ssh_session, local_session = self.name("sshwarm"), self.name("warm")
                echo = await asyncio.create_subprocess_exec(
                    *launch, shlex.join([PY, "-u", "-c", ECHO_CHILD]),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=subprocess.DEVNULL,
                )
                try:
                    reply = await remote.execute(ssh_session, WARM_CODE, timeout=START_TIMEOUT_S, env=SSH_ENV)
                    if reply.get("status") != "ok":
                        raise RuntimeError(f"ours over ssh gave {reply.get('status')}: {str(reply.get('error'))[:500]}")
                    await self.ours.ok(local_session, WARM_CODE)
                    assert echo.stdin and echo.stdout

                    async def ssh_warm() -> None:
                        started = time.perf_counter()
                        reply = await remote.execute(ssh_session, WARM_CODE)
                        r.add("ssh.warm", time.perf_counter() - started)
                        assert reply.get("result") == "2", reply

                    async def local_warm() -> None:
                        assert self.ours
                        started = time.perf_counter()
                        reply = await self.ours.execute(local_session, WARM_CODE)
                        r.add("ssh.local_warm", time.perf_counter() - started)
                        assert reply.get("result") == "2", reply

                    async def floor_echo() -> None:
                        started = time.perf_counter()
                        echo.stdin.write(b"1+1\n")
                        await echo.stdin.drain()
                        line = await asyncio.wait_for(echo.stdout.readline(), START_TIMEOUT_S)
                        r.add("ssh.floor_echo", time.perf_counter() - started)
                        assert line == b"1+1\n", line

                    steps = [ssh_warm, local_warm, floor_echo]
                    with self.unrecorded():
                        for _ in range(self.reps.warmup):
                            for step in steps:
                                await step()
                    for block in range(max(self.reps.warm // self.reps.warm_block, 1)):
                        for step in rotate(steps, block):
                            for _ in range(self.reps.warm_block):
                                await step()
                finally:
                    if echo.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            echo.kill()
                        await echo.wait()
                    await remote.drop(ssh_session)
                    await self.ours.drop(local_session)
        finally:
            left = await sshd.stop()
            if left:
                r.errors.append("far-side processes left under sshd (now killed): " + "; ".join(left))

    # -- output throughput

    async def output(self) -> None:
        assert self.ours
        session = self.name("out")
        await self.ours.ok(session, WARM_CODE)
        direct = await self.new_direct()
        manager, client = await self.jupyter.start()
        try:
            for label, code, chars in (
                ("small_prints", SMALL_PRINTS_CODE, SMALL_PRINTS_CHARS),
                ("prints", PRINTS_CODE, PRINTS_CHARS),
                ("big", BIG_CODE, BIG_CHARS),
            ):
                await self.output_case(label, code, chars, session, direct, client)
        finally:
            await self.close_direct(direct)
            await self.jupyter.stop(manager)
            await self.ours.drop(session)

    async def output_case(self, label: str, code: str, chars: int, session: str, direct: DirectKernel, client: Any) -> None:
        assert self.ours
        r = self.r

        def check(system: str, got: int) -> None:
            """Count replies that came back without all the output (timed all the same)."""
            key = f"output.{label}.{system}_incomplete"
            r.notes.setdefault(key, 0)
            if got != chars:
                r.notes[key] += 1
                r.incomplete.append(f"{system}: {code!r} returned {got} of {chars} characters")

        async def ours() -> None:
            assert self.ours
            started = time.perf_counter()
            reply = await self.ours.ok(session, code, OUTPUT_TIMEOUT_S)
            r.add(f"output.{label}.ours", time.perf_counter() - started)
            full = (reply.get("output_files") or {}).get("stdout")
            check("ours", Path(full).stat().st_size if full else len(reply.get("stdout") or ""))
            r.notes[f"output.{label}.ours_reply_stdout_chars"] = len(reply.get("stdout") or "")

        async def ours_direct() -> None:
            started = time.perf_counter()
            done, got = await direct.execute(code, OUTPUT_TIMEOUT_S)
            r.add(f"output.{label}.ours_direct", time.perf_counter() - started)
            if done.get("status") != "ok":
                raise RuntimeError(f"direct: {code!r} gave {done.get('status')}: {done.get('error')}")
            check("ours_direct", got)

        async def baseline() -> None:
            started = time.perf_counter()
            got = await self.jupyter.ok(client, code, OUTPUT_TIMEOUT_S)
            r.add(f"output.{label}.baseline", time.perf_counter() - started)
            check("baseline", got)

        async def floor() -> None:
            r.add(f"output.{label}.floor", await output_floor(code))

        steps = [ours, ours_direct, baseline, floor]
        for rep in range(self.reps.output):
            for step in rotate(steps, rep):
                await step()

    # -- interrupt latency: the first interrupt of a fresh session, then a second one

    async def interrupt(self) -> None:
        assert self.ours
        r = self.r

        async def ours_once(session: str, key: str) -> None:
            task = asyncio.create_task(self.ours.execute(session, SLEEP_CODE, timeout=60))
            try:
                deadline = time.monotonic() + BUSY_WAIT_S
                while (await self.ours.sessions())[session]["status"] != "busy":
                    if time.monotonic() > deadline or task.done():
                        raise RuntimeError("ours: the sleeping cell never showed as busy")
                    await asyncio.sleep(0.01)
                await asyncio.sleep(SETTLE_S)
                started = time.perf_counter()
                await self.ours.call("interrupt", {"session": session}, INTERRUPT_TIMEOUT_S)
                r.add(f"{key}_tool_call", time.perf_counter() - started)
                reply = await asyncio.wait_for(asyncio.shield(task), INTERRUPT_TIMEOUT_S)
                r.add(key, time.perf_counter() - started)
                if reply.get("status") != "error" or "KeyboardInterrupt" not in str(reply.get("error")):
                    raise RuntimeError(f"ours: interrupt gave {reply.get('status')}: {str(reply.get('error'))[:300]}")
            finally:
                if not task.done():
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task

        async def ours() -> None:
            session = self.name("intr")
            try:
                await self.ours.ok(session, WARM_CODE)
                await ours_once(session, "interrupt.ours")
                await ours_once(session, "interrupt.ours_repeat")
            finally:
                await self.ours.drop(session)

        async def baseline_once(manager: Any, client: Any, key: str) -> None:
            msg_id = client.execute(SLEEP_CODE)
            deadline = time.monotonic() + BUSY_WAIT_S
            while True:
                message = await client.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.001))
                if message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == "execute_input":
                    break
            await asyncio.sleep(SETTLE_S)
            started = time.perf_counter()
            await asyncio.wait_for(manager.interrupt_kernel(), INTERRUPT_TIMEOUT_S)
            while True:
                reply = await client.get_shell_msg(timeout=max(started + INTERRUPT_TIMEOUT_S - time.monotonic(), 0.001))
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            r.add(key, time.perf_counter() - started)
            if reply["content"].get("ename") != "KeyboardInterrupt":
                raise RuntimeError(f"baseline: interrupt gave {reply['content'].get('status')} {reply['content'].get('ename')}")
            # Let iopub reach idle before the next cell (not timed).
            while True:
                message = await client.get_iopub_msg(timeout=CALL_TIMEOUT_S)
                if message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == "status" \
                        and message["content"]["execution_state"] == "idle":
                    break

        async def baseline() -> None:
            manager, client = await self.jupyter.start()
            try:
                await self.jupyter.ok(client, WARM_CODE)
                await baseline_once(manager, client, "interrupt.baseline")
                await baseline_once(manager, client, "interrupt.baseline_repeat")
            finally:
                await self.jupyter.stop(manager)

        async def floor() -> None:
            r.add("interrupt.floor", await interrupt_floor())

        steps = [ours, baseline, floor]
        for rep in range(self.reps.interrupt):
            for step in rotate(steps, rep):
                await step()

    # -- idle memory floors (the kernels' own numbers come from the cold section)

    async def memory_floors(self) -> None:
        for key, imports in (
            ("python", ""),
            ("import_ipython", "import IPython"),
            ("shell", "from IPython.core.interactiveshell import InteractiveShell as S; S.instance().run_cell('1+1')"),
        ):
            rss, uss = await idle_memory_floor(imports)
            self.r.add(f"memory.floor_{key}_rss", rss)
            self.r.add(f"memory.floor_{key}_uss", uss)

    # -- 10 sessions at once

    async def concurrent(self) -> None:
        assert self.ours
        r = self.r

        async def burst(server: Ours, key: str) -> None:
            names = [self.name("conc") for _ in range(CONCURRENT)]
            started = time.perf_counter()
            try:
                replies = await asyncio.gather(*(server.execute(name, WARM_CODE, timeout=START_TIMEOUT_S) for name in names))
                r.add(key, time.perf_counter() - started)
                bad = [reply for reply in replies if reply.get("status") != "ok"]
                if bad:
                    raise RuntimeError(f"ours: {len(bad)} of {CONCURRENT} sessions failed: {str(bad[0].get('error'))[:300]}")
            finally:
                live = await server.sessions()
                await asyncio.gather(*(server.shutdown(name) for name in names if name in live), return_exceptions=True)

        async def ours() -> None:
            """No spare kernel (as shipped with fork servers): the fork server forks all ten."""
            server = self.ours_no_spare or self.ours
            assert server
            await server.wait_for_spare()  # nothing of the last burst still ending
            await burst(server, "concurrent.ours")

        async def ours_no_fork() -> None:
            """No spare kernel, no fork server: ten interpreters spawned."""
            assert self.ours_no_fork
            await burst(self.ours_no_fork, "concurrent.ours_no_fork")

        async def baseline() -> None:
            async def one() -> Any:
                manager, client = await self.jupyter.start()
                await self.jupyter.ok(client, WARM_CODE)
                return manager

            started = time.perf_counter()
            try:
                outcomes = await asyncio.gather(*(one() for _ in range(CONCURRENT)), return_exceptions=True)
                elapsed = time.perf_counter() - started
                failures = [o for o in outcomes if isinstance(o, BaseException)]
                if not failures:
                    r.add("concurrent.baseline", elapsed)
                else:  # the baseline's own failure: noted, left out of its numbers, and the next burst goes on
                    r.baseline_failures.append(
                        f"{len(failures)} of {CONCURRENT} ipykernels started at once failed (burst took {elapsed:.1f} s): {failures[0]}"
                    )
            finally:
                await self.jupyter.close_all()

        async def floor() -> None:
            # The children stay up until all are ready, as sessions do: no teardown in the way.
            async with contextlib.AsyncExitStack() as stack:
                started = time.perf_counter()
                children = [await stack.enter_async_context(Child(IDLE_CHILD.format(imports="import IPython"))) for _ in range(CONCURRENT)]
                readies = await asyncio.wait_for(
                    asyncio.gather(*(read_until_ready(child.stdout) for child in children if child.stdout)), START_TIMEOUT_S
                )
                r.add("concurrent.floor_import_ipython", time.perf_counter() - started)
                if not all(readies) or len(readies) != CONCURRENT:
                    raise RuntimeError("a floor child failed to import IPython")

        steps = [ours, baseline, floor]
        if self.ours_no_fork is not None:
            steps.insert(1, ours_no_fork)
        for rep in range(self.reps.concurrent):
            for step in rotate(steps, rep):
                await asyncio.sleep(CONCURRENT_SETTLE_S)  # the previous step's processes are gone
                await step()

    async def make_venv(self) -> None:
        started = time.perf_counter()
        folder = self.work / "venv"
        await asyncio.to_thread(make_venv, folder)
        self.venv = folder
        self.r.notes["venv_setup_s"] = time.perf_counter() - started

    # -- reset: kill the kernel, start a fresh one, until the next 1+1 answers

    async def reset(self) -> None:
        assert self.ours
        r = self.r
        shipped = self.name("reset")
        no_spare = self.name("reset")
        await self.ours.ok(shipped, WARM_CODE)
        no_fork = self.name("reset")
        if self.ours_no_spare is not None:
            await self.ours_no_spare.ok(no_spare, WARM_CODE)
        if self.ours_no_fork is not None:
            await self.ours_no_fork.ok(no_fork, WARM_CODE)
        manager, client = await self.jupyter.start()
        try:
            await self.jupyter.ok(client, WARM_CODE)

            async def ours_reset(server: Ours, session: str, key: str) -> None:
                started = time.perf_counter()
                await server.call("reset", {"session": session}, START_TIMEOUT_S)
                reply = await server.ok(session, WARM_CODE)
                r.add(key, time.perf_counter() - started)
                assert reply.get("result") == "2", reply

            async def ours() -> None:
                """--spare-kernels 1: a reset in the default env takes the spare kernel when one is ready."""
                assert self.ours
                await self.ours.wait_for_spare()  # and no spare refill still running from before
                await ours_reset(self.ours, shipped, "reset.ours")

            async def ours_without_spare() -> None:
                assert self.ours_no_spare
                await ours_reset(self.ours_no_spare, no_spare, "reset.ours_no_spare")

            async def ours_without_fork() -> None:
                assert self.ours_no_fork
                await ours_reset(self.ours_no_fork, no_fork, "reset.ours_no_fork")

            async def baseline() -> None:
                started = time.perf_counter()
                await self.jupyter.restart(manager, client)
                await self.jupyter.ok(client, WARM_CODE)
                r.add("reset.baseline", time.perf_counter() - started)

            steps = [ours, baseline]
            if self.ours_no_spare is not None:
                steps.insert(1, ours_without_spare)
            if self.ours_no_fork is not None:
                steps.insert(1, ours_without_fork)
            with self.unrecorded():
                for step in steps:
                    await step()
            for rep in range(self.reps.reset):
                for step in rotate(steps, rep):
                    await step()
            await self.ours.wait_for_spare()
        finally:
            await self.jupyter.stop(manager)
            await self.ours.drop(shipped)
            if self.ours_no_spare is not None:
                await self.ours_no_spare.drop(no_spare)
            if self.ours_no_fork is not None:
                await self.ours_no_fork.drop(no_fork)

    # -- a new session in a non-default env (a venv this run made): no spare kernel applies

    async def other_env(self) -> None:
        assert self.ours
        r = self.r
        if self.venv is None:
            raise RuntimeError("no venv: making it failed (see above)")
        venv_python = self.venv / "bin" / "python"
        self.jupyter.add_env(BASELINE_VENV_SPEC, venv_python)

        async def one(server: Ours, key: str) -> None:
            name = self.name("venv")
            started = time.perf_counter()
            try:
                reply = await server.execute(name, WARM_CODE, env=str(self.venv))
                r.add(key, time.perf_counter() - started)
                if reply.get("status") != "ok" or reply.get("result") != "2":
                    raise RuntimeError(f"ours in the venv gave {reply.get('status')}: {str(reply.get('error'))[:500]}")
                python = (await server.sessions())[name]["python"]
                if Path(python) != venv_python:
                    raise RuntimeError(f"ours ran the venv session in {python}, not {venv_python}")
            finally:
                await server.drop(name)

        async def ours() -> None:
            """A fresh server as shipped (its start not timed): its first session in the venv, which
            starts the venv's fork server (when it has them), then a second one, forked by it."""
            async with fresh_server(self.parameters) as (server, _):
                await server.wait_for_spare()  # the default env's fork server and spare: not running alongside
                await one(server, "env.ours_first")
                await one(server, "env.ours_second")

        async def ours_no_fork() -> None:
            """The no-spare server with fork servers off: every venv kernel spawned."""
            assert self.ours_no_fork
            await one(self.ours_no_fork, "env.ours_no_fork")

        async def baseline() -> None:
            started = time.perf_counter()
            manager, client = await self.jupyter.start(BASELINE_VENV_SPEC)
            try:
                await self.jupyter.ok(client, WARM_CODE)
                r.add("env.baseline", time.perf_counter() - started)
                argv0 = psutil.Process(self.jupyter.pid(manager)).cmdline()[0]
                if argv0 != str(venv_python):
                    raise RuntimeError(f"the baseline's venv kernel runs {argv0}, not {venv_python}")
            finally:
                await self.jupyter.stop(manager)

        async def floor() -> None:
            r.add("env.floor_import_ipython", await spawn_until_ready("import IPython", str(venv_python)))

        steps = [ours, baseline, floor]
        if self.ours_no_fork is not None:
            steps.insert(1, ours_no_fork)
        with self.unrecorded():  # the venv's first starts fill the page cache
            for step in steps:
                await step()
        for rep in range(self.reps.env):
            for step in rotate(steps, rep):
                await step()

    # -- whole process tree with 1 and then 10 idle sessions, each side in a fresh process

    async def tree(self) -> None:
        r = self.r
        sizes = (1, CONCURRENT)

        def record(side: str, size: int, memory: dict[str, Any]) -> None:
            for field in ("rss", "uss", "pss"):
                r.add(f"tree{size}.{side}_{field}", memory[field])
            for kind, part in memory["by_kind"].items():
                for field in ("rss", "uss", "pss"):
                    r.add(f"tree{size}.{side}_{kind}_{field}", part[field])
            r.notes[f"tree{size}.{side}_processes"] = memory["processes"]
            r.notes[f"tree{size}.{side}_process_names"] = memory["names"]

        async def ours_tree(parameters: Any, side: str) -> None:
            """A fresh server; everything under its process (server, orphan guard, fork servers,
            session kernels, spare), idle with no session, then 1, then 10."""
            async with fresh_server(parameters) as (server, server_pid):
                names: list[str] = []
                try:
                    for size in (0, *sizes):
                        while len(names) < size:
                            names.append(self.name("tree"))
                            await server.ok(names[-1], WARM_CODE)
                        await server.wait_for_spare()  # as shipped: the spare taken is replaced
                        await asyncio.sleep(MEMORY_SETTLE_S)
                        record(side, size, tree_memory(server_pid))
                finally:
                    for name in names:
                        await server.drop(name)

        async def ours() -> None:
            """As shipped (on Linux: the default env's fork server, and no spare kernel since it replaced it)."""
            await ours_tree(self.parameters, "ours")

        async def ours_no_fork() -> None:
            """As shipped but --no-fork-server (a spare kernel, every kernel spawned)."""
            await ours_tree(self.parameters_no_fork, "ours_no_fork")

        async def baseline() -> None:
            """A fresh jupyter_client host; everything under its process: the host and its kernels."""
            with open(self.work / f"baseline-host-{time.monotonic_ns()}.log", "wb") as log:  # noqa: ASYNC230
                host = await asyncio.create_subprocess_exec(
                    PY, "-c", BASELINE_HOST, str(self.jupyter.kernels_dir), BASELINE_SPEC,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                )
            assert host.stdin and host.stdout
            try:
                started = 0
                for size in sizes:
                    host.stdin.write(f"{size - started}\n".encode())
                    await host.stdin.drain()
                    line = await asyncio.wait_for(host.stdout.readline(), START_TIMEOUT_S * 2)
                    if line.split() != [b"ready", str(size).encode()]:
                        raise RuntimeError(f"the baseline host failed to start {size} kernels (said {line!r}; see its log)")
                    started = size
                    await asyncio.sleep(MEMORY_SETTLE_S)
                    record("baseline", size, tree_memory(host.pid))
            finally:
                host.stdin.close()  # the host shuts its kernels down and exits
                try:
                    await asyncio.wait_for(host.wait(), SHUTDOWN_TIMEOUT_S)
                except asyncio.TimeoutError:
                    with contextlib.suppress(psutil.Error):
                        for process in [*psutil.Process(host.pid).children(recursive=True), psutil.Process(host.pid)]:
                            with contextlib.suppress(psutil.Error):
                                process.kill()
                    await host.wait()

        steps = [ours, baseline]
        if self.parameters_no_fork is not None:
            steps.append(ours_no_fork)
        for rep in range(self.reps.tree):
            for step in rotate(steps, rep):
                await step()

    async def run(self) -> None:
        from mcp.client.stdio import StdioServerParameters

        parameters = StdioServerParameters(
            command=PY,
            args=[str(SERVER), "--output-dir", str(self.work / "server-output")],
            env={"IPYTHON_MCP_ENVS_DIR": str(self.work / "envs"), RUN_MARKER: os.environ[RUN_MARKER]},
        )
        no_spare = None
        spare = parameters  # the server of the spare-kernel rows (and warm, output, interrupt)
        if server_has_option("--spare-kernels"):
            no_spare = parameters.model_copy(update={"args": [*parameters.args, "--spare-kernels", "0"]})
            # As shipped, a server with fork servers keeps no spare kernel: ask for one.
            spare = parameters.model_copy(update={"args": [*parameters.args, "--spare-kernels", "1"]})
        self.r.notes["server_keeps_spare_kernels"] = no_spare is not None
        no_fork = None
        if server_has_option("--no-fork-server"):
            self.parameters_no_fork = parameters.model_copy(update={"args": [*parameters.args, "--no-fork-server"]})
            if no_spare is not None:
                no_fork = no_spare.model_copy(update={"args": [*no_spare.args, "--no-fork-server"]})
        self.r.notes["server_has_fork_servers"] = self.parameters_no_fork is not None
        self.parameters = parameters
        await self.section("make a venv (not timed)", self.make_venv())
        try:
            started = time.perf_counter()
            async with contextlib.AsyncExitStack() as stack:
                self.ours, _ = await stack.enter_async_context(fresh_server(spare))
                self.r.add("server.connect", time.perf_counter() - started)
                if no_spare is not None:
                    self.ours_no_spare, _ = await stack.enter_async_context(fresh_server(no_spare))
                if no_fork is not None:
                    self.ours_no_fork, _ = await stack.enter_async_context(fresh_server(no_fork))
                await self.section("cold session + idle memory", self.cold())
                await self.section("reset", self.reset())
                await self.section("new session in a venv", self.other_env())
                await self.section("warm round trip", self.warm())
                await self.section("sessions over ssh to localhost", self.over_ssh())
                await self.section("output throughput", self.output())
                await self.section("interrupt", self.interrupt())
                await self.section("memory floors", self.memory_floors())
                await self.section("whole process tree, 1 and 10 idle sessions", self.tree())
                await self.section("10 concurrent sessions", self.concurrent())
        finally:
            for kernel in list(self.direct):
                await self.close_direct(kernel)
            await self.jupyter.close_all()
        self.r.notes["baseline_kernel_argv"] = self.jupyter.argv


# --- report ---------------------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MB"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def build_rows(r: Results) -> list[dict[str, Any]]:
    """One row per metric: ours, baseline, ratio baseline/ours, floor, ours/floor."""
    rows = []

    def row(label: str, ours_key: str | None, base_key: str | None, floor_key: str | None, field: str = "median", kind: str = "time") -> None:
        ours = r.stat(ours_key, field) if ours_key else None
        base = r.stat(base_key, field) if base_key else None
        floor = r.stat(floor_key, field) if floor_key else None
        rows.append({
            "metric": label, "kind": kind, "field": field,
            "ours_key": ours_key, "baseline_key": base_key, "floor_key": floor_key,
            "ours": ours, "baseline": base, "floor": floor,
            "ratio": ratio(base, ours), "over_floor": ratio(ours, floor),
        })

    row("new session, no spare kernel, fork server ready, 1+1 (median)", "cold.ours_no_spare", "cold.baseline", "cold.floor_import_ipython")
    row("  --no-fork-server (kernel spawned)", "cold.ours_no_fork", "cold.baseline", "cold.floor_import_ipython")
    row("  with a spare kernel ready (--spare-kernels 1)", "cold.ours", "cold.baseline", "cold.floor_import_ipython")
    row("  baseline ready by wait_for_ready()", "cold.ours_no_spare", "cold.baseline_wait_for_ready", "cold.floor_import_ipython")
    row("  kernel only, spawned, direct pipes", "cold.ours_direct", "cold.baseline", "cold.floor_import_ipython")
    row("  kernel CPU time, start + 1+1 + idle (forked)", "cold.ours_kernel_cpu", "cold.baseline_kernel_cpu", None)
    row("  kernel CPU time, the same spawned", "cold.ours_no_fork_kernel_cpu", "cold.baseline_kernel_cpu", None)
    row("  floor: python -c pass", "cold.floor_python", None, None)
    row("  floor: InteractiveShell + 1+1", "cold.floor_shell", None, None)
    row("new session in a fresh venv, second (forked), 1+1 (median)", "env.ours_second", "env.baseline", "env.floor_import_ipython")
    row("  first (its fork server starts with it)", "env.ours_first", "env.baseline", "env.floor_import_ipython")
    row("  --no-fork-server (kernel spawned)", "env.ours_no_fork", "env.baseline", "env.floor_import_ipython")
    row("reset, no spare kernel, until 1+1 (median)", "reset.ours_no_spare", "reset.baseline", "cold.floor_import_ipython")
    row("  --no-fork-server (kernel spawned)", "reset.ours_no_fork", "reset.baseline", "cold.floor_import_ipython")
    row("  with a spare kernel ready (--spare-kernels 1)", "reset.ours", "reset.baseline", "cold.floor_import_ipython")
    row("warm 1+1 round trip (median)", "warm.ours", "warm.baseline", "warm.floor_sdk")
    row("warm 1+1 round trip (p95)", "warm.ours", "warm.baseline", "warm.floor_sdk", field="p95")
    row("  over streamable HTTP (legacy session, bearer token)", "warm.ours_http", "warm.baseline", "warm.floor_sdk")
    row("  kernel only, direct pipes", "warm.ours_direct", "warm.baseline", "warm.floor_echo")
    row("  ipython_mcp.Kernel, no MCP", "warm.ours_kernel_class", "warm.baseline", "warm.floor_echo")
    row("  MCP call, no kernel (list_sessions)", "warm.ours_list_sessions", None, "warm.floor_echo")
    row("  floor: bare SDK tool, ExecuteResult reply", "warm.floor_sdk", None, "warm.floor_echo")
    row("  bare SDK tool returning a str", "warm.floor_mcp_noop", None, "warm.floor_echo")
    row("new session over ssh to localhost, 1+1 (median; no baseline)", "ssh.cold", None, "ssh.floor_import_ipython")
    row("  local, same rotation (no spare kernel)", "ssh.local_cold", None, "cold.floor_import_ipython")
    row("  floor: ssh to localhost, true", "ssh.floor_connect", None, None)
    row("warm 1+1 over ssh (median; no baseline)", "ssh.warm", None, "ssh.floor_echo")
    row("warm 1+1 over ssh (p95)", "ssh.warm", None, "ssh.floor_echo", field="p95")
    row("  local, same rotation", "ssh.local_warm", None, "warm.floor_sdk")
    row("10k short prints, all inline (median)", "output.small_prints.ours", "output.small_prints.baseline", "output.small_prints.floor")
    row("  kernel only, direct pipes", "output.small_prints.ours_direct", "output.small_prints.baseline", "output.small_prints.floor")
    row("100k short prints (median, see note)", "output.prints.ours", "output.prints.baseline", "output.prints.floor")
    row("  kernel only, direct pipes", "output.prints.ours_direct", "output.prints.baseline", "output.prints.floor")
    row("one 10 MB print (median)", "output.big.ours", "output.big.baseline", "output.big.floor")
    row("  kernel only, direct pipes", "output.big.ours_direct", "output.big.baseline", "output.big.floor")
    row("interrupt sleep(30) -> reply (median)", "interrupt.ours", "interrupt.baseline", "interrupt.floor")
    row("  second interrupt, same session", "interrupt.ours_repeat", "interrupt.baseline_repeat", "interrupt.floor")
    row("  the interrupt tool call alone", "interrupt.ours_tool_call", None, None)
    row("idle session kernel RSS (median; forked)", "memory.ours_rss", "memory.baseline_rss", "memory.floor_import_ipython_rss", kind="bytes")
    row("idle session kernel USS (forked: undercounts)", "memory.ours_uss", "memory.baseline_uss", "memory.floor_import_ipython_uss", kind="bytes")
    row("idle session kernel PSS", "memory.ours_pss", "memory.baseline_pss", None, kind="bytes")
    row("  spawned (--no-fork-server) RSS", "memory.ours_no_fork_rss", "memory.baseline_rss", "memory.floor_import_ipython_rss", kind="bytes")
    row("  spawned (--no-fork-server) USS", "memory.ours_no_fork_uss", "memory.baseline_uss", "memory.floor_import_ipython_uss", kind="bytes")
    row("  floor: InteractiveShell RSS", "memory.floor_shell_rss", None, None, kind="bytes")
    row("  floor: bare python RSS", "memory.floor_python_rss", None, None, kind="bytes")
    row("  our server process RSS", "memory.server_rss", None, None, kind="bytes")
    row("  our server process USS", "memory.server_uss", None, None, kind="bytes")
    row("  our default env's fork server RSS", "memory.fork_server_rss", None, None, kind="bytes")
    row("  our default env's fork server USS", "memory.fork_server_uss", None, None, kind="bytes")
    row("  our default env's fork server PSS", "memory.fork_server_pss", None, None, kind="bytes")
    row("  our idle spare kernel(s) RSS", "memory.spares_rss", None, None, kind="bytes")
    row("  our idle spare kernel(s) USS", "memory.spares_uss", None, None, kind="bytes")
    row("  our idle spare kernel(s) PSS", "memory.spares_pss", None, None, kind="bytes")
    # "baseline" here is our own server with --no-fork-server, as shipped otherwise (spare kernel kept)
    row("fresh server, no session, PSS (baseline col: --no-fork-server)", "tree0.ours_pss", "tree0.ours_no_fork_pss", None, kind="bytes")
    row("  USS (same columns)", "tree0.ours_uss", "tree0.ours_no_fork_uss", None, kind="bytes")
    row("  RSS (same columns)", "tree0.ours_rss", "tree0.ours_no_fork_rss", None, kind="bytes")
    row("whole tree, 1 idle session, RSS", "tree1.ours_rss", "tree1.baseline_rss", None, kind="bytes")
    row("whole tree, 1 idle session, USS", "tree1.ours_uss", "tree1.baseline_uss", None, kind="bytes")
    row("whole tree, 1 idle session, PSS", "tree1.ours_pss", "tree1.baseline_pss", None, kind="bytes")
    row(f"whole tree, {CONCURRENT} idle sessions, RSS", f"tree{CONCURRENT}.ours_rss", f"tree{CONCURRENT}.baseline_rss", None, kind="bytes")
    row(f"whole tree, {CONCURRENT} idle sessions, USS", f"tree{CONCURRENT}.ours_uss", f"tree{CONCURRENT}.baseline_uss", None, kind="bytes")
    row(f"whole tree, {CONCURRENT} idle sessions, PSS", f"tree{CONCURRENT}.ours_pss", f"tree{CONCURRENT}.baseline_pss", None, kind="bytes")
    row("  of which our fork server, USS", f"tree{CONCURRENT}.ours_fork_server_uss", None, None, kind="bytes")
    row("  of which our fork server, PSS", f"tree{CONCURRENT}.ours_fork_server_pss", None, None, kind="bytes")
    row("  --no-fork-server, USS", f"tree{CONCURRENT}.ours_no_fork_uss", f"tree{CONCURRENT}.baseline_uss", None, kind="bytes")
    row("  --no-fork-server, PSS", f"tree{CONCURRENT}.ours_no_fork_pss", f"tree{CONCURRENT}.baseline_pss", None, kind="bytes")
    row("10 sessions at once, no spare kernel (fork server), all answered", "concurrent.ours", "concurrent.baseline", "concurrent.floor_import_ipython")
    row("  --no-fork-server (spawned)", "concurrent.ours_no_fork", "concurrent.baseline", "concurrent.floor_import_ipython")
    row("our MCP server start, spawn -> ready", "server.connect", None, None)
    return rows


def evaluate_targets(r: Results) -> list[dict[str, Any]]:
    def med(key: str) -> float | None:
        return r.stat(key)

    targets = []

    def target(name: str, checks: list[tuple[str, float | None, str, float]]) -> None:
        parts, met = [], True
        for label, value, op, bound in checks:
            if value is None:
                met = False
                parts.append(f"{label}: not measured")
                continue
            ok = value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
            met = met and ok
            parts.append(f"{label} = {value:.3g} ({op} {bound:g}: {'ok' if ok else 'MISSED'})")
        targets.append({"target": name, "met": met, "detail": "; ".join(parts)})

    # The targets of issue 17 (round two), plus the earlier ones they do not replace.
    target("new session, no spare kernel (fork server ready): >= 8x the lean baseline, below the import IPython floor", [
        ("baseline/ours", ratio(med("cold.baseline"), med("cold.ours_no_spare")), ">=", 8),
        ("ours/floor", ratio(med("cold.ours_no_spare"), med("cold.floor_import_ipython")), "<", 1),
    ])
    target("  same in a non-default env (a fresh venv), its second session (forked)", [
        ("baseline/ours", ratio(med("env.baseline"), med("env.ours_second")), ">=", 8),
        ("ours/floor", ratio(med("env.ours_second"), med("env.floor_import_ipython")), "<", 1),
    ])
    target("  same, its first session (its fork server starts with it)", [
        ("baseline/ours", ratio(med("env.baseline"), med("env.ours_first")), ">=", 8),
        ("ours/floor", ratio(med("env.ours_first"), med("env.floor_import_ipython")), "<", 1),
    ])
    target("reset until the next 1+1, no spare kernel: >= 8x restarting an ipykernel", [
        ("baseline/ours", ratio(med("reset.baseline"), med("reset.ours_no_spare")), ">=", 8),
    ])
    target(f"{CONCURRENT} sessions at once >= 6x faster", [
        ("baseline/ours", ratio(med("concurrent.baseline"), med("concurrent.ours")), ">=", 6),
    ])
    target(f"whole tree with {CONCURRENT} idle sessions: USS <= 50% of the baseline's", [
        ("ours/baseline", ratio(med(f"tree{CONCURRENT}.ours_uss"), med(f"tree{CONCURRENT}.baseline_uss")), "<=", 0.5),
    ])
    target("  the same by PSS (fairer: a forked kernel's USS leaves out what it shares with its fork server)", [
        ("ours/baseline", ratio(med(f"tree{CONCURRENT}.ours_pss"), med(f"tree{CONCURRENT}.baseline_pss")), "<=", 0.5),
    ])
    target("idle fresh server as shipped holds no more than as shipped with --no-fork-server", [
        ("PSS fork/no-fork", ratio(med("tree0.ours_pss"), med("tree0.ours_no_fork_pss")), "<=", 1),
        ("USS fork/no-fork", ratio(med("tree0.ours_uss"), med("tree0.ours_no_fork_uss")), "<=", 1),
    ])
    target("warm 1+1 within 1.5x of the SDK's floor (bare tool, same ExecuteResult reply)", [
        ("ours/floor", ratio(med("warm.ours"), med("warm.floor_sdk")), "<=", 1.5),
    ])
    target("idle session kernel RSS <= 60% of baseline", [
        ("ours/baseline", ratio(med("memory.ours_rss"), med("memory.baseline_rss")), "<=", 0.6),
    ])
    target("interrupt >= 3x faster (first and second interrupt of a session)", [
        ("first: baseline/ours", ratio(med("interrupt.baseline"), med("interrupt.ours")), ">=", 3),
        ("second: baseline/ours", ratio(med("interrupt.baseline_repeat"), med("interrupt.ours_repeat")), ">=", 3),
    ])
    return targets


def print_report(info: dict[str, Any], reps: Reps, r: Results, rows: list[dict[str, Any]], targets: list[dict[str, Any]], elapsed: float) -> None:
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    print(f"ipython-mcp benchmark · {info['date']} · {info['cpu_model']} ({info['cpus_logical']} CPUs) · Python {info['python']}")
    print(f"{packages}")
    print(f"reps: cold {reps.cold}, reset {reps.reset}, venv {reps.env}, warm {reps.warm}, output {reps.output}, "
          f"interrupt {reps.interrupt}, tree {reps.tree}, concurrent {reps.concurrent}, ssh {reps.ssh} · total {elapsed:.0f} s")
    cpu = info.get("cpu_seconds")
    if cpu:
        print(f"CPU-seconds: this run {cpu['this_run']:.1f}, other processes {cpu['other_processes']:.1f} "
              f"({info['other_processes_cpu_share']:.0%} of the machine{'; NOT A QUIET MACHINE' if info['other_processes_cpu_share'] > 0.05 else ''})")
    print("ratio = baseline / ours (bigger is better for us); vs floor = ours / floor (1.00x is the floor)")
    print()
    width = max(len(row["metric"]) for row in rows)
    header = f"{'metric':<{width}} {'ours':>10} {'baseline':>10} {'ratio':>8} {'floor':>10} {'vs floor':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        fmt = fmt_bytes if row["kind"] == "bytes" else fmt_time
        print(f"{row['metric']:<{width}} {fmt(row['ours']):>10} {fmt(row['baseline']):>10} {fmt_ratio(row['ratio']):>8} "
              f"{fmt(row['floor']):>10} {fmt_ratio(row['over_floor']):>9}")
    print()
    inline = r.notes.get("output.prints.ours_reply_stdout_chars")
    print(f"note, 100k prints: the baseline receives all {PRINTS_CHARS} characters as stream messages; ours returns "
          f"{inline if inline is not None else 'the first output-limit'} characters in the reply and writes all {PRINTS_CHARS} "
          "to a file it names (the 10k-prints row is the same work on both sides: all inline).")
    for size in (1, CONCURRENT):
        ours_n, base_n = r.notes.get(f"tree{size}.ours_processes"), r.notes.get(f"tree{size}.baseline_processes")
        if ours_n is not None or base_n is not None:
            print(f"note, whole tree with {size} idle session(s), summed over processes: ours {ours_n} processes (server, "
                  f"orphan guard, fork server, session kernels, spare kernel); baseline {base_n} (a jupyter_client host "
                  "process, its kernels).")
    if r.notes.get("ssh_skipped"):
        print(f"note, ssh rows: skipped, {r.notes['ssh_skipped']}.")
    elif r.stat("ssh.cold") is not None:
        print("note, ssh rows: our server with a config file whose env is `ssh <a real sshd on 127.0.0.1>` and this run's "
              "python; no baseline (jupyter_client has no ssh launcher to compare with). Their floors: `python -c \"import "
              "IPython\"` over the same ssh, and a line echoed by a far-side python over one ssh connection.")
    gains = [
        (label, ratio(r.stat(spawned), r.stat(forked)))
        for label, spawned, forked in (
            ("new session", "cold.ours_no_fork", "cold.ours_no_spare"),
            ("new venv session", "env.ours_no_fork", "env.ours_second"),
            ("reset", "reset.ours_no_fork", "reset.ours_no_spare"),
            (f"{CONCURRENT} at once", "concurrent.ours_no_fork", "concurrent.ours"),
        )
    ]
    if any(gain is not None for _, gain in gains):
        print("what the fork server gives (spawned / forked, same run): "
              + ", ".join(f"{label} {fmt_ratio(gain)}" for label, gain in gains if gain is not None))
    overhead = None
    if r.stat("warm.ours") is not None and r.stat("warm.ours_direct") is not None:
        overhead = r.stat("warm.ours") - r.stat("warm.ours_direct")
        print(f"MCP-layer overhead per call (median end-to-end - median direct kernel): {fmt_time(overhead)}")
    if r.stat("warm.ours") is not None and r.stat("warm.ours_kernel_class") is not None:
        print(f"  of which outside ipython_mcp.Kernel (MCP SDK, JSON-RPC, stdio, tool code): "
              f"{fmt_time(r.stat('warm.ours') - r.stat('warm.ours_kernel_class'))}")
    if r.stat("warm.ours") is not None and r.stat("warm.floor_sdk") is not None:
        print(f"  over the SDK's floor for the same reply (bare tool, ExecuteResult): "
              f"{fmt_time(r.stat('warm.ours') - r.stat('warm.floor_sdk'))}")
    print()
    print("targets:")
    for t in targets:
        print(f"  [{'MET ' if t['met'] else 'MISS'}] {t['target']}: {t['detail']}")
    if r.baseline_failures:
        print()
        print("baseline failures (left out of its numbers):")
        for line in r.baseline_failures:
            print(f"  {line}")
    if r.incomplete:
        print()
        print("replies that lost output (timed anyway; a correctness problem, not a speed one):")
        for line in r.incomplete:
            print(f"  {line}")
    if r.errors:
        print()
        print("errors:")
        for error in r.errors:
            print(f"  {error}")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, in the layout of the README's Benchmark section."""
    lines = ["| metric | ours | baseline | ratio | floor | ours / floor |", "|---|---|---|---|---|---|"]
    for row in rows:
        fmt = fmt_bytes if row["kind"] == "bytes" else fmt_time
        label = row["metric"]
        label = f"&nbsp;&nbsp;{label.strip()}" if label.startswith(" ") else label
        cells = [label, fmt(row["ours"]), fmt(row["baseline"]), fmt_ratio(row["ratio"]), fmt(row["floor"]), fmt_ratio(row["over_floor"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def server_has_option(option: str) -> bool:
    """Whether the server under test accepts a command-line option (older versions may not)."""
    try:
        out = subprocess.run([PY, str(SERVER), "--help"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in out.stdout


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine spent busy, CPU seconds this run's processes used)."""
    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    ours = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):  # children: every descendant reaped so far
        usage = resource.getrusage(who)
        ours += usage.ru_utime + usage.ru_stime
    return busy, ours


def leftover_processes(run_id: str) -> list[psutil.Process]:
    """Processes of this run still alive: our descendants, and anything carrying our marker."""
    me = psutil.Process()
    found = {child.pid: child for child in me.children(recursive=True)}
    for process in psutil.process_iter(["pid"]):
        if process.pid == me.pid or process.pid in found:
            continue
        with contextlib.suppress(psutil.Error):
            if process.environ().get(RUN_MARKER) == run_id:
                found[process.pid] = process
    return list(found.values())


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid}: {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return f"{process.pid}: (gone)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a quick check, not numbers to quote)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file (default %(default)s)")
    parser.add_argument("--markdown", action="store_true", help="also print the table in Markdown, as the README shows it")
    parser.add_argument(
        "--source", type=Path, default=None,
        help="folder holding the ipython_mcp.py and bootstrap_kernel.py to measure (default: the repository's); "
        "for trying a change on a copy",
    )
    args = parser.parse_args(argv)
    global SERVER, BOOTSTRAP
    if args.source is not None:
        SERVER, BOOTSTRAP = args.source.resolve() / SERVER.name, args.source.resolve() / BOOTSTRAP.name
        if not (SERVER.is_file() and BOOTSTRAP.is_file()):
            parser.error(f"{args.source} must hold {SERVER.name} and {BOOTSTRAP.name}")
    reps = QUICK if args.quick else Reps()
    run_id = f"{os.getpid()}-{time.time_ns()}"
    os.environ[RUN_MARKER] = run_id
    # With PYTHONDONTWRITEBYTECODE set (some sandboxes and CI images do), a venv whose
    # installer did not compile bytecode recompiles IPython in every new kernel: measure
    # what a user sees instead, with .pyc files written once and then reused.
    dont_write_bytecode = os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    info = machine_info()
    info["PYTHONDONTWRITEBYTECODE_removed"] = dont_write_bytecode
    info["PYTHONUNBUFFERED"] = os.environ.get("PYTHONUNBUFFERED")  # inherited by all (kernels set it anyway)
    cpu_before = busy_cpu_seconds()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ipython-mcp-bench-"))
    bench = Bench(reps, work)
    interrupted = False
    try:
        asyncio.run(bench.run())
    except KeyboardInterrupt:
        interrupted = True  # Ctrl-C: everything started has been stopped on the way out
    except Exception as exc:  # noqa: BLE001 (reported, and the results so far are still written)
        bench.r.errors.append(f"run: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started
    info["load_average_at_end"] = list(os.getloadavg())
    leftovers = leftover_processes(run_id)
    deadline = time.monotonic() + 5
    while leftovers and time.monotonic() < deadline:  # the server's kernels may still be dying
        time.sleep(0.2)
        leftovers = leftover_processes(run_id)
    descriptions = [describe(p) for p in leftovers]  # before they die
    if leftovers:
        bench.r.errors.append("processes left behind (now killed): " + "; ".join(descriptions))
        for process in leftovers:  # all started by this run
            with contextlib.suppress(psutil.Error):
                process.kill()

    if interrupted:
        print("interrupted: no results written", file=sys.stderr)
        for description in descriptions:
            print(f"  left behind, now killed: {description}", file=sys.stderr)
        return 130
    cpu_after = busy_cpu_seconds()
    machine_busy, ours_busy = (after - before for after, before in zip(cpu_after, cpu_before))
    others = max(machine_busy - ours_busy, 0.0)
    info["cpu_seconds"] = {"machine_busy": machine_busy, "this_run": ours_busy, "other_processes": others}
    share = others / (elapsed * (psutil.cpu_count() or 1))
    info["other_processes_cpu_share"] = share
    if share > 0.05:
        bench.r.notes["noisy"] = True
        print(f"WARNING: other processes used {others:.1f} CPU-seconds during this run ({share:.0%} of the machine): "
              "the numbers are not clean; run again on a quiet machine.", file=sys.stderr)

    r = bench.r
    rows = build_rows(r)
    targets = evaluate_targets(r)
    print_report(info, reps, r, rows, targets, elapsed)
    if args.markdown:
        print()
        print(markdown_table(rows))
    document = {
        "date": info["date"],
        "machine": info,
        "command": " ".join(["uv run --extra bench --extra test python bench/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "reps": dataclasses.asdict(reps),
        "elapsed_s": elapsed,
        "units": {"time": "seconds", "memory": "bytes"},
        "rows": rows,
        "targets": targets,
        "mcp_overhead_s": (r.stat("warm.ours") - r.stat("warm.ours_direct"))
        if r.stat("warm.ours") is not None and r.stat("warm.ours_direct") is not None else None,
        "metrics": {key: summarize(values) for key, values in sorted(r.samples.items())},
        "notes": r.notes,
        "incomplete_output": r.incomplete,
        "baseline_failures": r.baseline_failures,
        "errors": r.errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
