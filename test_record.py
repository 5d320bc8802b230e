"""The session record, for the person who owns the session: every cell kept (bounded in
memory, whole in a private file), `history` for an agent that lost its context, export to a
notebook that Jupyter opens and can run again (as a tool and as `ipython-mcp export` from
another process), and each live session as MCP resources, announced when sessions come and go.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import anyio
import nbformat
import pytest
from mcp import Client
from mcp.shared.subscriptions import ResourcesListChanged
from mcp.types import ResourceListChangedNotification
from nbclient import NotebookClient

import ipython_mcp
from conftest import SERVER_PID_CODE, QUICK_S, SERVER, SLOW_S, connect, own_sessions, run, stdio_parameters, text_of

pytestmark = pytest.mark.anyio


# Cells whose text outputs are the same in any fresh kernel: a notebook made of them must
# run again to the same outputs. `reset` comes between the last two.
CELLS = [
    "x = 6 * 7",
    "print('hello'); x",
    "import sys\nprint('careful', file=sys.stderr)",
    "1/0",
    "from IPython.display import Markdown, display\nprint('before')\ndisplay(Markdown('**shown**'))\nprint('after')",
    "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()",
]
AFTER_RESET = "y = 2\ny * 21"


async def run_cells_with_a_reset(client: Client, session: str = "s") -> None:
    for code in CELLS:
        await run(client, session, code)
    reset = await client.call_tool("reset", {"session": session})
    assert not reset.is_error, text_of(reset)
    await run(client, session, AFTER_RESET)


async def history(client: Client, session: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool("history", {"session": session, **arguments})
    assert not result.is_error, text_of(result)
    assert result.content[0].type == "text"
    return result.structured_content


def text_outputs(outputs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """What a person reads in a cell's outputs, the same however the notebook was made."""
    seen: list[tuple[str, str]] = []
    for output in outputs:
        kind = output["output_type"]
        if kind == "stream":
            if seen and seen[-1][0] == output["name"]:  # one stream written in two pieces
                seen[-1] = (output["name"], seen[-1][1] + output["text"])
            else:
                seen.append((output["name"], output["text"]))
        elif kind == "execute_result":
            seen.append(("result", output["data"]["text/plain"]))
        elif kind == "error":
            seen.append(("error", f"{output['ename']}: {output['evalue']}"))
        elif "image/png" in output["data"]:
            seen.append(("image", "image/png"))
        else:  # the server keeps a display's best text form (markdown before plain)
            seen.append(("display", ipython_mcp.display_text(output["data"])))
    return seen


def record_files(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("server-*/*/*-record.jsonl"))


def stdio_server(output_dir: Path) -> Client:
    return Client(stdio_parameters("--output-dir", str(output_dir), "--spare-kernels", "0", IPYTHON_MCP_ENVS_DIR=str(output_dir)))


async def export_command(*arguments: str, cwd: Path) -> tuple[int, str, str]:
    """``ipython-mcp export ...`` as a person runs it: its own process, beside the server."""
    script = Path(sys.executable).with_name("ipython-mcp")
    command = [str(script)] if script.exists() else [sys.executable, str(SERVER)]
    done = await anyio.run_process([*command, "export", *arguments], cwd=cwd, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


# --- The record and `history` ------------------------------------------------------------------


async def test_every_cell_is_in_history_and_in_a_private_file_with_a_mark_where_reset_restarted_the_kernel(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path) as client:
            await run_cells_with_a_reset(client)
            seen = await history(client, "s", last=50)
            text = text_of(await client.call_tool("history", {"session": "s"}))
            path = Path(seen["record_file"])
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            folder_mode = stat.S_IMODE(os.lstat(path.parent).st_mode)
    entries = seen["entries"]
    assert seen["recorded"] == len(CELLS) + 2 == len(entries)
    cells = [entry for entry in entries if entry["kind"] == "cell"]
    assert [cell["code"] for cell in cells] == [*CELLS, AFTER_RESET]
    assert [cell["status"] for cell in cells] == ["ok", "ok", "ok", "error", "ok", "ok", "ok"]
    assert [cell["execution_count"] for cell in cells] == [1, 2, 3, 4, 5, 6, 1]
    assert {cell["by"] for cell in cells} == {"agent"}
    assert cells[1]["output"] == "hello\n42"
    assert cells[3]["output"] == "ZeroDivisionError: division by zero"
    assert cells[4]["output"] == "before\n**shown**\nafter"
    assert cells[5]["output"] == "[image: image/png]"
    restart = entries[len(CELLS)]
    assert restart["kind"] == "restart" and restart["reason"] == "reset"
    assert all(cell["duration_s"] >= 0 and cell["time"] for cell in cells)
    assert "kernel restarted: reset" in text
    assert "ZeroDivisionError: division by zero" in text and "print('hello'); x" in text
    # on disk: JSON lines, 0600, in the session's 0700 folder of this server's output folder
    assert path.parent.name == "s" and path.parent.parent.parent == tmp_path / "output"
    assert (mode, folder_mode) == (0o600, 0o700)
    assert lines[0]["kind"] == "session" and lines[0]["session"] == "s" and lines[0]["env"] == "default"
    assert [line["kind"] for line in lines[1:]] == ["cell"] * len(CELLS) + ["restart", "cell"]
    assert lines[4]["status"] == "error" and lines[4]["error"].endswith("ZeroDivisionError: division by zero")
    assert lines[3]["outputs"] == [{"type": "stream", "name": "stderr", "text": "careful\n"}]
    assert [output["type"] for output in lines[5]["outputs"]] == ["stream", "display", "stream"]
    image = lines[6]["outputs"][0]
    assert image["type"] == "image" and image["mime"] == "image/png" and Path(image["path"]).parent == path.parent


async def test_history_shows_the_last_cells_asked_for_and_refuses_an_unknown_session(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        for i in range(5):
            await run(client, "s", f"{i}")
        last_two = await history(client, "s", last=2)
        unknown = await client.call_tool("history", {"session": "nope"})
        zero = await client.call_tool("history", {"session": "s", "last": 0})
    assert [entry["code"] for entry in last_two["entries"]] == ["3", "4"]
    assert last_two["recorded"] == 5
    assert unknown.is_error and "Live sessions: s" in text_of(unknown)
    assert zero.is_error and "last must be a positive number" in text_of(zero)


async def test_memory_keeps_the_last_cells_and_the_file_and_the_notebook_keep_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ipython_mcp, "RECORD_MAX_CELLS", 3)
    monkeypatch.setattr(ipython_mcp, "RECORD_TEXT_CHARS", 1_000)
    notebook_path = tmp_path / "all.ipynb"
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path) as client:
            for i in range(6):
                await run(client, "s", f"print('{i}' * 5000)")
            seen = await history(client, "s", last=100)
            exported = await client.call_tool("export_notebook", {"session": "s", "path": str(notebook_path)})
    assert not exported.is_error, text_of(exported)
    assert [entry["code"] for entry in seen["entries"]] == [f"print('{i}' * 5000)" for i in (3, 4, 5)]
    assert seen["recorded"] == 6
    notebook = nbformat.read(notebook_path, as_version=4)
    assert [cell.source for cell in notebook.cells] == [f"print('{i}' * 5000)" for i in range(6)]
    kept = notebook.cells[0].outputs[0].text
    assert len(kept) < 1_200 and kept.startswith("0" * 500) and "characters not kept in the record" in kept


async def test_a_record_file_at_its_cap_stops_growing_and_the_export_says_what_it_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ipython_mcp, "RECORD_MAX_CELLS", 2)
    path = tmp_path / "capped.ipynb"
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, spill_file_limit=2_000) as client:
            for i in range(4):
                await run(client, "s", f"print('{i}' * 1500)")
            seen = await history(client, "s")
            exported = await client.call_tool("export_notebook", {"session": "s", "path": str(path)})
            record_size = Path(seen["record_file"]).stat().st_size
    assert record_size <= 2_000
    assert [entry["code"] for entry in seen["entries"]] == ["print('2' * 1500)", "print('3' * 1500)"]
    assert "Only the last 2 of 4 entries were kept" in exported.structured_content["note"]
    assert "stopped growing" in exported.structured_content["note"]
    notebook = nbformat.read(path, as_version=4)
    assert notebook.cells[0].cell_type == "markdown" and "Only the last 2 of 4" in notebook.cells[0].source
    assert [cell.source for cell in notebook.cells[1:]] == ["print('2' * 1500)", "print('3' * 1500)"]


async def test_a_cell_left_running_is_one_cell_in_the_record_completed_by_wait(client: Client) -> None:
    code = "import time\nprint('start', flush=True)\ntime.sleep(3)\nprint('end')\n'done'"
    with anyio.fail_after(QUICK_S):
        first = await run(client, "s", code, timeout_s=1, on_timeout="continue")
        final = await client.call_tool("wait", {"session": "s", "timeout_s": 20})
        seen = await history(client, "s")
    assert first["status"] == "running"
    assert final.structured_content["status"] == "ok"
    [cell] = seen["entries"]
    assert cell["code"] == code and cell["status"] == "ok" and cell["execution_count"] == 1
    assert cell["output"] == "start\nend\n'done'"
    assert cell["duration_s"] >= 2.5


async def test_a_cell_whose_call_the_client_cancelled_is_in_the_record_as_cancelled(tmp_path: Path) -> None:
    started = tmp_path / "started"
    code = f"print('before', flush=True)\nopen({str(started)!r}, 'w').close()\nimport time\ntime.sleep(60)"
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path) as client:
            await run(client, "cancelled", "x = 1")
            async with anyio.create_task_group() as group:
                group.start_soon(client.call_tool, "execute", {"session": "cancelled", "code": code})
                while not started.exists():
                    await anyio.sleep(0.02)
                group.cancel_scope.cancel()  # the client gives up on the call: the cell is interrupted
            after = await run(client, "cancelled", "x")
            seen = await history(client, "cancelled")
            kept = [json.loads(line) for line in Path(seen["record_file"]).read_text().splitlines()]
    assert after["result"] == "1"  # the session kept its state
    first, cancelled, last = seen["entries"]
    assert (cancelled["code"], cancelled["status"], cancelled["execution_count"]) == (code, "cancelled", 2)
    assert cancelled["output"] == "KeyboardInterrupt"  # the excerpt of an error is its last line
    assert (first["status"], last["status"]) == ("ok", "ok")
    [cell] = [entry for entry in kept if entry.get("status") == "cancelled"]
    assert {"type": "stream", "name": "stdout", "text": "before\n"} in cell["outputs"], cell
    assert "cancelled the call" in cell["error"], cell


async def test_a_kernel_that_died_leaves_a_restart_mark_before_the_next_cell(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "s", "x = 1")
        died = await run(client, "s", "import os\nos._exit(3)")
        await run(client, "s", "1 + 1")
        seen = await history(client, "s")
    assert died["status"] == "error"
    kinds = [entry["kind"] for entry in seen["entries"]]
    assert kinds == ["cell", "cell", "restart", "cell"]
    assert "state before is gone" in seen["entries"][2]["reason"]


async def test_shutdown_ends_the_record_and_a_new_session_of_that_name_starts_afresh(shared_server: Client) -> None:
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            await run(client, "s", "old = 1")
            path = Path((await history(client, "s"))["record_file"])
            await client.call_tool("shutdown", {"session": "s"})
            gone = await client.call_tool("history", {"session": "s"})
            await run(client, "s", "new = 2")
            fresh = await history(client, "s")
    assert gone.is_error and "No session named 's'" in text_of(gone)
    assert not path.exists()
    assert [entry["code"] for entry in fresh["entries"]] == ["new = 2"]


# --- Export to a notebook ---------------------------------------------------------------------


async def test_exported_notebook_validates_and_runs_again_in_a_fresh_kernel_to_the_same_outputs(shared_server: Client, tmp_path: Path) -> None:
    path = tmp_path / "session.ipynb"
    with anyio.fail_after(SLOW_S):
        async with own_sessions(shared_server) as client:
            await run_cells_with_a_reset(client)
            exported = await client.call_tool("export_notebook", {"session": "s", "path": str(path)})
        assert not exported.is_error, text_of(exported)
        assert exported.structured_content["cells"] == len(CELLS) + 2
        assert exported.structured_content["bytes"] == path.stat().st_size
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        rerun = nbformat.read(path, as_version=4)
        await NotebookClient(
            rerun, timeout=60, kernel_name="python3", allow_errors=True, resources={"metadata": {"path": str(tmp_path)}}
        ).async_execute()
    assert (notebook.nbformat, notebook.nbformat_minor) == (4, 5)
    assert notebook.metadata.kernelspec.name == "python3"
    assert notebook.metadata.language_info.name == "python"
    assert notebook.metadata.language_info.version == ".".join(map(str, sys.version_info[:3]))
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds == ["code"] * len(CELLS) + ["markdown", "code"]
    assert "Kernel restarted" in notebook.cells[len(CELLS)].source
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.source for cell in code_cells] == [*CELLS, AFTER_RESET]
    assert [cell.execution_count for cell in code_cells] == [1, 2, 3, 4, 5, 6, 1]
    assert len({cell.id for cell in notebook.cells}) == len(notebook.cells)
    [error] = code_cells[3].outputs
    assert error.ename == "ZeroDivisionError" and error.evalue == "division by zero"
    assert any("1/0" in line for line in error.traceback)
    [image] = code_cells[5].outputs
    assert image.data["image/png"].startswith("iVBORw0KGgo")  # a PNG, embedded
    fresh_cells = [cell for cell in rerun.cells if cell.cell_type == "code"]
    for recorded, fresh in zip(code_cells, fresh_cells):
        assert text_outputs(recorded.outputs) == text_outputs(fresh.outputs), recorded.source


async def test_export_needs_an_absolute_path_and_never_replaces_a_file_or_follows_a_link_unless_asked(shared_server: Client, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "link.ipynb"
    link.symlink_to(victim)
    existing = tmp_path / "existing.ipynb"
    existing.write_text("{}")
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            await run(client, "s", "1 + 1")

            async def export(path: str, **arguments: Any) -> Any:
                return await client.call_tool("export_notebook", {"session": "s", "path": path, **arguments})

            relative = await export("relative.ipynb")
            over_link = await export(str(link))
            over_file = await export(str(existing))
            kept = existing.read_text()
            unknown = await client.call_tool("export_notebook", {"session": "nope", "path": str(tmp_path / "n.ipynb")})
            replaced_link = await export(str(link), overwrite=True)
            replaced_file = await export(str(existing), overwrite=True)
    assert relative.is_error and "must be absolute" in text_of(relative)
    assert over_link.is_error and "already exists" in text_of(over_link) and "overwrite" in text_of(over_link)
    assert over_file.is_error and kept == "{}"
    assert unknown.is_error and "No session named 'nope'" in text_of(unknown)
    assert not replaced_link.is_error and not replaced_file.is_error
    assert victim.read_text() == "keep me"
    assert not link.is_symlink()
    nbformat.validate(nbformat.read(link, as_version=4))
    nbformat.validate(nbformat.read(existing, as_version=4))
    assert stat.S_IMODE(existing.stat().st_mode) & 0o600 == 0o600
    assert not (tmp_path / "relative.ipynb").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


async def test_export_command_writes_a_live_stdio_servers_session_from_another_process(tmp_path: Path) -> None:
    output_dir = tmp_path / "output"
    with anyio.fail_after(SLOW_S):
        async with stdio_server(output_dir) as client:
            server_pid = int((await run(client, "s", SERVER_PID_CODE))["result"])
            await run(client, "s", "print('from the agent')")
            await client.call_tool("reset", {"session": "s"})
            await run(client, "s", "'after the reset'")
            await run(client, "other", "1")
            code, out, err = await export_command("s", "exported.ipynb", "--output-dir", str(output_dir), cwd=tmp_path)
            again, _, again_err = await export_command("s", "exported.ipynb", "--output-dir", str(output_dir), cwd=tmp_path)
            named_first = await anyio.run_process(
                [sys.executable, str(SERVER), "--output-dir", str(output_dir), "export", "s", "--overwrite"],
                cwd=tmp_path,
                check=False,
            )
            missing, _, missing_err = await export_command("nope", "--output-dir", str(output_dir), cwd=tmp_path)
    assert code == 0, err
    assert f"server pid {server_pid}" in out and str(tmp_path / "exported.ipynb") in out
    notebook = nbformat.read(tmp_path / "exported.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert [cell.cell_type for cell in notebook.cells] == ["code", "code", "markdown", "code"]
    assert notebook.cells[1].outputs[0].text == "from the agent\n"
    assert notebook.cells[3].outputs[0].data["text/plain"] == "'after the reset'"
    assert again == 1 and "already exists" in again_err and "--overwrite" in again_err
    assert named_first.returncode == 0, named_first.stderr.decode()
    nbformat.validate(nbformat.read(tmp_path / "s.ipynb", as_version=4))  # PATH defaults to ./SESSION.ipynb
    assert missing == 1
    assert "No live session named 'nope'" in missing_err
    assert f"s (server pid {server_pid})" in missing_err and f"other (server pid {server_pid})" in missing_err


async def test_export_command_picks_the_most_recently_active_of_two_servers_and_says_so(tmp_path: Path) -> None:
    output_dir = tmp_path / "output"
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, output_dir=output_dir) as older:
            await run(older, "s", "'older server'")
            async with stdio_server(output_dir) as newer:
                newer_pid = int((await run(newer, "s", SERVER_PID_CODE))["result"])
                code, _, err = await export_command("s", str(tmp_path / "s.ipynb"), "--output-dir", str(output_dir), cwd=tmp_path)
            await run(older, "s", "'older server, later'")
            code_after, out_after, _ = await export_command(
                "s", str(tmp_path / "s2.ipynb"), "--output-dir", str(output_dir), cwd=tmp_path
            )
    assert code == 0, err
    assert f"2 live servers have a session named 's' (pids {os.getpid()}, {newer_pid})" in err
    assert f"exported the most recently active one, pid {newer_pid}" in err
    assert nbformat.read(tmp_path / "s.ipynb", as_version=4).cells[0].source == SERVER_PID_CODE
    # the stdio server exited, taking its folder: only the in-memory server's record is left
    assert code_after == 0 and f"server pid {os.getpid()}" in out_after
    assert [cell.source for cell in nbformat.read(tmp_path / "s2.ipynb", as_version=4).cells] == [
        "'older server'",
        "'older server, later'",
    ]


# --- MCP resources ------------------------------------------------------------------------------


async def test_resources_list_and_read_each_live_session_and_listen_hears_sessions_come_and_go(tmp_path: Path) -> None:
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path) as client:
            before = await client.list_resources()
            templates = await client.list_resource_templates()
            async with client.listen(resources_list_changed=True) as changes:
                await run(client, "s", "print('listed')\n6 * 7")
                with anyio.fail_after(10):
                    started = await changes.__anext__()
                listed = await client.list_resources()
                page = await client.read_resource("ipython://sessions/s/history")
                notebook = await client.read_resource("ipython://sessions/s/notebook")
                await client.call_tool("shutdown", {"session": "s"})
                with anyio.fail_after(10):
                    ended = await changes.__anext__()
            after = await client.list_resources()
            with pytest.raises(Exception, match="No live session named 's'"):
                await client.read_resource("ipython://sessions/s/history")
    assert before.resources == [] and after.resources == []
    assert {template.uri_template for template in templates.resource_templates} == {
        "ipython://sessions/{session}/history",
        "ipython://sessions/{session}/notebook",
        "ipython://sessions/{session}/live/{after}",  # what `ipython-mcp watch` reads (test_attach.py)
    }
    assert isinstance(started, ResourcesListChanged) and isinstance(ended, ResourcesListChanged)
    assert {(str(r.uri), r.mime_type) for r in listed.resources} == {
        ("ipython://sessions/s/history", "text/markdown"),
        ("ipython://sessions/s/notebook", "application/x-ipynb+json"),
    }
    [text] = page.contents
    assert text.mime_type == "text/markdown"
    assert "print('listed')" in text.text and "listed" in text.text and "Out[1]: 42" in text.text
    [document] = notebook.contents
    assert document.mime_type == "application/x-ipynb+json"
    parsed = nbformat.reads(document.text, as_version=4)
    nbformat.validate(parsed)
    assert parsed.cells[0].outputs[-1].data["text/plain"] == "42"


async def test_a_handshake_era_client_is_told_of_new_sessions_and_is_offered_no_prompts(tmp_path: Path) -> None:
    heard = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceListChangedNotification):
            heard.set()

    server = ipython_mcp.build_server(ipython_mcp.Config(envs_dir=tmp_path, output_dir=tmp_path / "output", spare_kernels=0))
    with anyio.fail_after(QUICK_S):
        async with Client(server, mode="legacy", message_handler=on_message) as client:
            capabilities = client.server_capabilities
            await run(client, "s", "1")
            with anyio.fail_after(10):
                await heard.wait()
            listed = await client.list_resources()
    assert capabilities.prompts is None
    assert capabilities.resources is not None and capabilities.resources.list_changed
    assert len(listed.resources) == 2
