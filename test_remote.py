"""Sessions behind launchers: a real sshd on 127.0.0.1, bwrap, and a launcher that forwards no signal.

The sshd fixture makes a throwaway host key, user key and ssh_config in a temp folder, so
``ssh -F <cfg> testhost`` reaches this machine as this user without a prompt. The far
side is this machine too, which lets the tests look at its processes: each far-side
process a cell starts carries a marker in its command line, and none may be left once
the session ends, however it ends.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

import ipython_mcp
from conftest import POLL_S, QUICK_S, SERVER, SLOW_S, connect, own_sessions, process_running, run, touch, wait_for_file

pytestmark = pytest.mark.anyio

PYTHON = sys.executable  # the far side's Python: this venv's, which has IPython
# The interpreter this venv was made from: `python -m venv` of it makes an env without IPython.
BASE_PYTHON = os.path.join(sys.base_prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
# A Debian Python without IPython, for the missing-IPython error.
BARE_PYTHON = next(
    (
        path
        for path in ("/usr/bin/python3", "/usr/bin/python3.11")
        if os.path.exists(path) and subprocess.run([path, "-c", "import IPython"], capture_output=True, check=False).returncode != 0
    ),
    None,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Sshd:
    """A real sshd on 127.0.0.1 and an ssh_config whose ``testhost`` reaches it with a key."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = folder / "ssh_config"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def keygen(self, name: str) -> Path:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.folder / name)], check=True)
        return self.folder / name

    def start(self) -> None:
        host_key, user_key, wrong_key = self.keygen("host_key"), self.keygen("user_key"), self.keygen("wrong_key")
        shutil.copy(f"{user_key}.pub", self.folder / "authorized_keys")
        (self.folder / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {self.folder}/authorized_keys\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
            f"UsePAM no\nStrictModes no\nPidFile {self.folder}/sshd.pid\nLogLevel ERROR\nMaxStartups 100\nMaxSessions 100\n"
        )
        common = "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n  IdentitiesOnly yes\n"
        self.config.write_text(
            f"Host testhost 127.0.0.1\n  HostName 127.0.0.1\n  Port {self.port}\n  IdentityFile {user_key}\n{common}"
            f"Host wronghost\n  HostName 127.0.0.1\n  Port {self.port}\n  IdentityFile {wrong_key}\n{common}"
        )
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation folder sshd insists on
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        with open(self.folder / "sshd.log", "wb") as log:
            self.process = subprocess.Popen([sshd, "-D", "-e", "-f", str(self.folder / "sshd_config")], stderr=log)

    def ready(self) -> str | None:
        """None once ``ssh testhost`` runs a command; else why not."""
        said = ""
        for _ in range(200):
            if self.process is not None and self.process.poll() is not None:
                return f"sshd exited: {(self.folder / 'sshd.log').read_text()[-500:]}"
            done = subprocess.run(["ssh", "-F", str(self.config), "testhost", "true"], capture_output=True, text=True, check=False)
            if done.returncode == 0:
                return None
            said = done.stderr
            time.sleep(0.05)  # sshd is still starting: this fixture runs before any test's event loop
        return f"ssh testhost did not work: {said[-500:]}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def launchers(self, python: str = PYTHON, **more: ipython_mcp.LaunchedPython) -> ipython_mcp.LaunchConfig:
        """Env ``far`` (testhost), ``denied`` (a key sshd does not know), and ``more``."""
        ssh = ("ssh", "-F", str(self.config))
        envs = {
            "far": ipython_mcp.LaunchedPython((*ssh, "testhost"), python, "testhost"),
            "denied": ipython_mcp.LaunchedPython((*ssh, "wronghost"), python, "wronghost"),
            **more,
        }
        return ipython_mcp.LaunchConfig(envs=envs, ssh_command=ssh)


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    missing = [tool for tool in ("ssh", "ssh-keygen") if shutil.which(tool) is None]
    if missing or not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")):
        pytest.skip(f"needs OpenSSH (server and client; Debian: apt install openssh-server); missing: {missing or ['sshd']}")
    if os.geteuid() != 0:
        pytest.skip("sshd needs root here (privilege separation, /run/sshd)")
    server = Sshd(Path(tempfile.mkdtemp(prefix="ipython-mcp-sshd-")))
    try:
        server.start()
        problem = server.ready()
        if problem:
            pytest.skip(f"sshd could not run here: {problem}")
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture(scope="module")
async def ssh_server(sshd: Sshd, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """One in-memory server with the test host's launchers, for the tests that need no other config."""
    async with connect(tmp_path_factory.mktemp("ssh-server"), launchers=sshd.launchers()) as client:
        yield client


# The README's sandbox, plus this Python's own folders bound back (read-only) when a checkout
# under /tmp put them where the sandbox's fresh /tmp hides them.
BWRAP_SANDBOX = (
    "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
    *(
        argument
        for folder in sorted({sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))})
        if folder == "/tmp" or folder.startswith("/tmp/")
        for argument in ("--ro-bind", folder, folder)
    ),
    "--unshare-net", "--die-with-parent", "--",
)


@pytest.fixture(scope="module")
def bwrap() -> tuple[str, ...]:
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap (Debian: apt install bubblewrap)")
    tried = subprocess.run([*BWRAP_SANDBOX, "true"], capture_output=True, text=True, check=False)
    if tried.returncode != 0:
        pytest.skip(f"bwrap cannot make a sandbox here: {tried.stderr.strip()[-300:]}")
    return BWRAP_SANDBOX


def marked(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (the far side is this machine)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found


def start_marked_child(marker: str) -> str:
    """Cell code: a far-side child that would outlive its kernel, marked; the cell answers its kernel's pid."""
    return (
        "import os, subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}])\n"
        "os.getpid()"
    )


async def nothing_left(marker: str, kernel_pid: int) -> None:
    while marked(marker) or process_running(kernel_pid):
        await anyio.sleep(POLL_S)


# --- Over ssh ---------------------------------------------------------------------------------


async def test_ssh_session_keeps_state_prints_and_shows_an_image(sshd: Sshd, ssh_server: Client) -> None:
    async with own_sessions(ssh_server) as client:
        with anyio.fail_after(SLOW_S):
            first = await run(client, "s", "import socket\nx = 41\nprint('hello from', 'far')", env="far")
            second = await run(client, "s", "x + 1")
            image = await run(
                client, "s",
                "import io\nfrom PIL import Image as P\nfrom IPython.display import Image, display\n"
                "b = io.BytesIO(); P.new('RGB', (8, 8), 'teal').save(b, 'PNG'); display(Image(data=b.getvalue()))",
            )
            infos = (await client.call_tool("list_sessions", {})).structured_content["sessions"]
            envs = (await client.call_tool("list_envs", {})).structured_content["envs"]
            assert image["status"] == "ok" and len(image["images"]) == 1, image
            assert Path(image["images"][0]["path"]).is_file(), "the image is saved in the local output folder"
    assert first["status"] == "ok" and first["stdout"] == "hello from far\n", first
    assert second["result"] == "42", "state lives across calls over ssh"
    assert infos[0]["env"] == "far" and "testhost" in infos[0]["python"], infos
    far = next(env for env in envs if env["name"] == "far")
    assert far["usable"] and far["ipython_version"], far


async def test_ssh_huge_output_and_a_cut_result_are_saved_whole_in_the_local_folder(sshd: Sshd, tmp_path: Path) -> None:
    async with connect(tmp_path, launchers=sshd.launchers(), output_limit=10_000) as client:
        with anyio.fail_after(SLOW_S):
            printed = await run(client, "s", "print('x' * 3_000_000)", env="far")
            result = await run(client, "s", "'b' * 300_000")
            assert printed["status"] == "ok" and len(printed["stdout"]) < 20_000
            stdout_file = Path(printed["output_files"]["stdout"])
            assert stdout_file.read_text() == "x" * 3_000_000 + "\n"
            named = re.search(r"Full text: (\S+)", result["warning"] or "")
            assert named, result["warning"]
            result_file = Path(named.group(1))
            assert result_file.is_relative_to(tmp_path / "output"), result_file
            assert result_file.read_text() == repr("b" * 300_000), "the far side's full text came back through the wire"


async def test_ssh_timeout_interrupts_by_message_and_keeps_state(sshd: Sshd, ssh_server: Client) -> None:
    async with own_sessions(ssh_server) as client:
        with anyio.fail_after(SLOW_S):
            await run(client, "s", "x = 1", env="far")
            stopped = await run(client, "s", "import subprocess\nsubprocess.run(['sleep', '60'])", timeout_s=2)
            after = await run(client, "s", "x")
    assert stopped["status"] == "timeout" and "KeyboardInterrupt" in (stopped["error"] or ""), stopped
    assert after["result"] == "1", "an interrupt keeps the state"


async def test_ssh_cell_ignoring_sigint_is_ended_by_closing_the_connection_leaving_nothing(sshd: Sshd, tmp_path: Path) -> None:
    marker = f"ipython-mcp-test-{uuid.uuid4().hex}"
    async with connect(tmp_path, launchers=sshd.launchers(), interrupt_grace_s=1.0) as client:
        with anyio.fail_after(SLOW_S):
            pid = int((await run(client, "s", start_marked_child(marker), env="far"))["result"])
            assert marked(marker), "the marked child runs on the far side"
            stuck = await run(
                client, "s", "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(120)", timeout_s=2
            )
            await nothing_left(marker, pid)
            fresh = await run(client, "s", "'x' in dir()")
    assert stuck["status"] == "timeout" and "killed" in (stuck["warning"] or ""), stuck
    assert fresh["result"] == "False" and "gone" in (fresh["warning"] or ""), fresh


async def test_ssh_connection_killed_mid_cell_is_an_error_naming_the_host_and_the_next_call_reconnects(
    sshd: Sshd, ssh_server: Client, tmp_path: Path
) -> None:
    marker = tmp_path / "running"
    far_marker = f"ipython-mcp-test-{uuid.uuid4().hex}"
    async with own_sessions(ssh_server) as client:
        with anyio.fail_after(SLOW_S):
            await run(client, "s", "x = 1", env="far")
            pid = int((await run(client, "s", start_marked_child(far_marker)))["result"])
            ssh_pid = (await client.call_tool("list_sessions", {})).structured_content["sessions"][0]["pid"]

            async def kill_when_running() -> None:
                await wait_for_file(marker)
                os.kill(ssh_pid, signal.SIGKILL)

            async with anyio.create_task_group() as group:
                group.start_soon(kill_when_running)
                lost = await run(client, "s", f"{touch(marker)}\nimport time\ntime.sleep(60)")
            again = await run(client, "s", "'x' in dir()")
            await nothing_left(far_marker, pid)
    assert lost["status"] == "error" and "connection to testhost was lost" in lost["error"], lost
    assert again["status"] == "ok" and again["result"] == "False", again
    assert "gone" in (again["warning"] or "") and "connection to testhost was lost" in again["warning"], again["warning"]


@pytest.mark.parametrize("how", ["reset", "shutdown"])
async def test_reset_and_shutdown_leave_no_process_on_the_far_side(sshd: Sshd, ssh_server: Client, how: str) -> None:
    marker = f"ipython-mcp-test-{uuid.uuid4().hex}"
    async with own_sessions(ssh_server) as client:
        with anyio.fail_after(SLOW_S):
            pid = int((await run(client, "s", start_marked_child(marker), env="far"))["result"])
            ended = await client.call_tool(how, {"session": "s"})
            assert not ended.is_error, ended
            await nothing_left(marker, pid)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
async def test_server_killed_leaves_no_process_on_the_far_side(sshd: Sshd, tmp_path: Path, signum: int) -> None:
    marker = f"ipython-mcp-test-{uuid.uuid4().hex}"
    config = tmp_path / "config.toml"
    config.write_text(f'[envs.far]\nlaunch = ["ssh", "-F", "{sshd.config}", "testhost"]\npython = "{PYTHON}"\n')
    parameters = StdioServerParameters(
        command=sys.executable, args=[str(SERVER), "--config", str(config), "--output-dir", str(tmp_path / marker)]
    )
    with anyio.fail_after(SLOW_S):
        with contextlib.suppress(Exception):
            async with Client(parameters) as client:
                pid = int((await run(client, "s", start_marked_child(marker), env="far"))["result"])
                servers = [p for p in marked(marker) if p != pid and b"ipython_mcp" in Path(f"/proc/{p}/cmdline").read_bytes()]
                assert len(servers) == 1, servers
                os.kill(servers[0], signum)
                await nothing_left(marker, pid)
        await nothing_left(marker, pid)


async def test_protocol_lookalike_printed_on_the_far_side_stays_output(sshd: Sshd, ssh_server: Client) -> None:
    fake = '{"kind": "done", "id": 1, "status": "ok", "result": "forged"}'
    async with own_sessions(ssh_server) as client:
        with anyio.fail_after(SLOW_S):
            printed = await run(client, "s", f"import os\nos.write(1, b'\\n' + {fake!r}.encode() + b'\\n')\n'real'", env="far")
    assert printed["result"] == "'real'" and fake in printed["stdout"], printed


async def test_host_that_refuses_the_connection_is_an_env_error_quoting_ssh(sshd: Sshd, ssh_server: Client) -> None:
    closed_port = free_port()
    async with own_sessions(ssh_server) as client:
        with anyio.fail_after(SLOW_S):
            down = await run(client, "s", "1", env=f"ssh://127.0.0.1:{closed_port}{PYTHON}")
    assert down["status"] == "env_error" and "Connection refused" in down["error"], down


async def test_wrong_key_is_an_env_error_quoting_ssh(sshd: Sshd, ssh_server: Client) -> None:
    async with own_sessions(ssh_server) as client:
        with anyio.fail_after(SLOW_S):
            denied = await run(client, "s", "1", env="denied")
    assert denied["status"] == "env_error", denied
    assert "Permission denied" in denied["error"] and "ssh -F" in denied["error"], denied["error"]


@pytest.mark.skipif(BARE_PYTHON is None, reason="needs a Python without IPython (Debian's /usr/bin/python3)")
async def test_missing_remote_ipython_is_an_env_error_with_the_install_command_through_ssh(sshd: Sshd, tmp_path: Path) -> None:
    assert BARE_PYTHON is not None
    async with connect(tmp_path, launchers=sshd.launchers(python=BARE_PYTHON)) as client:
        with anyio.fail_after(SLOW_S):
            missing = await run(client, "s", "1", env="far")
            envs = (await client.call_tool("list_envs", {})).structured_content["envs"]
    assert missing["status"] == "env_error" and "IPython is not importable" in missing["error"], missing
    assert f"testhost '{BARE_PYTHON} -m pip install ipykernel'" in missing["error"], missing["error"]
    far = next(env for env in envs if env["name"] == "far")
    assert not far["usable"] and "pip install ipykernel" in far["problem"], far


def offline_ipykernel_wheel(folder: Path) -> Path:
    """A wheel named ipykernel whose one file is a .pth putting this venv's site-packages (with
    IPython) on the installing env's path: a real pip install, with no index and no network."""
    import base64
    import hashlib
    import sysconfig
    import zipfile

    files = {
        "ipykernel_offline.pth": sysconfig.get_paths()["purelib"] + "\n",
        "ipykernel-99.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: ipykernel\nVersion: 99.0\n",
        "ipykernel-99.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def digest(text: str) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{name},sha256={digest(text)},{len(text.encode())}\n" for name, text in files.items())
    files["ipykernel-99.0.dist-info/RECORD"] = record + "ipykernel-99.0.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "ipykernel-99.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


async def test_auto_install_runs_pip_through_ssh_and_the_session_starts(sshd: Sshd, tmp_path: Path) -> None:
    far = tmp_path / "far-env"  # a venv with pip (the base Python's bundled wheel, on its path) and no IPython
    await anyio.run_process([BASE_PYTHON, "-m", "venv", "--without-pip", str(far)])
    (bundled_pip,) = Path(sysconfig.get_paths(vars={"base": sys.base_prefix})["stdlib"], "ensurepip", "_bundled").glob("pip-*.whl")
    (site,) = far.glob("lib/python*/site-packages")
    (site / "bundled-pip.pth").write_text(f"{bundled_pip}\n")
    wheels = offline_ipykernel_wheel(tmp_path / "wheels")
    (far / "pip.conf").write_text(f"[global]\nno-index = true\nfind-links = {wheels.parent}\ndisable-pip-version-check = true\n")
    async with connect(tmp_path, launchers=sshd.launchers(python=str(far / "bin" / "python")), auto_install=True) as client:
        with anyio.fail_after(SLOW_S * 2):
            out = await run(client, "s", "import sys, IPython\nsys.prefix", env="far")
    assert out["status"] == "ok", out
    assert out["result"] == repr(str(far)), "the session runs in the far env"
    assert "ipykernel was installed into env 'far'" in (out["warning"] or ""), out["warning"]
    assert (site / "ipykernel-99.0.dist-info").is_dir(), "pip installed it on the far side"


async def test_missing_remote_python_is_an_env_error_quoting_the_far_shell(sshd: Sshd, tmp_path: Path) -> None:
    async with connect(tmp_path, launchers=sshd.launchers(python="/nowhere/bin/python")) as client:
        with anyio.fail_after(SLOW_S):
            missing = await run(client, "s", "1", env="far")
    assert missing["status"] == "env_error" and "/nowhere/bin/python" in missing["error"], missing
    assert "not found" in missing["error"] or "No such file" in missing["error"], missing["error"]


async def test_ssh_url_shorthand_runs_a_session_with_port_and_user(sshd: Sshd, ssh_server: Client) -> None:
    user = getpass.getuser()
    prefix = Path(PYTHON).parent.parent
    async with own_sessions(ssh_server) as client:
        with anyio.fail_after(SLOW_S):
            plain = await run(client, "a", "1 + 1", env=f"ssh://testhost{prefix}")
            full = await run(client, "b", "2 + 2", env=f"ssh://{user}@127.0.0.1:{sshd.port}{PYTHON}")
    assert plain["result"] == "2" and full["result"] == "4", (plain, full)


@pytest.mark.parametrize(
    "env",
    [
        "ssh://-oProxyCommand=touch${IFS}/tmp/pwned/x",
        "ssh://host/-x",
        "ssh://-l/x",
        "ssh://host;touch /tmp/pwned/x",
        "ssh://host/x;touch /tmp/pwned",
        "ssh://host/$(touch /tmp/pwned)",
        "ssh://host/`touch /tmp/pwned`",
        "ssh://host/x\ntouch /tmp/pwned",
        "ssh://host/x'y",
        "ssh://us er@host/x",
        "ssh://-oProxyCommand=x@host/x",
        "ssh://host:22;x/x",
    ],
)
async def test_ssh_url_that_smuggles_options_or_commands_is_refused(shared_server: Client, tmp_path: Path, env: str) -> None:
    with pytest.raises(ipython_mcp.EnvError) as refused:
        ipython_mcp.interpreter_for(env, tmp_path)
    assert refused.value.kind == "bad_name"
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            result = await run(client, "s", "1", env=env)
    assert result["status"] == "env_error", result
    assert not (tmp_path / "pwned").exists()


# --- Local launchers: bwrap, and one that forwards no signal ----------------------------------


async def test_bwrap_sandbox_cannot_write_home_or_reach_the_network_and_runs_cells(bwrap: tuple[str, ...], tmp_path: Path) -> None:
    sandbox = ipython_mcp.LaunchedPython(bwrap, PYTHON)
    target = Path.home() / f"ipython-mcp-sandbox-test-{os.getpid()}"  # a name of this run's own
    try:
        async with connect(tmp_path, launchers=ipython_mcp.LaunchConfig(envs={"sandbox": sandbox})) as client:
            with anyio.fail_after(SLOW_S):
                state = await run(client, "s", "x = 20\nprint('in the box')", env="sandbox")
                # Without a sandboxed session the next cells would start one in the default env.
                assert state["status"] == "ok" and state["stdout"] == "in the box\n" and state["stderr"] == "", state
                write = await run(client, "s", f"open({str(target)!r}, 'w')", env="sandbox")
                network = await run(client, "s", "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=5)", env="sandbox")
                after = await run(client, "s", "x * 2", env="sandbox")
        assert write["status"] == "error" and "Read-only file system" in write["error"], write
        assert network["status"] == "error" and "Network is unreachable" in network["error"], network
        assert after["result"] == "40"
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


async def test_launcher_that_forwards_no_signal_is_interrupted_by_message_children_too(tmp_path: Path) -> None:
    if shutil.which("setsid") is None:
        pytest.skip("needs setsid (util-linux)")
    # setsid -w: the kernel in a session of its own, which no signal to the launcher reaches.
    wrapper = ipython_mcp.LaunchedPython(("setsid", "-w"), PYTHON)
    marker = tmp_path / "running"
    async with connect(tmp_path, launchers=ipython_mcp.LaunchConfig(envs={"nosignals": wrapper})) as client:
        with anyio.fail_after(SLOW_S):
            await run(client, "s", "x = 3", env="nosignals")

            async def interrupt_when_running() -> None:
                await wait_for_file(marker)
                await client.call_tool("interrupt", {"session": "s"})

            async with anyio.create_task_group() as group:
                group.start_soon(interrupt_when_running)
                stopped = await run(client, "s", f"{touch(marker)}\nimport subprocess\nsubprocess.run(['sleep', '60'])")
            after = await run(client, "s", "x")
    assert stopped["status"] == "error" and "KeyboardInterrupt" in stopped["error"], stopped
    assert stopped["duration_s"] < 30
    assert after["result"] == "3"


# --- Docker, Kubernetes: argument building and a missing binary -------------------------------


def test_launch_argv_of_each_launcher() -> None:
    loader = ipython_mcp.KERNEL_LOADER
    docker = ipython_mcp.LaunchedPython(("docker", "exec", "-i", "analysis"), "python3")
    kubectl = ipython_mcp.LaunchedPython(("kubectl", "exec", "-i", "pod/lab", "--"), "/opt/conda/bin/python")
    ssh = ipython_mcp.LaunchedPython(("ssh", "gpu-box"), "~/envs/torch/bin/python", "gpu-box")
    assert docker.argv("-u", "-c", loader) == ["docker", "exec", "-i", "analysis", "python3", "-u", "-c", loader]
    assert kubectl.argv("-u", "-c", loader) == ["kubectl", "exec", "-i", "pod/lab", "--", "/opt/conda/bin/python", "-u", "-c", loader]
    remote = ssh.argv("-u", "-c", loader)
    assert remote[:2] == ["ssh", "gpu-box"] and len(remote) == 3, "one command string for the far side's shell"
    assert remote[2].startswith("exec ~/envs/torch/bin/python -u -c '"), remote[2]
    assert ssh.command_text("-m", "pip", "install", "ipykernel") == "ssh gpu-box '~/envs/torch/bin/python -m pip install ipykernel'"
    url = ipython_mcp.ssh_url_python("ssh://me@gpu-box:2222/home/me/envs/torch")
    assert url.launch == ("ssh", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-p", "2222", "-l", "me", "--", "gpu-box")
    assert url.python == "/home/me/envs/torch/bin/python"


def test_missing_ipython_over_a_launcher_installs_through_that_launcher() -> None:
    ssh = ipython_mcp.LaunchedPython(("ssh", "gpu-box"), "~/envs/torch/bin/python", "gpu-box")
    problem = ipython_mcp.hello_problem({"protocol": ipython_mcp.KERNEL_PROTOCOL_VERSION, "missing": "ipython", "error": "ModuleNotFoundError", "pip": True}, "gpu", ssh)
    assert problem is not None and problem.kind == "missing_ipython"
    assert problem.plan is not None and problem.plan.argv == ("ssh", "gpu-box", "exec ~/envs/torch/bin/python -m pip install ipykernel")
    assert problem.hint == "Install with: ssh gpu-box '~/envs/torch/bin/python -m pip install ipykernel'"
    assert ipython_mcp.hello_problem({"kind": "hello", "protocol": ipython_mcp.KERNEL_PROTOCOL_VERSION, "ipython": "9.0"}, "gpu", ssh) is None


@pytest.mark.parametrize(("program", "how"), [("docker", "install Docker"), ("kubectl", "install kubectl")])
async def test_missing_launcher_binary_is_an_env_error_saying_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, program: str, how: str
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    box = ipython_mcp.LaunchedPython((program, "exec", "-i", "analysis"), "python3")
    async with connect(tmp_path, launchers=ipython_mcp.LaunchConfig(envs={"box": box})) as client:
        with anyio.fail_after(QUICK_S):
            missing = await run(client, "s", "1", env="box")
            envs = (await client.call_tool("list_envs", {})).structured_content["envs"]
    assert missing["status"] == "env_error" and f"`{program}`" in missing["error"] and how in missing["error"], missing
    listed = next(env for env in envs if env["name"] == "box")
    assert not listed["usable"] and how in listed["problem"], listed


# --- The config file ------------------------------------------------------------------------------


def test_config_file_names_envs_and_bad_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    good = tmp_path / "config.toml"
    good.write_text(
        'ssh_command = ["ssh", "-F", "/x/ssh_config"]\n'
        '[envs.gpu]\nlaunch = ["ssh", "gpu-box"]\npython = "~/envs/torch/bin/python"\n'
        '[envs.box]\nlaunch = ["docker", "exec", "-i", "analysis"]\npython = "python3"\n'
    )
    config = ipython_mcp.load_launch_config(good)
    assert config.envs["gpu"] == ipython_mcp.LaunchedPython(("ssh", "gpu-box"), "~/envs/torch/bin/python", "gpu-box")
    assert config.envs["box"].argv("-V") == ["docker", "exec", "-i", "analysis", "python3", "-V"]
    assert ipython_mcp.interpreter_for("gpu", tmp_path, config) == ("gpu", config.envs["gpu"])
    assert ipython_mcp.load_launch_config(tmp_path / "absent.toml").envs == {}, "no file, no envs"
    for text, says in (
        ("[envs.gpu]\nlaunch = 'ssh gpu-box'\n", "launch must be a non-empty list"),
        ("[envs.gpu\n", "not valid TOML"),
        ('[envs."a b"]\nlaunch = ["ssh", "x"]\n', "env name"),
    ):
        good.write_text(text)
        with pytest.raises(ipython_mcp.ConfigError, match=says):
            ipython_mcp.load_launch_config(good)
    with pytest.raises(ipython_mcp.ConfigError, match="Cannot read"):
        ipython_mcp.load_launch_config(tmp_path / "absent.toml", required=True)


def test_default_config_path_follows_the_variable_and_xdg() -> None:
    assert ipython_mcp.config_path_default({"IPYTHON_MCP_CONFIG": "/a/b.toml"}) == Path("/a/b.toml")
    assert ipython_mcp.config_path_default({"XDG_CONFIG_HOME": "/c"}) == Path("/c/ipython-mcp/config.toml")


def test_server_refuses_to_start_with_a_config_file_it_cannot_use(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("[envs.gpu]\nlaunch = 'ssh gpu-box'\n")
    for path, says in ((tmp_path / "absent.toml", "Cannot read the config file"), (bad, "launch must be a non-empty list")):
        done = subprocess.run(
            [sys.executable, str(SERVER), "--config", str(path)], capture_output=True, text=True, timeout=SLOW_S,
            stdin=subprocess.DEVNULL, check=False,
        )
        assert done.returncode != 0 and says in done.stderr, done.stderr
