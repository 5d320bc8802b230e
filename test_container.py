"""Sessions in a real container: the README's `podman exec -i NAME` launcher against a running one.

No image and no registry: the module fixture starts one container (`podman run --rootfs DIR`)
whose root is a small folder of this machine's /usr (read-only) and this test Python's folders
(read-only, at the same paths, so the far side's python is ``sys.executable``), plus a shared
folder for marker files. The container's processes are visible here: the checks that nothing is
left scan /proc for processes in the container's pid namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

import ipython_mcp
from conftest import POLL_S, QUICK_S, SERVER, SHORT_INTERRUPT_GRACE_S, SLOW_S, connect, own_sessions, run, touch, wait_for_file
from test_remote import marked, start_marked_child

pytestmark = pytest.mark.anyio

PYTHON = sys.executable  # the far side's Python: this venv's, which has IPython, seen at the same path
START_S = 30  # bound on `podman run` and `podman rm`


@dataclasses.dataclass
class Container:
    name: str
    init: int  # its first process (``sleep``), as this machine numbers it
    shared: Path  # a folder of this machine that the container sees at the same path, writable

    def launched(self, name: str | None = None) -> ipython_mcp.LaunchedPython:
        return ipython_mcp.LaunchedPython(("podman", "exec", "-i", name or self.name), PYTHON)

    def launchers(self) -> ipython_mcp.LaunchConfig:
        """Env ``box`` (this container) and ``gone`` (a container that does not exist)."""
        return ipython_mcp.LaunchConfig(envs={"box": self.launched(), "gone": self.launched(f"{self.name}-gone")})

    def processes(self) -> dict[int, bytes]:
        """Live processes in the container but its first: pid as the container numbers it -> command line."""
        namespace = os.readlink(f"/proc/{self.init}/ns/pid")
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.init:
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                    continue
                status = Path(f"/proc/{entry}/status").read_text()
                if "\nState:\tZ" in status:
                    continue  # ended; the container's first process (sleep) does not reap
                inner = int(next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[-1])
                found[inner] = Path(f"/proc/{entry}/cmdline").read_bytes()
        return found

    async def ended(self, kernel_pid: int, marker: str = "") -> None:
        """Wait until the kernel (its pid in the container) and every process carrying ``marker`` are gone."""
        def left() -> bool:
            running = self.processes()
            return kernel_pid in running or bool(marker) and any(marker.encode() in line for line in running.values())

        while left():
            await anyio.sleep(POLL_S)


def root_folder(root: Path) -> list[str]:
    """Make a container root in ``root``: this machine's top folders as symlinks (merged /usr)
    or read-only binds, and this Python's folders bound read-only. Returns the -v options."""
    volumes = []
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr"):
        host = Path("/", top)
        if host.is_symlink():
            (root / top).symlink_to(os.readlink(host))
        elif host.is_dir():
            volumes += ["-v", f"{host}:{host}:ro"]
    for folder in sorted({sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(PYTHON))}):
        if not folder.startswith("/usr/"):
            volumes += ["-v", f"{folder}:{folder}:ro"]
    (root / "root").mkdir()  # HOME of root in the container
    (root / "tmp").mkdir(mode=0o1777)
    return volumes


def limits() -> list[str]:
    """Resource limits the container can have. Podman as root asks the runtime for 1048576 open
    files and lowers its own process limit to 32768; a machine whose limits are lower, without
    CAP_SYS_RESOURCE (this one), refuses either ("setrlimit `RLIMIT_NOFILE`: Operation not permitted")."""
    options = []
    for name, kind, podman_default in (("nofile", resource.RLIMIT_NOFILE, 1048576), ("nproc", resource.RLIMIT_NPROC, 32768)):
        hard = resource.getrlimit(kind)[1]
        value = podman_default if hard == resource.RLIM_INFINITY else min(hard, podman_default)
        options += ["--ulimit", f"{name}={value}:{value}"]
    return options


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    if shutil.which("podman") is None:
        pytest.skip("needs podman (Debian: apt install podman)")
    folder = Path(tempfile.mkdtemp(prefix="ipython-mcp-podman-"))
    root, shared = folder / "root", folder / "shared"
    root.mkdir()
    shared.mkdir()
    name = f"ipython-mcp-test-{uuid.uuid4().hex[:12]}"
    options = [
        "run", "-d", "--rm", "--name", name, "--network=none", *limits(), *root_folder(root),
        "-v", f"{shared}:{shared}", "--rootfs", str(root),
        "sleep", "600",  # ends (and --rm removes the container) even if this run is killed
    ]
    said = []
    try:
        # crun, podman's default runtime, refuses a machine with cgroups v1 and v2 both mounted
        # ("cgroups in hybrid mode not supported"); runc runs there.
        for runtime in ([], ["--runtime", "runc"]):
            if runtime and shutil.which("runc") is None:
                said.append("(runc, which could try next, is not installed: apt install runc)")
                continue
            started = subprocess.run(["podman", *runtime, *options], capture_output=True, text=True, timeout=START_S, check=False)
            if started.returncode == 0:
                break
            said.append(f"{shlex.join(['podman', *runtime, 'run'])}: {started.stderr.strip()[-300:]}")
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=START_S, check=False)
        else:
            pytest.skip("podman cannot run a container here: " + " / ".join(said))
        inspected = subprocess.run(
            ["podman", "inspect", "-f", "{{.State.Pid}}", name], capture_output=True, text=True, timeout=START_S, check=True
        )
        yield Container(name, int(inspected.stdout), shared)
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=START_S, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
async def box_server(box: Container, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """One in-memory server with the container's launchers, for the tests that need no other config."""
    async with connect(tmp_path_factory.mktemp("box-server"), launchers=box.launchers()) as client:
        yield client


async def test_podman_session_keeps_state_prints_and_runs_inside_the_container(box: Container, box_server: Client) -> None:
    async with own_sessions(box_server) as client:
        with anyio.fail_after(SLOW_S):
            first = await run(
                client, "s", "import os, sys\nx = 41\nprint('hello from', open('/proc/1/cmdline').read().split(chr(0))[0])\n"
                "print('to stderr', file=sys.stderr)\nos.getpid()", env="box",
            )
            second = await run(client, "s", "x + 1")
            inside = box.processes()
            envs = {env["name"]: env for env in (await client.call_tool("list_envs", {})).structured_content["envs"]}
    assert first["status"] == "ok" and first["stdout"] == "hello from sleep\n" and first["stderr"] == "to stderr\n", first
    assert int(first["result"]) in inside, "the kernel runs in the container"
    assert second["result"] == "42"
    assert envs["box"]["usable"] and envs["box"]["ipython_version"], envs["box"]


async def test_podman_interrupt_and_timeout_travel_as_messages_and_keep_state(box: Container, box_server: Client) -> None:
    marker = box.shared / f"running-{uuid.uuid4().hex}"
    async with own_sessions(box_server) as client:
        with anyio.fail_after(SLOW_S):
            await run(client, "s", "x = 7", env="box")

            async def interrupt_when_running() -> None:
                await wait_for_file(marker)
                await client.call_tool("interrupt", {"session": "s"})

            async with anyio.create_task_group() as group:
                group.start_soon(interrupt_when_running)
                interrupted = await run(client, "s", f"{touch(marker)}\nimport subprocess\nsubprocess.run(['sleep', '61'])")
            timed_out = await run(client, "s", "import subprocess\nsubprocess.run(['sleep', '62'])", timeout_s=1)
            after = await run(client, "s", "x")
            left = [line for line in box.processes().values() if line.startswith(b"sleep\x006")]
    assert interrupted["status"] == "error" and "KeyboardInterrupt" in interrupted["error"], interrupted
    assert timed_out["status"] == "timeout" and "KeyboardInterrupt" in (timed_out["error"] or ""), timed_out
    assert after["result"] == "7", "an interrupt keeps the state"
    assert not left, "the cells' children in the container were interrupted too"


async def test_podman_cell_ignoring_sigint_is_ended_by_closing_its_input_leaving_nothing_in_the_container(
    box: Container, tmp_path: Path
) -> None:
    marker = f"ipython-mcp-test-{uuid.uuid4().hex}"
    async with connect(tmp_path, launchers=box.launchers(), interrupt_grace_s=SHORT_INTERRUPT_GRACE_S) as client:
        with anyio.fail_after(SLOW_S):
            pid = int((await run(client, "s", start_marked_child(marker), env="box"))["result"])
            assert pid in box.processes() and marked(marker), "the kernel and its marked child run in the container"
            stuck = await run(
                client, "s", "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(120)", timeout_s=1
            )
            await box.ended(pid, marker)
            fresh = await run(client, "s", "'x' in dir()")
    assert stuck["status"] == "timeout" and "killed" in (stuck["warning"] or ""), stuck
    assert fresh["result"] == "False" and "gone" in (fresh["warning"] or ""), fresh


@pytest.mark.parametrize("how", ["reset", "shutdown"])
async def test_podman_reset_and_shutdown_leave_no_process_in_the_container(box: Container, box_server: Client, how: str) -> None:
    marker = f"ipython-mcp-test-{uuid.uuid4().hex}"
    async with own_sessions(box_server) as client:
        with anyio.fail_after(SLOW_S):
            pid = int((await run(client, "s", start_marked_child(marker), env="box"))["result"])
            ended = await client.call_tool(how, {"session": "s"})
            assert not ended.is_error, ended
            await box.ended(pid, marker)


async def test_podman_client_killed_mid_cell_is_an_error_and_the_next_call_starts_fresh_leaving_nothing(
    box: Container, box_server: Client
) -> None:
    running = box.shared / f"running-{uuid.uuid4().hex}"
    marker = f"ipython-mcp-test-{uuid.uuid4().hex}"
    async with own_sessions(box_server) as client:
        with anyio.fail_after(SLOW_S):
            await run(client, "s", "x = 1", env="box")
            pid = int((await run(client, "s", start_marked_child(marker)))["result"])
            podman = (await client.call_tool("list_sessions", {})).structured_content["sessions"][0]["pid"]

            async def kill_when_running() -> None:
                await wait_for_file(running)
                os.kill(podman, signal.SIGKILL)

            async with anyio.create_task_group() as group:
                group.start_soon(kill_when_running)
                lost = await run(client, "s", f"{touch(running)}\nimport time\ntime.sleep(60)")
            await box.ended(pid, marker)
            again = await run(client, "s", "'x' in dir()")
    assert lost["status"] == "error" and f"podman exec -i {box.name}" in lost["error"], lost
    assert again["status"] == "ok" and again["result"] == "False" and "gone" in (again["warning"] or ""), again


async def test_server_killed_leaves_no_process_in_the_container(box: Container, tmp_path: Path) -> None:
    """SIGKILL: the server's own exit path does not run (on SIGTERM it ends its kernels as shutdown does)."""
    marker = f"ipython-mcp-test-{uuid.uuid4().hex}"
    config = tmp_path / "config.toml"  # the README's snippet
    config.write_text(f'[envs.box]\nlaunch = ["podman", "exec", "-i", "{box.name}"]\npython = "{PYTHON}"\n')
    parameters = StdioServerParameters(
        command=sys.executable, args=[str(SERVER), "--config", str(config), "--output-dir", str(tmp_path / marker)]
    )
    with anyio.fail_after(SLOW_S):
        with contextlib.suppress(Exception):
            async with Client(parameters) as client:
                pid = int((await run(client, "s", start_marked_child(marker), env="box"))["result"])
                servers = [found for found in marked(marker) if b"ipython_mcp" in Path(f"/proc/{found}/cmdline").read_bytes()]
                assert len(servers) == 1, servers
                os.kill(servers[0], signal.SIGKILL)
                await box.ended(pid, marker)
        await box.ended(pid, marker)


async def test_missing_container_is_an_env_error_quoting_podman(box: Container, box_server: Client) -> None:
    async with own_sessions(box_server) as client:
        with anyio.fail_after(QUICK_S):
            missing = await run(client, "s", "1", env="gone")
            envs = {env["name"]: env for env in (await client.call_tool("list_envs", {})).structured_content["envs"]}
    podman_said = f'no container with name or ID "{box.name}-gone" found'
    assert missing["status"] == "env_error" and podman_said in missing["error"], missing
    assert not envs["gone"]["usable"] and podman_said in envs["gone"]["problem"], envs["gone"]
