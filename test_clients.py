"""What every MCP client sees, not only the SDK's: failed cells as tool errors that keep their
structured result, input schemas that simple clients understand, complete tool annotations,
instructions that name every tool, "so far" that agrees with ``duration_s``, and a server that
refuses to start without its kernel side.

Through the SDK's in-memory client, its stdio client, and raw JSON-RPC lines over stdio.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp import Client

from conftest import FAILED, QUICK_S, SERVER, SLOW_S, own_sessions, run, stdio_parameters, text_of

pytestmark = pytest.mark.anyio

TOOLS = {"execute", "wait", "list_sessions", "list_envs", "reset", "shutdown", "interrupt", "history", "export_notebook"}
# (readOnly, destructive, idempotent, openWorld) of each tool, as clients read them.
HINTS = {
    "execute": (False, True, False, True),
    "wait": (True, False, False, False),
    "list_sessions": (True, False, True, False),
    "list_envs": (True, False, True, False),
    "reset": (False, True, True, False),
    "shutdown": (False, True, True, False),
    "interrupt": (False, False, True, False),
    "history": (True, False, True, False),
    "export_notebook": (False, False, True, False),
}


def loop_until(release: Path) -> str:
    """Cell code that runs until ``release`` exists."""
    return f"import os, time\nwhile not os.path.exists({str(release)!r}):\n    time.sleep(0.05)\n'released'"


def slow_env(folder: Path, delay_s: float) -> Path:
    """An env whose interpreter takes ``delay_s`` to start (then is this test's Python)."""
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text(f'#!/bin/sh\nsleep {delay_s}\nexec {sys.executable} "$@"\n')
    (folder / "bin" / "python").chmod(0o755)
    return folder


def so_far(warning: str) -> int:
    match = re.search(r"\((\d+) s so far", warning)
    assert match, warning
    return int(match.group(1))


# --- Failures that clients can see ------------------------------------------------------------------


async def test_failed_cells_are_tool_errors_that_keep_their_structured_result_and_text(shared_server: Client, tmp_path: Path) -> None:
    release = tmp_path / "release"
    calls = {
        "ok": {"session": "s", "code": "1 + 1"},
        "error": {"session": "s", "code": "1 / 0"},
        "timeout": {"session": "s", "code": "import time\nprint('partial', flush=True)\ntime.sleep(30)", "timeout_s": 1},
        "env_error": {"session": "elsewhere", "code": "1", "env": "no-such-env"},
        "running": {"session": "s", "code": loop_until(release), "timeout_s": 0.5, "on_timeout": "continue"},
        "busy": {"session": "s", "code": "2"},
    }
    results: dict[str, Any] = {}
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            for expected, arguments in calls.items():
                results[expected] = await client.call_tool("execute", arguments)
            release.touch()
            results["wait"] = await client.call_tool("wait", {"session": "s", "timeout_s": 20})
    for expected, result in results.items():
        out = result.structured_content
        assert out is not None, f"{expected}: the structured result is kept: {text_of(result)}"
        assert out["status"] == ("ok" if expected == "wait" else expected)
        assert result.is_error == (out["status"] in FAILED), expected
        assert text_of(result).startswith(f"status: {out['status']} "), "the same readable text block"
    assert results["error"].structured_content["error"].endswith("ZeroDivisionError: division by zero")
    assert results["timeout"].structured_content["stdout"] == "partial\n"
    assert "no-such-env" in results["env_error"].structured_content["error"]
    assert "was not run" in results["busy"].structured_content["error"]
    assert results["wait"].structured_content["result"] == "'released'"


async def test_failed_cell_reaches_a_stdio_client_as_is_error_with_structured_content(tmp_path: Path) -> None:
    parameters = stdio_parameters("--output-dir", str(tmp_path), "--spare-kernels", "0")
    with anyio.fail_after(SLOW_S):
        async with Client(parameters) as client:
            failed = await run(client, "s", "x = 1\nraise ValueError('bad input')")
            after = await run(client, "s", "x")
            result = await client.call_tool("execute", {"session": "s", "code": "1 / 0"})
    assert failed["status"] == "error" and failed["error"].endswith("ValueError: bad input")
    assert after["result"] == "1", "a failed cell keeps the session's state"
    assert result.is_error and result.structured_content["status"] == "error"


async def test_raw_json_rpc_answer_to_a_failed_cell_has_is_error_and_structured_content(tmp_path: Path) -> None:
    """What a client that is not the SDK reads on the wire."""
    requests = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "execute", "arguments": {"session": "s", "code": "1 / 0"}}},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "execute", "arguments": {"session": "s", "code": "6 * 7"}}},
    ]
    answers: dict[int, dict[str, Any]] = {}
    command = [sys.executable, str(SERVER), "--output-dir", str(tmp_path), "--spare-kernels", "0"]
    with anyio.fail_after(SLOW_S):
        async with await anyio.open_process(command) as server:
            assert server.stdin and server.stdout
            lines = BufferedByteReceiveStream(server.stdout)
            for request in requests:
                await server.stdin.send(json.dumps(request).encode() + b"\n")
                if "id" in request:
                    while request["id"] not in answers:
                        message = json.loads(await lines.receive_until(b"\n", 1 << 24))
                        if "id" in message:
                            answers[message["id"]] = message
            await server.stdin.aclose()
            await server.wait()
    failed, fine = answers[2]["result"], answers[3]["result"]
    assert failed["isError"] is True
    assert failed["structuredContent"]["status"] == "error"
    assert failed["structuredContent"]["error"].endswith("ZeroDivisionError: division by zero")
    assert failed["content"][0]["type"] == "text" and failed["content"][0]["text"].startswith("status: error")
    assert fine.get("isError", False) is False and fine["structuredContent"]["result"] == "42"


# --- Every client, not only the SDK's ------------------------------------------------------------------


async def test_every_tool_advertises_a_plain_type_for_each_argument(shared_server: Client) -> None:
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for name, tool in tools.items():
        schema = tool.input_schema
        assert schema["type"] == "object"
        for argument, prop in schema.get("properties", {}).items():
            where = f"{name}.{argument}: {prop}"
            assert not {"anyOf", "oneOf", "allOf", "$ref"} & set(prop), where
            assert prop.get("type") in {"string", "number", "integer", "boolean"}, where
            assert prop.get("default", "") is not None, f"{where}: a default of null contradicts the type"
            if argument not in schema.get("required", []):
                assert "default" in prop or re.search(r"default|omit", prop.get("description", ""), re.IGNORECASE), f"{where}: say what omitting it means"
    assert tools["execute"].input_schema["properties"]["timeout_s"]["type"] == "number"
    assert tools["execute"].input_schema["properties"]["env"]["type"] == "string"
    assert tools["wait"].input_schema["properties"]["timeout_s"]["type"] == "number"


async def test_optional_arguments_still_accept_an_explicit_null_and_a_number_as_text(shared_server: Client) -> None:
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            nulls = await run(client, "s", "6 * 7", env=None, timeout_s=None)
            text = await run(client, "s", "7 * 8", timeout_s="5")  # clients that type every value as a string
            empty = await run(client, "s", "8 * 9", env="")
    assert (nulls["result"], text["result"], empty["result"]) == ("42", "56", "72")


async def test_every_tool_states_all_four_annotation_hints(shared_server: Client) -> None:
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == set(HINTS)
    for name, tool in tools.items():
        hints = tool.annotations
        assert hints is not None and hints.title, name
        stated = (hints.read_only_hint, hints.destructive_hint, hints.idempotent_hint, hints.open_world_hint)
        assert stated == HINTS[name], f"{name}: {stated}"


async def test_server_instructions_name_every_tool(shared_server: Client) -> None:
    with anyio.fail_after(QUICK_S):
        async with own_sessions(shared_server) as client:
            instructions = client.instructions or ""
            tools = {tool.name for tool in (await client.list_tools()).tools}
    for name in tools:
        assert f"`{name}" in instructions, f"the instructions do not mention {name}"


async def test_running_reply_counts_so_far_from_the_call_like_its_duration(shared_server: Client, tmp_path: Path) -> None:
    """The kernel takes seconds to start, so the cell starts well after the call did."""
    env = slow_env(tmp_path / "slow", 3)
    release = tmp_path / "release"
    with anyio.fail_after(SLOW_S):
        async with own_sessions(shared_server) as client:
            first = await run(client, "s", loop_until(release), env=str(env), timeout_s=8, on_timeout="continue")
            waited = (await client.call_tool("wait", {"session": "s", "timeout_s": 2})).structured_content
            release.touch()
            final = (await client.call_tool("wait", {"session": "s", "timeout_s": 20})).structured_content
    assert first["status"] == "running"
    assert abs(so_far(first["warning"]) - first["duration_s"]) <= 0.5, first
    assert first["duration_s"] >= 8
    assert waited["status"] == "running"
    assert abs(so_far(waited["warning"]) - waited["duration_s"]) <= 0.5, waited
    in_all = int(re.search(r"the cell has run (\d+) s in all", waited["warning"]).group(1))
    assert in_all >= waited["duration_s"] + 2, "a wait also says how long the cell has run since it started"
    assert final["status"] == "ok" and final["result"] == "'released'"


# --- README truths: both files go together -----------------------------------------------------------


async def test_server_without_its_bootstrap_beside_it_exits_at_once_saying_so(tmp_path: Path) -> None:
    shutil.copy(SERVER, tmp_path / SERVER.name)
    with anyio.fail_after(QUICK_S):
        done = await anyio.run_process([sys.executable, str(tmp_path / SERVER.name)], stdin=subprocess.DEVNULL, check=False)
    stderr = done.stderr.decode()
    assert done.returncode != 0
    assert "bootstrap_kernel.py is missing" in stderr and str(tmp_path / "bootstrap_kernel.py") in stderr
    assert "copy both" in stderr
    assert done.stdout == b"", "nothing but JSON-RPC on stdout"
