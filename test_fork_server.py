"""Fork servers: a local kernel is forked from a process of its interpreter that imported
IPython once. Each risk of forking has its promise here: one thread in the fork server,
nothing inherited that a fresh interpreter would not have, exits learned without being the
parent, a dead fork server taking no kernel with it, a changed env getting a fresh one,
and the places that keep spawning (macOS, --no-fork-server)."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import ipython_mcp
from conftest import (
    BOOTSTRAP,
    POLL_S,
    QUICK_S,
    SLOW_S,
    command_line,
    connect,
    fork_servers_below,
    kernels_below,
    live_processes,
    parent_of,
    run,
    sessions,
    wait_until_gone,
)

pytestmark = pytest.mark.anyio

PROBE = (
    "import os, sys, signal, json, random, threading, subprocess\n"
    "json.dumps({'pid': os.getpid(), 'parent': os.getppid(), 'session_leader': os.getsid(0) == os.getpid(),\n"
    "  'cwd': os.getcwd(), 'argv': sys.argv, 'path': os.environ['PATH'],\n"
    "  'ours': sorted(k for k in os.environ if k.startswith('IPYTHON_MCP_') and k != 'IPYTHON_MCP_UV'),\n"
    "  'marker': os.environ.get('FORK_TEST_MARKER'),\n"
    "  'sigchld': signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL,\n"
    "  'sigterm': signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,\n"
    "  'random': random.random(), 'numpy': 'numpy' in sys.modules,\n"
    "  'child': subprocess.run(['sh', '-c', 'echo from-a-child'], capture_output=True, text=True).stdout,\n"
    "  'comm': open('/proc/self/comm').read().strip()})"
)


async def probe(client, session: str) -> dict:
    out = await run(client, session, PROBE)
    assert out["status"] == "ok", out
    return json.loads(ast.literal_eval(out["result"]))


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


async def test_kernels_are_forked_by_one_single_threaded_fork_server_and_start_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path) as client:
            first = await probe(client, "a")
            (forks,) = fork_servers_below(os.getpid())
            # What changed in the server after the fork server started reaches the next kernel.
            monkeypatch.chdir(tmp_path)
            monkeypatch.setenv("FORK_TEST_MARKER", "set-later")
            second = await probe(client, "b")
            threads = threads_of(forks)
    assert first["parent"] == second["parent"] == forks, "both kernels were forked by the one fork server"
    assert threads == 1, "the fork server never starts a thread (a fork would copy a held lock)"
    for kernel in (first, second):
        assert kernel["session_leader"], "each kernel leads its own session and process group"
        assert kernel["sigchld"] and kernel["sigterm"], "signal handlers are the defaults a fresh interpreter has"
        assert kernel["child"] == "from-a-child\n", "subprocess works (SIGCHLD is not the fork server's)"
        assert kernel["argv"] == [str(BOOTSTRAP)]
        assert kernel["ours"] == [], "the server's settings for the kernel are consumed, as in a spawned kernel"
        assert not kernel["numpy"], "nothing that starts threads is preloaded"
        assert kernel["comm"] != "ipymcp-forksrv", "ps tells a kernel from its fork server"
    assert first["path"].split(os.pathsep)[0] != second["path"].split(os.pathsep)[0], "each kernel has its own pip scripts first on PATH"
    assert second["cwd"] == str(tmp_path) and second["marker"] == "set-later"
    assert first["random"] != second["random"], "random state is fresh in each kernel"


async def test_a_killed_fork_server_takes_no_kernel_with_it_and_exits_are_still_seen(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path) as client:
            kernel = int((await run(client, "s", "import os\nx = 41\nos.getpid()"))["result"])
            forks = parent_of(kernel)
            assert forks in fork_servers_below(os.getpid())
            os.kill(forks, signal.SIGKILL)
            await wait_until_gone(forks)
            kept = await run(client, "s", "x + 1")
            fresh = await run(client, "t", "import os\nos.getppid()")  # a new fork server, or a spawn
            os.kill(kernel, signal.SIGKILL)  # its exit is seen without its parent (pidfd)
            while (await sessions(client))["s"]["status"] != "dead":
                await anyio.sleep(POLL_S)
            after = await run(client, "s", "'x' in globals()")
    assert (kept["status"], kept["result"]) == ("ok", "42"), "the kernel and its state outlived its fork server"
    assert fresh["status"] == "ok" and int(fresh["result"]) != forks
    assert (after["status"], after["result"]) == ("ok", "False")
    assert "died" in after["warning"] and "variables and imports from before are gone" in after["warning"]


async def test_an_env_whose_packages_changed_gets_a_fresh_fork_server_and_sees_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "extra-packages"  # on the kernels' sys.path, as a site folder
    site.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(site))
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path) as client:
            old = int((await run(client, "a", "import os\nos.getppid()"))["result"])
            (site / "installed_later.py").write_text("VALUE = 'new package'\n")  # an install: the folder changes
            fresh = await run(client, "b", "import os, installed_later\n(os.getppid(), installed_later.VALUE)")
            newer = parent_of(int((await run(client, "c", "import os\nos.getpid()"))["result"]))
            forks_then = fork_servers_below(os.getpid())
            still = await run(client, "a", "import os\nos.getppid()")
    assert fresh["status"] == "ok" and "new package" in fresh["result"], fresh
    assert newer != old and newer in forks_then, "later kernels come from a fresh fork server"
    assert int(still["result"]) == old, "the kernel forked before the change lives on, with its retired fork server"


async def test_reset_forks_a_fresh_kernel(tmp_path: Path) -> None:
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path) as client:
            before = int((await run(client, "s", "import os\nx = 1\nos.getpid()"))["result"])
            forks = parent_of(before)
            reset = await client.call_tool("reset", {"session": "s"})
            after = await run(client, "s", "import os\n(os.getpid(), os.getppid(), 'x' in globals())")
    assert not reset.is_error
    pid, parent, kept = after["result"].strip("()").split(", ")
    assert int(pid) != before and int(parent) == forks and kept == "False"


async def test_without_a_fork_server_kernels_are_spawned(tmp_path: Path) -> None:
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, fork_server=False) as client:
            parent = int((await run(client, "s", "import os\nos.getppid()"))["result"])
            servers = fork_servers_below(os.getpid())
    assert parent == os.getpid() and servers == set()


def test_fork_servers_are_for_linux_and_can_be_turned_off() -> None:
    assert ipython_mcp.fork_server_default({}, platform="linux") is True
    assert ipython_mcp.fork_server_default({}, platform="darwin") is False, "macOS keeps spawning"
    for off in ("0", "false", "no", "off"):
        assert ipython_mcp.fork_server_default({"IPYTHON_MCP_FORK_SERVER": off}, platform="linux") is False
    assert ipython_mcp.parse_args(["--no-fork-server"]).fork_server is False
    assert ipython_mcp.parse_args([]).fork_server is None


def test_the_fork_server_replaces_the_spare_kernel_unless_one_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IPYTHON_MCP_SPARE_KERNELS", raising=False)
    assert ipython_mcp.Config(fork_server=True).spare_kernels == 0, "a fork takes tens of ms: no spare kernel's memory"
    assert ipython_mcp.Config(fork_server=False).spare_kernels == 1
    assert ipython_mcp.Config(fork_server=True, spare_kernels=2).spare_kernels == 2
    monkeypatch.setenv("IPYTHON_MCP_SPARE_KERNELS", "1")
    assert ipython_mcp.Config(fork_server=True).spare_kernels == 1


async def test_an_env_without_ipython_still_gets_its_clear_error_and_no_fork_server_is_left(tmp_path: Path) -> None:
    env = tmp_path / "envs" / "bare"
    await anyio.run_process([sys.executable, "-m", "venv", "--without-pip", str(env)])
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, envs_dir=tmp_path / "envs") as client:
            out = await run(client, "s", "1", env="bare")
            servers = {pid for pid in fork_servers_below(os.getpid()) if str(env).encode() in command_line(pid)}
            kernels = {pid for pid in kernels_below(os.getpid()) if str(env).encode() in command_line(pid)}
    assert out["status"] == "env_error" and "IPython is not importable" in out["error"], out
    assert servers == set() and kernels == set()


@contextlib.asynccontextmanager
async def started_fork_server() -> AsyncIterator[ipython_mcp.ForkServer]:
    """A ready fork server of this Python, its tasks in a task group as a server lifespan has them."""
    async with ipython_mcp.Jobs.open() as jobs:
        forks = ipython_mcp.ForkServer(Path(sys.executable), None, jobs)
        try:
            await forks.start(ipython_mcp.kernel_environment(Path(sys.executable)))
            yield forks
        finally:
            forks.close()


def kernel_pipes() -> tuple[list[int], list[int]]:
    """The seven fds a fork request hands over (stdin, stdout, stderr, two output pipes), and ours."""
    (in_r, in_w), (out_r, out_w), (err_r, err_w), (o1_r, o1_w), (o2_r, o2_w) = (os.pipe() for _ in range(5))
    return [in_r, out_w, err_w, o1_r, o1_w, o2_r, o2_w], [in_w, out_r, err_r]


async def test_a_fork_cancelled_while_waiting_for_its_reply_leaves_no_kernel(tmp_path: Path) -> None:
    theirs, ours = kernel_pipes()  # ours stay open: only a kill ends that kernel
    try:
        with anyio.fail_after(QUICK_S):
            async with started_fork_server() as forks:
                async with anyio.create_task_group() as group:
                    group.start_soon(forks.fork, ipython_mcp.kernel_environment(Path(sys.executable)), theirs)
                    while not forks._replies:  # the request is out
                        await anyio.sleep(0)
                    group.cancel_scope.cancel()
                while live_processes(below=forks.pid):  # the kernel it forked anyway is killed
                    await anyio.sleep(POLL_S)
                assert forks.usable and not forks._exits
    finally:
        for fd in theirs + ours:
            os.close(fd)


async def test_a_fork_request_too_big_to_send_is_refused_and_the_fork_server_stays(tmp_path: Path) -> None:
    theirs, ours = kernel_pipes()
    try:
        with anyio.fail_after(QUICK_S):
            async with started_fork_server() as forks:
                huge = {**ipython_mcp.kernel_environment(Path(sys.executable)), "BIG": "x" * (4 << 20)}
                with pytest.raises(ipython_mcp.ForkUnavailable, match="could not be sent"):
                    await forks.fork(huge, theirs)
                assert forks.usable and forks.alive
    finally:
        for fd in theirs + ours:
            os.close(fd)


async def test_a_kernel_whose_exit_comes_with_its_fork_reply_is_returned_with_that_exit(tmp_path: Path) -> None:
    """The fork server's reply and the kernel's exit can arrive in one read: fork() still returns
    the kernel, and its exit status (a kernel that died at once is a start error, not a KeyError)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    try:
        with anyio.fail_after(QUICK_S):
            async with ipython_mcp.Jobs.open() as jobs:
                forks = ipython_mcp.ForkServer(Path(sys.executable), None, jobs)  # its far end played here
                ours.setblocking(False)
                forks._socket = ours
                forks._reader = jobs.start(forks._read, name="reader")
                async with anyio.create_task_group() as group:
                    kernels: list[ipython_mcp.ForkedProcess] = []

                    async def fork() -> None:
                        kernels.append(await forks.fork({}, [read_end, write_end]))

                    group.start_soon(fork)
                    await anyio.wait_readable(theirs)
                    request, fds, _, _ = socket.recv_fds(theirs, 1 << 20, 10)
                    for fd in fds:
                        os.close(fd)
                    request_id = json.loads(request)["id"]
                    theirs.send(json.dumps({"kind": "forked", "id": request_id, "pid": 424242}).encode())
                    theirs.send(json.dumps({"kind": "exited", "pid": 424242, "returncode": 3}).encode())
                [kernel] = kernels
                assert (kernel.pid, await kernel.wait()) == (424242, 3)
                forks.close()
    finally:
        theirs.close()
        os.close(read_end)
        os.close(write_end)
