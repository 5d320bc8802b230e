"""The wire (issue 11): only the kernel speaks the protocol, on fds a cell cannot take by accident.

A cell that closes or reuses the kernel's private fds (``os.closerange(3, 65536)``, ``os.close``,
``os.dup2``) makes the kernel stop and be reported dead at once: no protocol line ever lands in the
user's file, no call hangs. A cell that forks gets its own answer, never its child's. An env that
prints at start (a ``sitecustomize`` banner without a newline) still starts, and a start error
quotes what it printed. File names that are not UTF-8 reach replies escaped, and the server keeps
answering. Real kernels throughout; the server runs as a real process over stdio where its
survival is the point.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from mcp import Client

import ipython_mcp
from conftest import QUICK_S, SLOW_S, assert_usable, connect, own_sessions, run, sessions, stdio_parameters, text_of

# A kernel that lost its protocol fd is reported dead well before this; the cells' own
# timeout_s is far longer, so an answer within it cannot come from a timeout.
DIES_WITHIN_S = 15
CELL_TIMEOUT_S = 120
# A call after a fork answers as fast as any other call: far below the cell timeout.
NEXT_CALL_WITHIN_S = 10

pytestmark = pytest.mark.anyio

# The fd the kernel writes its protocol to, found the way only a test would look for it.
FIND_PROTOCOL_FD = (
    "import gc, os\n"
    "wire = next(o for o in gc.get_objects() if type(o).__name__ == 'Wire')\n"
    "proto = wire.fd\n"
    "proto_in = next(fd for fd, name in wire.private.names.items() if name == 'protocol input pipe')\n"
)


async def assert_reported_dead(client: Client, session: str, out: dict, elapsed: float) -> None:
    """The call answered at once that the kernel died, why, and the next call starts afresh."""
    assert out["status"] == "error", out
    assert "exit code 76" in out["error"], out["error"]
    assert "the kernel stopped rather than write its protocol" in out["error"] + out["stderr"], out
    assert elapsed < DIES_WITHIN_S, elapsed
    assert (await sessions(client))[session]["status"] == "dead"
    after = await run(client, session, "1+1")
    assert (after["status"], after["result"]) == ("ok", "2"), after
    assert "fresh kernel" in (after["warning"] or ""), after


async def timed(client: Client, session: str, code: str) -> tuple[dict, float]:
    started = time.monotonic()
    out = await run(client, session, code, timeout_s=CELL_TIMEOUT_S)
    return out, time.monotonic() - started


# --- Protocol fds: out of the user's way, checked before use ---------------------------------------


async def test_protocol_fds_sit_high_above_the_fds_a_cell_opens(shared_server: Client) -> None:
    code = FIND_PROTOCOL_FD + "f = open(os.devnull)\n(proto, proto_in, f.fileno())"
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", code)
    proto, proto_in, opened = eval(out["result"])
    assert min(proto, proto_in) > 900 > opened, out["result"]


async def test_closerange_then_open_reports_the_kernel_dead_and_never_writes_the_users_file(shared_server: Client, tmp_path: Path) -> None:
    mine = tmp_path / "mine.txt"
    code = f"import os\nos.closerange(3, 65536)\nf = open({str(mine)!r}, 'w')\nprint('closed them all')"
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(SLOW_S):
            await assert_usable(client, "s")
            out, elapsed = await timed(client, "s", code)
            await assert_reported_dead(client, "s", out, elapsed)
    assert mine.read_bytes() == b""
    assert "closed them all" in out["stdout"]


async def test_closing_the_protocol_fd_then_opening_a_file_reports_the_kernel_dead(shared_server: Client, tmp_path: Path) -> None:
    mine = tmp_path / "mine.txt"
    code = FIND_PROTOCOL_FD + f"os.close(proto)\nf = open({str(mine)!r}, 'w')\nf.write('mine')\nf.flush()"
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(SLOW_S):
            out, elapsed = await timed(client, "s", code)
            await assert_reported_dead(client, "s", out, elapsed)
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("target", ["proto", "proto_in"])
async def test_a_user_file_dup2ed_onto_a_protocol_fd_is_never_written_or_read(shared_server: Client, tmp_path: Path, target: str) -> None:
    mine = tmp_path / "mine.txt"
    mine.write_text('{"kind": "execute", "id": 99, "code": "1"}\n')  # a request, were it read as one
    code = FIND_PROTOCOL_FD + f"fd = os.open({str(mine)!r}, os.O_RDWR)\nos.dup2(fd, {target})\n'replaced'"
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(SLOW_S):
            out, elapsed = await timed(client, "s", code)
            await assert_reported_dead(client, "s", out, elapsed)
    assert mine.read_text() == '{"kind": "execute", "id": 99, "code": "1"}\n'


async def test_request_lines_that_are_not_json_objects_are_skipped_and_the_kernel_keeps_serving(shared_server: Client) -> None:
    # /proc/self/fd/N of a pipe opens its other end: the cell writes into its own protocol input.
    code = FIND_PROTOCOL_FD + (
        "w = os.open(f'/proc/self/fd/{proto_in}', os.O_WRONLY)\n"
        "os.write(w, b'not json\\n[1, 2]\\n\"text\"\\n')\n"
        "os.close(w)\n"
        "kept = 'yes'"
    )
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", code)
            after = await run(client, "s", "kept", timeout_s=10)
    assert out["status"] == "ok", out
    assert (after["status"], after["result"]) == ("ok", "'yes'"), after


# --- Forks: only the kernel process answers ----------------------------------------------------------


async def test_fork_in_a_cell_returns_the_parents_result_and_the_child_ends_quietly(shared_server: Client) -> None:
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", "import os\npid = os.fork()\n'parent' if pid else 'CHILD'")
            reaped = await run(client, "s", "os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])")
            await assert_usable(client, "s")
    assert (out["status"], out["result"], out["stdout"], out["stderr"]) == ("ok", "'parent'", "", ""), out
    assert reaped["result"] == "0", reaped


async def test_textbook_fork_with_sys_exit_returns_the_parents_result_and_the_next_call_is_fast(shared_server: Client) -> None:
    code = (
        "import os, sys\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print('child')\n"
        "    sys.exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('parent')\n"
        "os.waitstatus_to_exitcode(status)"
    )
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(SLOW_S):
            out = await run(client, "s", code)
            assert (await sessions(client))["s"]["status"] == "idle"
            started = time.monotonic()
            after = await run(client, "s", "1+1")
            next_call_s = time.monotonic() - started
    assert (out["status"], out["result"]) == ("ok", "0"), out
    assert sorted(out["stdout"].splitlines()) == ["child", "parent"], out["stdout"]
    assert out["stderr"] == "", out["stderr"]
    assert (after["status"], after["result"]) == ("ok", "2"), after
    assert next_call_s < NEXT_CALL_WITHIN_S


async def test_forked_child_that_raises_shows_its_traceback_and_exits_with_one(shared_server: Client) -> None:
    code = "import os\npid = os.fork()\nif pid == 0:\n    1/0\nos.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])"
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", code)
            await assert_usable(client, "s")
    assert (out["status"], out["result"]) == ("ok", "1"), out
    assert "ZeroDivisionError" in out["stderr"], out


async def test_multiprocessing_fork_process_prints_into_the_cell_and_the_session_goes_on(shared_server: Client) -> None:
    code = (
        "import multiprocessing\n"
        "def work(n):\n"
        "    print('worker', n, flush=True)\n"
        "p = multiprocessing.get_context('fork').Process(target=work, args=(7,))\n"
        "p.start(); p.join()\n"
        "with multiprocessing.get_context('fork').Pool(2) as pool:\n"
        "    squares = pool.map(abs, range(-3, 0))\n"
        "(p.exitcode, squares)"
    )
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", code)
            await assert_usable(client, "s")
    assert (out["status"], out["result"]) == ("ok", "(0, [3, 2, 1])"), out
    assert out["stdout"] == "worker 7\n", out


# --- Start-up output before the hello ----------------------------------------------------------------


async def test_env_whose_python_prints_a_banner_without_newline_at_start_still_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.stdout.write('WELCOME TO THE CLUSTER')\nsys.stdout.flush()\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    async with connect(tmp_path) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", "1+1")
    assert (out["status"], out["result"]) == ("ok", "2"), out


async def test_start_error_quotes_what_the_env_printed_before_it_died(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os, sys\nsys.stdout.write('LICENSE EXPIRED')\nsys.stdout.flush()\nos._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    async with connect(tmp_path) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", "1+1")
    assert out["status"] == "env_error", out
    assert "exit code 3" in out["error"] and "LICENSE EXPIRED" in out["error"], out["error"]


# --- Names that are not UTF-8, and strings JSON cannot carry -----------------------------------------


@pytest.fixture(scope="module")
async def odd_stdio(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """A stdio server process whose envs folder holds an env named with a byte that is not UTF-8,
    shared by the tests of what JSON cannot carry (each takes its turn with ``own_sessions``)."""
    envs = tmp_path_factory.mktemp("odd") / "envs"
    envs.mkdir()
    odd = os.path.join(os.fsencode(envs), b"caf\xe9")
    os.makedirs(os.path.join(odd, b"bin"))
    os.symlink(os.fsencode(sys.executable), os.path.join(odd, b"bin", b"python"))
    async with Client(stdio_parameters(IPYTHON_MCP_ENVS_DIR=str(envs), IPYTHON_MCP_SPARE_KERNELS="0")) as client:
        yield client


async def test_env_folder_with_a_non_utf8_name_is_listed_escaped_and_the_server_keeps_answering(odd_stdio: Client) -> None:
    async with own_sessions(odd_stdio) as client:
        with anyio.fail_after(SLOW_S):
            listing = await client.call_tool("list_envs", {})
            missing = await run(client, "s", "1", env="nope")
            out = await run(client, "s", "1+1")
            live = await sessions(client)
    names = [env["name"] for env in listing.structured_content["envs"]]
    assert not listing.is_error, text_of(listing)
    assert "caf\\xe9" in names, names
    assert "caf\\xe9" in text_of(listing)
    assert missing["status"] == "env_error" and "caf\\xe9" in missing["error"], missing
    assert (out["status"], out["result"]) == ("ok", "2"), out
    assert live["s"]["status"] == "idle"


async def test_cell_output_with_lone_surrogates_is_answered_and_the_next_call_works(odd_stdio: Client) -> None:
    code = (
        "import sys\n"
        "class Odd:\n"
        "    def __repr__(self):\n"
        "        return 'caf\\udce9'\n"
        "print('caf\\udce9')\n"
        "sys.stderr.write('caf\\udce9\\n')\n"
        "Odd()"
    )
    async with own_sessions(odd_stdio) as client:
        with anyio.fail_after(SLOW_S):
            out = await run(client, "s", code)
            raised = await run(client, "s", "raise ValueError('caf\\udce9')")
            after = await run(client, "s", "1+1")
    assert out["status"] == "ok", out
    assert out["stdout"].startswith("caf") and out["result"].startswith("caf"), out
    assert raised["status"] == "error" and "ValueError" in raised["error"], raised
    assert (after["status"], after["result"]) == ("ok", "2"), after


def test_shown_escapes_undecodable_bytes_and_lone_surrogates_and_keeps_the_rest() -> None:
    assert ipython_mcp.shown(Path(os.fsdecode(b"/envs/caf\xe9"))) == "/envs/caf\\xe9"
    assert ipython_mcp.shown("a\ud800b") == "a\\ud800b"
    assert ipython_mcp.shown("café ☕") == "café ☕"
    assert ipython_mcp.printable({"k\udce9": ["\udcff", 1, None]}) == {"k\\xe9": ["\\xff", 1, None]}
