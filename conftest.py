"""What the test files share: the anyio backend, an in-memory client on a fresh server,
and small helpers for calling tools and waiting on processes and marker files.

Import the helpers with ``from conftest import ...``; fixtures are found by pytest.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

import ipython_mcp

# How often a test polls for something it waits on (a marker file, a process going away);
# every such wait is bounded by the test's own anyio.fail_after.
POLL_S = 0.02


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def connect(tmp_path: Path, **config: Any) -> AsyncIterator[Client]:
    """An in-memory MCP client on a fresh server whose kernels die with it."""
    config.setdefault("envs_dir", tmp_path / "no-envs-here")
    config.setdefault("output_dir", tmp_path / "output")
    config.setdefault("default_timeout_s", 30.0)
    config.setdefault("spare_kernels", 0)  # the spare kernel has tests of its own
    async with Client(ipython_mcp.build_server(ipython_mcp.Config(**config))) as client:
        yield client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    async with connect(tmp_path) as client:
        yield client


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
    assert result.is_error == (status in {"error", "timeout", "env_error", "busy"}), (status, result.is_error)
    assert result.content[0].type == "text", "every result carries a readable text block"
    return result.structured_content


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


def process_running(pid: int) -> bool:
    """True while ``pid`` is a live process; a zombie waiting for its reaper counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


async def wait_until_gone(pid: int) -> None:
    """Poll (bounded by the test's fail_after) until ``pid`` is no longer running."""
    while process_running(pid):
        await anyio.sleep(POLL_S)
