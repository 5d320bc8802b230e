"""Saved output on an agent's worst day: private to its user, never written through a
planted folder or link, capped, cleaned up, and honest when the disk is full.

Some tests need a second local user (the attacker, ``ipymcp-other``): they run as root,
create that user with ``useradd`` once (it stays, so parallel runs can share it), and are
skipped with the reason where that cannot be done.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import stdio_client

import bootstrap_kernel
import ipython_mcp
from conftest import SERVER_PID_CODE, QUICK_S, SLOW_S, connect, run, stdio_parameters, text_of, wait_until_gone

pytestmark = pytest.mark.anyio

OTHER_USER = "ipymcp-other"
# A print of this size is cut in the reply (100 000 characters per call) and so saved to a file.
BIG_PRINT = "print('HEAD' + 'x' * 300_000 + 'TAIL')"
BIG_RESULT = "'y' * 300_000"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under ``root`` (links not followed): owner, mode, and what a link points to."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(info.st_mode) else ""
            found[str(path.relative_to(root))] = (info.st_uid, info.st_mode, target)
    return found


@contextlib.asynccontextmanager
async def stdio_server(
    *args: str, errlog: Path, cwd: Path | None = None, command: list[str] | None = None
) -> AsyncIterator[Client]:
    """A client of a real server process over stdio, its stderr in ``errlog``."""
    parameters = stdio_parameters("--spare-kernels", "0", *args, command=command or [sys.executable], cwd=cwd)
    with errlog.open("w") as stderr:
        async with Client(stdio_client(parameters, errlog=stderr)) as client:
            yield client


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# --- the second user, and a shared folder like /tmp that both can reach ----------------------


@pytest.fixture(scope="module")
def other_user() -> tuple[int, int]:
    """(uid, gid) of a second local user, created with useradd if missing."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to create a second local user and act as them")
    if not (shutil.which("useradd") and shutil.which("runuser")):
        pytest.skip("needs useradd and runuser, to create a second local user and act as them")
    try:
        import pwd

        entry = pwd.getpwnam(OTHER_USER)
    except KeyError:
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0 and "already exists" not in made.stderr:
            pytest.skip(f"useradd {OTHER_USER} failed: {made.stderr.strip()}")
        entry = pwd.getpwnam(OTHER_USER)
    return entry.pw_uid, entry.pw_gid


def as_other(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", OTHER_USER, "--", *argv], capture_output=True, text=True, timeout=QUICK_S, check=False
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A world-writable sticky folder like /tmp (pytest's own tmp_path is private to us)."""
    folder = Path(tempfile.mkdtemp(prefix="ipymcp-shared-", dir="/tmp"))
    os.chmod(folder, 0o1777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- private folders and files ----------------------------------------------------------------


async def test_saved_output_is_in_folders_only_we_can_open_and_files_only_we_can_read(tmp_path: Path) -> None:
    root = tmp_path / "output"
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, output_dir=root) as client:
            out = await run(
                client,
                "s",
                f"{BIG_PRINT}\nfrom IPython.display import Image, display\ndisplay(Image(data={_png()!r}))\n{BIG_RESULT}",
            )
            result_file = Path(re.search(r"Full text: (\S+)", out["warning"])[1])
            files = [Path(out["output_files"]["stdout"]), Path(out["images"][0]["path"]), result_file]
            session_folder = files[0].parent
            server_folder = session_folder.parent
            assert all(path.parent == session_folder for path in files), files
            assert server_folder.parent == root
            assert re.fullmatch(rf"server-{os.getpid()}-[0-9a-f]+", server_folder.name)
            assert [mode(root), mode(server_folder), mode(session_folder)] == [0o700] * 3
            assert [mode(path) for path in files] == [0o600] * 3


def _png() -> bytes:
    """A 1x1 PNG."""
    import base64

    return base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


@pytest.mark.parametrize("planted", ["symlink", "world_writable", "file"])
async def test_an_unsafe_output_folder_is_refused_for_a_fresh_private_one_and_the_log_says_so(
    tmp_path: Path, planted: str, caplog: pytest.LogCaptureFixture
) -> None:
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious")
    given = tmp_path / "output"
    if planted == "symlink":
        given.symlink_to(victim)
        expected = "is a symbolic link"
    elif planted == "world_writable":
        given.mkdir()
        os.chmod(given, 0o777)
        expected = "can be written by other users (mode 777)"
    else:
        given.write_text("not a folder")
        expected = "is not a folder"
    before = tree(tmp_path)
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, output_dir=given) as client:
            out = await run(client, "s", BIG_PRINT)
            saved = Path(out["output_files"]["stdout"])
            assert saved.read_text().startswith("HEAD")
            fallback = saved.parents[2]
            assert mode(fallback) == 0o700 and os.lstat(fallback).st_uid == os.getuid()
    assert not saved.is_relative_to(tmp_path), saved
    assert tree(tmp_path) == before, "nothing was written in or through the refused folder"
    assert (victim / "notes.txt").read_text() == "precious"
    logged = caplog.text
    assert f"the output folder {given} is not used: {given} {expected}" in logged, logged
    assert f"fresh private folder, {fallback}" in logged
    assert not fallback.exists(), "a fallback folder of our own goes with the server"


async def test_another_users_output_folder_with_planted_links_is_refused_and_the_victims_file_untouched(
    other_user: tuple[int, int],
    shared_tmp: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The attacker creates the default folder name before us, open to all, with links
    # where sessions and files would go, pointing into the victim's home.
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    default = ipython_mcp.Config().output_dir
    assert default == shared_tmp / f"ipython-mcp-{os.getuid()}"
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious")
    assert as_other("mkdir", "-m", "777", str(default)).returncode == 0
    for name in ("s", f"server-{os.getpid()}-00000000", "20260101-000000-1-stdout.txt"):
        target = victim / "notes.txt" if name.endswith(".txt") else victim
        assert as_other("ln", "-s", str(target), str(default / name)).returncode == 0
    planted = tree(default)
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, output_dir=default) as client:
            out = await run(client, "s", f"{BIG_PRINT}\n{BIG_RESULT}")
            saved = Path(out["output_files"]["stdout"])
            assert saved.read_text().startswith("HEAD")
    assert not saved.is_relative_to(default)
    assert tree(default) == planted, "the attacker's folder is exactly as they left it"
    assert (victim / "notes.txt").read_text() == "precious"
    assert sorted(path.name for path in victim.iterdir()) == ["notes.txt"]
    uid = other_user[0]
    assert f"the output folder {default} is not used: {default} belongs to another user (uid {uid})" in caplog.text


async def test_the_other_user_cannot_read_a_saved_file_even_with_its_folders_opened_up(
    other_user: tuple[int, int], shared_tmp: Path, tmp_path: Path
) -> None:
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, output_dir=shared_tmp / "output") as client:
            out = await run(client, "s", "print('API_KEY=sk-secret' + 'x' * 300_000)")
            saved = Path(out["output_files"]["stdout"])
            assert saved.read_text().startswith("API_KEY=sk-secret")
            refused = as_other("cat", str(saved))
            assert refused.returncode != 0 and "Permission denied" in refused.stderr
            assert "sk-secret" not in refused.stdout
            for folder in saved.parents[:3]:  # as if the folders had been made 0755
                os.chmod(folder, 0o755)
            assert as_other("ls", str(saved.parent)).returncode == 0
            refused = as_other("cat", str(saved))
            assert refused.returncode != 0 and "Permission denied" in refused.stderr
            assert "sk-secret" not in refused.stdout


def test_a_file_or_link_planted_at_the_next_name_is_never_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    files = ipython_mcp.OutputFiles(tmp_path / "output", 1_000_000, 10_000_000)
    try:
        monkeypatch.setattr(ipython_mcp.time, "strftime", lambda *_: "20260101-000000")
        session = files.folder / "s"
        ipython_mcp.SpillTarget(files, "s")("stdout").close()  # makes the session folder, takes name 1
        (session / "20260101-000000-2-stdout.txt").symlink_to(victim)
        (session / "20260101-000000-3-stdout.txt").write_text("planted")
        spill = ipython_mcp.SpillTarget(files, "s")("stdout")
        spill.write("cell output")
        spill.close()
        assert spill.path.name == "20260101-000000-4-stdout.txt"
        assert spill.path.read_text() == "cell output"
        assert victim.read_text() == "precious"
        assert (session / "20260101-000000-3-stdout.txt").read_text() == "planted"
        # A session folder that is a link is refused, not followed.
        (files.folder / "t").symlink_to(tmp_path)
        with pytest.raises(ipython_mcp.UnsafeFolder, match="is a symbolic link"):
            ipython_mcp.SpillTarget(files, "t")("stdout")
        with pytest.raises(OSError, match="is a symbolic link"):
            files.save("t", "image0.png", b"png")
    finally:
        files.remove_all()
    assert victim.read_text() == "precious"
    assert not (tmp_path / "output" / "t").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "output"]


def test_the_kernels_own_result_file_is_new_and_private_never_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    planted = tmp_path / "result.txt"
    planted.symlink_to(victim)
    note, size = bootstrap_kernel.save_text("y" * 1000, str(planted), 10_000)
    assert (note, size) == (" The full text could not be saved (File exists).", None)
    assert victim.read_text() == "precious"
    fresh = tmp_path / "fresh.txt"
    note, size = bootstrap_kernel.save_text("y" * 1000, str(fresh), 10_000)
    assert (note, size) == (f" Full text: {fresh}", 1000)
    assert mode(fresh) == 0o600


async def test_a_relative_output_dir_gives_absolute_paths_and_the_kernel_saves_there_after_a_chdir(tmp_path: Path) -> None:
    assert ipython_mcp.Config(output_dir=Path("rel")).output_dir == Path.cwd() / "rel"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = f"import os\nos.chdir({str(elsewhere)!r})\n{BIG_PRINT}\n{BIG_RESULT}"
    with anyio.fail_after(SLOW_S):
        async with stdio_server("--output-dir", "rel", errlog=tmp_path / "stderr.txt", cwd=tmp_path) as client:
            out = await run(client, "s", code)
            saved = Path(out["output_files"]["stdout"])
            result_file = Path(re.search(r"Full text: (\S+)", out["warning"])[1])
            assert saved.is_absolute() and result_file.is_absolute()
            assert saved.is_relative_to(tmp_path / "rel") and result_file.is_relative_to(tmp_path / "rel")
            assert result_file.stat().st_size == 300_002
            assert list(elsewhere.iterdir()) == []


# --- caps --------------------------------------------------------------------------------------


async def test_a_saved_file_past_its_cap_stops_growing_and_the_warning_says_where_it_was_cut(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, spill_file_limit=100_000) as client:
            out = await run(client, "s", f"{BIG_PRINT}\n{BIG_RESULT}")
            saved = Path(out["output_files"]["stdout"])
            result_file = Path(re.search(r"saved text in (\S+-result\.txt) was cut at 100000 bytes", out["warning"])[1])
            assert saved.stat().st_size == 100_000 and result_file.stat().st_size == 100_000
    assert out["stdout"].startswith("HEAD") and out["stdout"].endswith("TAIL\n"), "the reply keeps head and tail"
    assert f"The saved text in {saved} was cut at 100000 bytes (the limit per saved file" in out["warning"]
    assert f"Full text: {saved}" not in out["warning"]
    assert "saved text in" in out["stdout"] and "is incomplete" in out["stdout"]


async def test_the_folder_cap_deletes_the_oldest_files_but_never_those_the_last_reply_named(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, spill_file_limit=100_000, output_dir_limit=250_000) as client:
            a1 = Path((await run(client, "a", BIG_PRINT))["output_files"]["stdout"])
            b1 = Path((await run(client, "b", BIG_PRINT))["output_files"]["stdout"])
            # a1 and b1 are what the last replies of a and b named: a2 gets what is left.
            out = await run(client, "a", BIG_PRINT)
            a2 = Path(out["output_files"]["stdout"])
            assert a2.stat().st_size == 50_000
            assert "was cut at 50000 bytes (the output folder is full, --output-dir-limit 250000)" in out["warning"]
            assert a1.exists() and b1.exists()
            # Now a's last reply names a2, not a1: a1 goes, the oldest, to make room.
            out = await run(client, "a", BIG_PRINT)
            a3 = Path(out["output_files"]["stdout"])
            assert not a1.exists()
            assert b1.stat().st_size == 100_000 and a2.stat().st_size == 50_000 and a3.stat().st_size == 100_000
            assert "was cut at 100000 bytes (the limit per saved file" in out["warning"]


async def test_a_cell_left_running_that_nobody_waits_for_spills_within_the_caps(tmp_path: Path) -> None:
    marker = tmp_path / "printed"
    code = (
        "import sys, time\nprint('started', flush=True)\ntime.sleep(1.5)\n"
        f"for i in range(20_000):\n    sys.stdout.write('z' * 999 + '\\n')\nsys.stdout.flush()\nopen({str(marker)!r}, 'w').close()"
    )
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, spill_file_limit=100_000, output_dir_limit=300_000) as client:
            await run(client, "s", "1")  # the kernel is up: the cell's 1 s below are its own
            first = await run(client, "s", code, timeout_s=1, on_timeout="continue")
            assert first["status"] == "running"
            while not marker.exists():  # 20 MB printed while nobody waits
                await anyio.sleep(0.05)
            out = (await client.call_tool("wait", {"session": "s", "timeout_s": 30})).structured_content
            server_folder = Path(out["output_files"]["stdout"]).parents[1]
            kept = sum(path.stat().st_size for path in server_folder.rglob("*") if path.is_file())
    assert out["status"] == "ok"
    assert out["stdout"].endswith("z\n") and len(out["stdout"]) < 150_000
    assert Path(out["output_files"]["stdout"]).name.endswith("-stdout.txt")
    assert "was cut at 100000 bytes" in out["warning"]
    assert kept <= 300_000, f"{kept} bytes saved for 20 MB of output"


# --- cleanup -----------------------------------------------------------------------------------


async def test_shutdown_deletes_the_sessions_files_and_keeps_the_others(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path) as client:
            gone = Path((await run(client, "s", f"{BIG_PRINT}\n{BIG_RESULT}"))["output_files"]["stdout"])
            kept = Path((await run(client, "t", BIG_PRINT))["output_files"]["stdout"])
            saved = [path for path in gone.parent.iterdir() if not path.name.endswith("-record.jsonl")]  # beside the session's record
            assert len(saved) == 2  # stdout and the result's full text
            result = await client.call_tool("shutdown", {"session": "s"})
            assert not result.is_error, text_of(result)
            assert not gone.parent.exists()
            assert kept.exists()
            again = Path((await run(client, "s", BIG_PRINT))["output_files"]["stdout"])
            assert again.exists() and mode(again.parent) == 0o700


@pytest.mark.parametrize("how", ["stdin_eof", "sigterm"])
async def test_server_exit_deletes_its_folder(tmp_path: Path, how: str) -> None:
    output = tmp_path / "output"
    with anyio.fail_after(SLOW_S):
        async with stdio_server("--output-dir", str(output), errlog=tmp_path / "stderr.txt") as client:
            out = await run(client, "s", f"print({SERVER_PID_CODE})\n{BIG_PRINT}")
            server_pid = int(out["stdout"].split("\n", 1)[0])
            server_folder = Path(out["output_files"]["stdout"]).parents[1]
            assert server_folder.is_dir() and server_folder.name.startswith(f"server-{server_pid}-")
            if how == "sigterm":
                os.kill(server_pid, signal.SIGTERM)
                await wait_until_gone(server_pid)
        await wait_until_gone(server_pid)
    assert not server_folder.exists()
    assert list(output.iterdir()) == []


async def test_a_stale_folder_of_a_dead_server_is_removed_at_start_and_a_live_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "output"
    root.mkdir(mode=0o700)
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious")
    stale = root / f"server-{dead_pid()}-0123abcd"
    (stale / "s").mkdir(parents=True)
    (stale / "s" / "old-stdout.txt").write_text("old")
    (stale / "s" / "link").symlink_to(victim)  # removed as a link, never followed
    live = root / f"server-{os.getpid()}-4567ef01"
    (live / "s").mkdir(parents=True)
    stale_link = root / f"server-{dead_pid()}-89abcdef"
    stale_link.symlink_to(victim)  # not a folder of ours: left alone
    other = root / "notes"
    other.mkdir()
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, output_dir=root) as client:
            await run(client, "s", "1")
            assert not stale.exists()
            assert (live / "s").is_dir() and other.is_dir() and stale_link.is_symlink()
    assert (victim / "notes.txt").read_text() == "precious"


async def test_an_output_folder_a_cell_deleted_is_made_again(tmp_path: Path) -> None:
    root = tmp_path / "output"
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, output_dir=root) as client:
            before = Path((await run(client, "s", BIG_PRINT))["output_files"]["stdout"])
            out = await run(client, "s", f"import shutil\nshutil.rmtree({str(root)!r})\n{BIG_PRINT}")
            after = Path(out["output_files"]["stdout"])
            assert after.read_text().startswith("HEAD") and f"Full text: {after}" in out["warning"]
            assert not before.exists() and after.parents[2] == root
            assert [mode(root), mode(after.parent), mode(after)] == [0o700, 0o700, 0o600]


# --- a full disk -------------------------------------------------------------------------------


FSIZE_LIMIT = 200_000
# RLIMIT_FSIZE stands in for a full disk: writes past it fail with EFBIG (Python ignores
# SIGXFSZ), in the server and in its kernels, which inherit the limit.
WITH_FSIZE_LIMIT = [
    sys.executable,
    "-c",
    (
        f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE_LIMIT}, {FSIZE_LIMIT})); "
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
    ),
]


async def test_a_full_disk_keeps_head_and_tail_in_the_reply_and_says_the_saved_text_is_incomplete(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with stdio_server(
            "--output-dir", str(tmp_path / "output"), errlog=tmp_path / "stderr.txt", command=WITH_FSIZE_LIMIT
        ) as client:
            out = await run(client, "s", "print('HEAD' + 'x' * 1_000_000 + 'TAIL')\n'y' * 1_000_000")
            saved = Path(out["output_files"]["stdout"])
            assert saved.stat().st_size == FSIZE_LIMIT
            await run(client, "s", "1")  # and the server goes on
    assert out["status"] == "ok"
    assert out["stdout"].startswith("HEAD") and out["stdout"].endswith("TAIL\n")
    assert out["result"].startswith("'yyy") and out["result"].endswith("yyy'")
    warning = out["warning"]
    assert f"The saved text in {saved} is incomplete: writing it failed after {FSIZE_LIMIT} bytes (File too large)" in warning
    assert re.search(rf"The saved text in \S+-result\.txt is incomplete: writing it failed after {FSIZE_LIMIT} bytes", warning), (
        warning
    )
    assert "Full text:" not in warning
