"""The server over MCP streamable HTTP (``--transport http``), as a real process on 127.0.0.1.

Tool flows go through the SDK's own streamable HTTP client, in both protocol eras it speaks:
``auto`` (the 2026 single-exchange requests, which this SDK's server offers) and ``legacy``
(the initialize handshake and ``Mcp-Session-Id`` that most clients of today use). Refusals
are plain HTTP requests (httpx2, which mcp brings) or raw bytes on a socket, so every status
and header is the server's own. Most tests share one server (their sessions have their own
names); the tests of start-up options and of SIGTERM start their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

import ipython_mcp
from conftest import POLL_S, QUICK_S, SERVER, SLOW_S, run, sessions, text_of, touch, wait_for_file, wait_until_gone

pytestmark = pytest.mark.anyio

TOKEN = "test-token-0123456789abcdef"
BANNER = re.compile(r"serving MCP over HTTP at (http://\S+)")
START_S = 60  # a server process that imports the SDK on a loaded machine
PROXIED = "mcp.example.com"  # the name a TLS proxy in front forwards as Host (README: Over HTTP)
MODES = ["auto", "legacy"]  # the 2026 single-exchange protocol, and the initialize handshake


@dataclasses.dataclass
class HttpServer:
    process: subprocess.Popen[bytes]
    url: str
    stderr: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def output(self) -> str:
        return self.stderr.read_text(errors="replace")


def server_env(tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path / "runtime"))
    (tmp_path / "runtime").mkdir(mode=0o700, exist_ok=True)
    env.pop("IPYTHON_MCP_TOKEN", None)
    env.pop("MCP_TOOL_TIMEOUT", None)
    if token is not None:
        env["IPYTHON_MCP_TOKEN"] = token
    return env


def start_server(tmp_path: Path, *args: str, token: str | None = TOKEN, port: bool = True) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(SERVER), "--transport", "http", *(["--port", "0"] if port else [])]
    command += ["--envs-dir", str(tmp_path / "no-envs"), "--output-dir", str(tmp_path / "output"), "--spare-kernels", "0", *args]
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=server_env(tmp_path, token))


def wait_for_banner(process: subprocess.Popen[bytes], stderr: Path) -> str:
    """The URL the server printed; bounded, and failing with its stderr if it exited instead."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        found = BANNER.search(stderr.read_text(errors="replace"))
        if found:
            return found.group(1)
        assert process.poll() is None, f"the server exited ({process.returncode}): {stderr.read_text()}"
        time.sleep(POLL_S)
    raise AssertionError(f"no URL printed within {START_S} s: {stderr.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextlib.contextmanager
def http_server(tmp_path: Path, *args: str, token: str | None = TOKEN, port: bool = True) -> Iterator[HttpServer]:
    process = start_server(tmp_path, *args, token=token, port=port)
    try:
        yield HttpServer(process, wait_for_banner(process, tmp_path / "stderr.txt"), tmp_path / "stderr.txt")
    finally:
        stop(process)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """One server for the tests that do not stop or reconfigure it."""
    with http_server(tmp_path_factory.mktemp("http"), "--allow-host", PROXIED) as shared:
        yield shared


@contextlib.asynccontextmanager
async def mcp_client(url: str, mode: str = "auto", token: str | None = TOKEN) -> AsyncIterator[Client]:
    """The SDK's streamable HTTP client with the bearer token on every request."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300))
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        yield client


def post_headers(token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **extra}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw-test", "version": "0"}},
}


def sse_messages(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and line[5:].strip()]


async def raw_exchange(port: int, head: bytes) -> bytes:
    """Send a request head (no body) on a fresh connection and return the response's status line and headers."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(head)
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive()
    return received


def status_of(response_head: bytes) -> int:
    return int(response_head.split(b" ", 2)[1])


async def still_serves(url: str) -> None:
    async with mcp_client(url) as client:
        assert (await run(client, "after-refusals", "6 * 7"))["result"] == "42"


# --- Tool flows through the SDK's client -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_execute_keeps_state_and_returns_images_over_http(server: HttpServer, mode: str) -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
    with anyio.fail_after(SLOW_S):
        async with mcp_client(server.url, mode) as client:
            await run(client, f"state-{mode}", "x = 20")
            assert (await run(client, f"state-{mode}", "x + 22"))["result"] == "42"
            result = await client.call_tool("execute", {"session": f"state-{mode}", "code": code})
    assert not result.is_error, text_of(result)
    images = [block for block in result.content if block.type == "image"]
    assert [image.mime_type for image in images] == ["image/png"]
    assert result.structured_content["images"][0]["mime_type"] == "image/png"


@pytest.mark.parametrize("mode", MODES)
async def test_progress_notifications_arrive_over_sse(server: HttpServer, mode: str) -> None:
    messages: list[str] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    code = "import time\nfor i in range(4):\n    print(f'step {i}', flush=True)\n    time.sleep(0.6)\n'done'"
    with anyio.fail_after(QUICK_S):
        async with mcp_client(server.url, mode) as client:
            result = await client.call_tool("execute", {"session": f"progress-{mode}", "code": code}, progress_callback=progress)
    assert result.structured_content["result"] == "'done'"
    assert any("step" in message for message in messages), messages


async def test_wait_follows_a_cell_left_running_over_sse(server: HttpServer, tmp_path: Path) -> None:
    release = tmp_path / "release"
    code = f"import os, time\nprint('started', flush=True)\nwhile not os.path.exists({str(release)!r}): time.sleep(0.05)\nprint('finished')\n'result'"
    messages: list[str] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")
        release.touch()  # the wait is under way and reporting: let the cell end

    with anyio.fail_after(QUICK_S):
        async with mcp_client(server.url) as client:
            first = await run(client, "waiting", code, timeout_s=1, on_timeout="continue")
            assert first["status"] == "running"
            waited = await client.call_tool("wait", {"session": "waiting", "timeout_s": 20}, progress_callback=progress)
    assert waited.structured_content["status"] == "ok", text_of(waited)
    assert waited.structured_content["result"] == "'result'"
    assert "finished" in waited.structured_content["stdout"]
    assert messages, "wait reported progress while the cell ran"


@pytest.mark.parametrize("mode", MODES)
async def test_cancelled_call_interrupts_the_cell_over_http(server: HttpServer, tmp_path: Path, mode: str) -> None:
    running, interrupted = tmp_path / "running", tmp_path / "interrupted"
    code = f"import time\ntry:\n    {touch(running)}\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    {touch(interrupted)}\n    raise"
    session = f"cancel-{mode}"
    with anyio.fail_after(QUICK_S):
        async with mcp_client(server.url, mode) as client:
            await run(client, session, "kept = 'yes'")
            async with anyio.create_task_group() as group:
                group.start_soon(run, client, session, code)
                await wait_for_file(running)
                group.cancel_scope.cancel()
            await wait_for_file(interrupted)
            after = await run(client, session, "kept")
    assert after["result"] == "'yes'"


async def test_client_that_disconnects_mid_call_gets_its_cell_interrupted(server: HttpServer, tmp_path: Path) -> None:
    """A legacy (Mcp-Session-Id) client that drops its connection: nothing tells the SDK, the server notices."""
    running, interrupted = tmp_path / "running", tmp_path / "interrupted"
    code = f"kept = 5\nimport time\ntry:\n    {touch(running)}\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    {touch(interrupted)}\n    raise"
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "execute", "arguments": {"session": "dropped", "code": code}}}
    with anyio.fail_after(QUICK_S):
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=300)) as http:
            opened = await http.post(server.url, json=INITIALIZE, headers=post_headers())
            assert opened.status_code == 200, opened.text
            headers = post_headers(**{"Mcp-Session-Id": opened.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-06-18"})
            initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
            assert (await http.post(server.url, json=initialized, headers=headers)).status_code == 202
            async with http.stream("POST", server.url, json=call, headers=headers) as response:
                assert response.status_code == 200
                await wait_for_file(running)
            # Leaving the block closes the connection with the call still running.
        await wait_for_file(interrupted)
        async with mcp_client(server.url) as client:
            after = await run(client, "dropped", "kept")
    assert after["result"] == "5"


async def test_two_clients_share_one_session_and_see_each_others_variables(server: HttpServer) -> None:
    with anyio.fail_after(QUICK_S):
        async with mcp_client(server.url, "auto") as first, mcp_client(server.url, "legacy") as second:
            await run(first, "pair", "shared = 41")
            seen = await run(second, "pair", "shared + 1")
            pid_first = (await run(first, "pair", "import os; os.getpid()"))["result"]
            pid_second = (await run(second, "pair", "os.getpid()"))["result"]
            listed = await sessions(second)
    assert seen["result"] == "42"
    assert pid_first == pid_second
    assert listed["pair"]["exec_count"] == 4


# --- Refusals, as plain HTTP -------------------------------------------------------------------


async def test_requests_without_the_right_token_get_401_with_no_detail(server: HttpServer) -> None:
    variants = {
        "no header": None,
        "wrong token": "Bearer " + "x" * len(TOKEN),
        "token prefix": "Bearer " + TOKEN[:-1],
        "token plus more": "Bearer " + TOKEN + "x",
        "another scheme": "Basic " + TOKEN,
        "bare scheme": "Bearer",
    }
    answers = {}
    with anyio.fail_after(QUICK_S):
        async with httpx2.AsyncClient(timeout=30) as http:
            for name, authorization in variants.items():
                headers = post_headers(token=None)
                if authorization is not None:
                    headers["Authorization"] = authorization
                answers[name] = await http.post(server.url, json=INITIALIZE, headers=headers)
        await still_serves(server.url)
    for name, answer in answers.items():
        assert answer.status_code == 401, name
        assert "mcp-session-id" not in answer.headers, name
    bodies = {answer.text for answer in answers.values()}
    assert len(bodies) == 1, "every refusal reads the same, whatever was wrong"
    assert TOKEN[:8] not in bodies.pop()


async def test_wrong_host_gets_421_and_another_origin_403_even_with_the_token(server: HttpServer) -> None:
    port = server.port
    with anyio.fail_after(QUICK_S):
        async with httpx2.AsyncClient(timeout=30) as http:
            rebound = await http.post(server.url, json=INITIALIZE, headers=post_headers(Host=f"attacker.example:{port}"))
            other_port = await http.post(server.url, json=INITIALIZE, headers=post_headers(Origin=f"http://localhost:{port + 1}"))
            other_site = await http.post(server.url, json=INITIALIZE, headers=post_headers(Origin="https://attacker.example"))
            same_origin = await http.post(server.url, json=INITIALIZE, headers=post_headers(Origin=f"http://127.0.0.1:{port}"))
        await still_serves(server.url)
    assert rebound.status_code == 421
    assert other_port.status_code == 403
    assert other_site.status_code == 403
    assert same_origin.status_code == 200, same_origin.text


async def test_a_name_given_with_allow_host_is_accepted_as_a_tls_proxy_forwards_it(server: HttpServer) -> None:
    with anyio.fail_after(QUICK_S):
        async with httpx2.AsyncClient(timeout=30) as http:
            proxied = await http.post(server.url, json=INITIALIZE, headers=post_headers(Host=PROXIED, Origin=f"https://{PROXIED}"))
            other = await http.post(server.url, json=INITIALIZE, headers=post_headers(Host=f"other.{PROXIED}"))
    assert proxied.status_code == 200, proxied.text
    assert other.status_code == 421


async def test_oversized_body_is_refused_without_being_read_whole(server: HttpServer) -> None:
    limit = ipython_mcp.HTTP_BODY_LIMIT_BYTES
    port = server.port
    head = (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\n"
    )
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    with anyio.fail_after(QUICK_S):
        # A declared size over the limit: refused before a byte of the body is sent.
        declared = await raw_exchange(port, f"{head}{auth}Content-Length: {100 * limit}\r\n\r\n".encode())
        unauthenticated = await raw_exchange(port, f"{head}Content-Length: {100 * limit}\r\n\r\n".encode())
        # No declared size (chunked): refused once the bytes that came in pass the limit.
        sent = 0
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(f"{head}{auth}Transfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b"x" * (1024 * 1024)
            framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
            async with anyio.create_task_group() as group:

                async def send_forever() -> None:
                    nonlocal sent
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        while sent < 8 * limit:
                            await stream.send(framed)
                            sent += len(chunk)

                group.start_soon(send_forever)
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive()
                sent_when_refused = sent
                group.cancel_scope.cancel()
        await still_serves(server.url)
    assert status_of(declared) == 413
    assert status_of(unauthenticated) == 401, "no body is read before the token is checked"
    assert status_of(answer) == 413
    assert sent_when_refused < 8 * limit, "refused while the client was still sending, not after buffering it all"


@pytest.mark.parametrize("era", ["2025-06-18", "2026-07-28"])
async def test_malformed_requests_get_a_clear_error_while_other_clients_keep_being_served(
    server: HttpServer, tmp_path: Path, era: str
) -> None:
    running, release = tmp_path / "running", tmp_path / "release"
    waits = f"{touch(running)}\nimport os, time\nwhile not os.path.exists({str(release)!r}): time.sleep(0.02)\n'still here'"
    headers = post_headers(**{"MCP-Protocol-Version": era}) if era != "2025-06-18" else post_headers()
    with anyio.fail_after(QUICK_S):
        async with mcp_client(server.url) as client, httpx2.AsyncClient(timeout=30) as http, anyio.create_task_group() as group:
            results: dict[str, Any] = {}

            async def busy_client() -> None:
                results["busy"] = await run(client, f"busy-{era}", waits)

            group.start_soon(busy_client)
            await wait_for_file(running)
            garbage = await http.post(server.url, content=b"{this is not json", headers=headers)
            not_rpc = await http.post(server.url, content=b'{"hello": "world"}', headers=headers)
            not_json_type = await http.post(server.url, content=b"{}", headers={**headers, "Content-Type": "text/plain"})
            wrong_method = await http.put(server.url, content=b"{}", headers=headers)
            release.touch()  # the other client's cell ran through all of it
        await still_serves(server.url)
    assert results["busy"]["result"] == "'still here'"
    assert garbage.status_code == 400
    assert garbage.json()["error"]["code"] == -32700  # JSON-RPC parse error
    assert 400 <= not_rpc.status_code < 500
    assert "error" in not_rpc.json()
    assert 400 <= not_json_type.status_code < 500
    assert 400 <= wrong_method.status_code < 500


# --- Start-up options, each with its own server ------------------------------------------------


def run_to_exit(tmp_path: Path, *args: str, token: str | None = TOKEN) -> tuple[int, str]:
    process = start_server(tmp_path, *args, token=token)
    try:
        returncode = process.wait(timeout=START_S)
    finally:
        stop(process)
    return returncode, (tmp_path / "stderr.txt").read_text()


def test_no_auth_with_a_non_loopback_host_is_refused_at_start(tmp_path: Path) -> None:
    returncode, stderr = run_to_exit(tmp_path, "--host", "0.0.0.0", "--no-auth", token=None)
    assert returncode == 2
    assert "--no-auth is refused" in stderr
    assert "serving" not in stderr


def test_a_short_token_is_refused_at_start(tmp_path: Path) -> None:
    returncode, stderr = run_to_exit(tmp_path, token="short")
    assert returncode == 2
    assert "IPYTHON_MCP_TOKEN must be at least 16 characters" in stderr


def test_a_runtime_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "runtime" / "ipython-mcp"
    planted.mkdir(parents=True)
    planted.chmod(0o777)
    returncode, stderr = run_to_exit(tmp_path, token=None)
    assert returncode == 2
    assert f"Refusing the runtime folder {planted}" in stderr
    assert list(planted.iterdir()) == []


def test_the_runtime_folder_is_never_a_symlink_and_is_made_private(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "ipython-mcp").symlink_to(elsewhere)
    with pytest.raises(ipython_mcp.HttpSetupError, match="not a symlink"):
        ipython_mcp.private_runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path / "planted")})
    (tmp_path / "ours" / "ipython-mcp").mkdir(parents=True, mode=0o755)
    folder = ipython_mcp.private_runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path / "ours")})
    assert folder == tmp_path / "ours" / "ipython-mcp"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


async def test_generated_token_is_printed_once_saved_privately_and_required(tmp_path: Path) -> None:
    with http_server(tmp_path, token=None, port=False) as server:  # no --port: a free one, printed
        stderr = server.output()
        token = re.search(r"Bearer token \(shown once; also in (\S+), mode 0600\): (\S+)", stderr)
        assert token is not None, stderr
        path, value = Path(token.group(1)), token.group(2)
        assert path == tmp_path / "runtime" / "ipython-mcp" / f"http-{server.port}.token"
        assert stderr.count(value) == 1
        assert path.read_text().strip() == value
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        with anyio.fail_after(QUICK_S):
            async with httpx2.AsyncClient(timeout=30) as http:
                refused = await http.post(server.url, json=INITIALIZE, headers=post_headers(token=TOKEN))
            async with mcp_client(server.url, token=value) as client:
                assert (await run(client, "s", "1 + 1"))["result"] == "2"
    assert refused.status_code == 401
    assert not path.exists(), "the token file goes with the server"


async def test_no_auth_on_loopback_warns_loudly_and_still_refuses_other_origins(tmp_path: Path) -> None:
    with http_server(tmp_path, "--no-auth", token=None) as server:
        assert "WARNING: --no-auth" in server.output()
        with anyio.fail_after(QUICK_S):
            async with mcp_client(server.url, token=None) as client:
                assert (await run(client, "s", "1 + 1"))["result"] == "2"
            async with httpx2.AsyncClient(timeout=30) as http:
                page = await http.post(server.url, json=INITIALIZE, headers=post_headers(token=None, Origin=f"http://localhost:{server.port + 1}"))
                rebound = await http.post(server.url, json=INITIALIZE, headers=post_headers(token=None, Host=f"attacker.example:{server.port}"))
    assert page.status_code == 403
    assert rebound.status_code == 421


async def test_a_non_loopback_bind_needs_its_token_and_warns_about_tls(tmp_path: Path) -> None:
    with http_server(tmp_path, "--host", "0.0.0.0") as server:
        assert re.search(r"WARNING: listening on 0\.0\.0\.0:\d+.*unencrypted unless a TLS proxy", server.output())
        local = f"http://127.0.0.1:{server.port}/mcp"
        with anyio.fail_after(QUICK_S):
            async with httpx2.AsyncClient(timeout=30) as http:
                refused = await http.post(local, json=INITIALIZE, headers=post_headers(token=None))
            async with mcp_client(local) as client:
                assert (await run(client, "s", "1 + 1"))["result"] == "2"
    assert refused.status_code == 401


async def test_sigterm_ends_every_kernel_of_an_http_server(tmp_path: Path) -> None:
    running = tmp_path / "running"
    with http_server(tmp_path) as server, anyio.fail_after(SLOW_S):
        async with mcp_client(server.url, "auto") as first, mcp_client(server.url, "legacy") as second:
            kernels = [int((await run(first, "a", "import os; os.getpid()"))["result"])]
            kernels.append(int((await run(second, "b", "import os; os.getpid()"))["result"]))
            async with anyio.create_task_group() as group:

                async def long_cell() -> None:
                    with contextlib.suppress(Exception):  # the server may be gone before it answers
                        await run(second, "b", f"{touch(running)}\nimport time\ntime.sleep(60)")

                group.start_soon(long_cell)
                await wait_for_file(running)
                server.process.send_signal(signal.SIGTERM)
                for pid in kernels:
                    await wait_until_gone(pid)
                while server.process.poll() is None:
                    await anyio.sleep(POLL_S)
                group.cancel_scope.cancel()
    assert server.process.returncode == 0


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, str(SERVER), "--transport", "http", "--port", str(port), "--spare-kernels", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=server_env(tmp_path),
        )
        _, stderr = process.communicate(timeout=START_S)
    assert process.returncode == 2
    assert f"Cannot listen on 127.0.0.1:{port}" in stderr.decode()
