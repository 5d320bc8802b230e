"""Load: many sessions, hundreds of calls in parallel, random interrupts, resets and shutdowns.

Drives the real server over stdio with the SDK's client and checks that every call
returns, that no output is swapped between calls or sessions, that no kernel process
outlives the server, and that the server's memory does not grow without bound.

The quick run is in the default suite (its sizes can be set with STRESS_SESSIONS, 16, and
STRESS_CALLS, 400); the soak (24 sessions, 3000 calls) is marked ``slow``: ``pytest -m slow test_stress.py``.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from conftest import SERVER_PID_CODE, kernels_below, memory_kib, process_running, stdio_parameters

SESSIONS = int(os.environ.get("STRESS_SESSIONS", "16"))
CALLS = int(os.environ.get("STRESS_CALLS", "400"))
TOKEN = re.compile(r"<tok-\d+-\d+>")  # brackets: a token cut in half by the output limit matches nothing

pytestmark = pytest.mark.anyio


def cell_for(call: int, rng: random.Random) -> tuple[str, str]:
    """Code whose output and result name this call only; some cells sleep or print a lot."""
    token = f"<tok-{call}-{rng.randrange(10**9)}>"
    kind = rng.random()
    if kind < 0.15:
        body = f"print('{token}' * 20000)"  # 200+ KB: cut and spilled to a file
    elif kind < 0.45:
        body = f"import time; time.sleep({rng.uniform(0.05, 0.4):.2f})"
    elif kind < 0.55:
        body = f"import os; os.system('echo \\'{token}\\'')"
    else:
        body = "pass"
    return token, f"print('{token}')\n{body}\n'{token}'.upper()"


@pytest.mark.parametrize(
    ("sessions", "calls"),
    [pytest.param(SESSIONS, CALLS, id="quick"), pytest.param(24, 3000, id="soak", marks=pytest.mark.slow)],
)
async def test_many_sessions_under_random_interrupts_resets_and_shutdowns(tmp_path: Path, sessions: int, calls: int) -> None:
    rng = random.Random(int(os.environ.get("STRESS_SEED", "1234")))
    params = stdio_parameters("--output-dir", str(tmp_path / "out"), PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    outcomes: dict[str, int] = {}
    kernel_pids: set[int] = set()
    started = time.monotonic()
    with anyio.fail_after(240):
        async with Client(params, read_timeout_seconds=120) as client:
            first = await client.call_tool("execute", {"session": "s0", "code": SERVER_PID_CODE})
            server_pid = int(first.structured_content["result"])
            rss_start = memory_kib(server_pid, "VmRSS")

            async def one_call(call: int) -> None:
                session = f"s{call % sessions}"
                token, code = cell_for(call, rng)
                result = await client.call_tool("execute", {"session": session, "code": code, "timeout_s": 30})
                if result.structured_content is None:  # the session was shut down while this call waited for it
                    text = result.content[0].text
                    assert "shut down" in text, text
                    outcomes["tool error (shut down)"] = outcomes.get("tool error (shut down)", 0) + 1
                    return
                out = result.structured_content
                assert result.is_error == (out["status"] != "ok"), out
                assert out["session"] == session
                seen = set(TOKEN.findall(out["stdout"])) | set(TOKEN.findall(out["result"] or ""))
                assert seen <= {token}, f"call {call} saw output of another call: {seen - {token}}: {json.dumps(out)[:3000]}"
                if out["status"] == "ok":
                    assert out["result"] == repr(token.upper()), out
                    assert token in out["stdout"]
                else:
                    assert out["status"] == "error", out
                    assert any(
                        marker in out["error"]
                        for marker in ("KeyboardInterrupt", "was reset", "shut down", "kernel died")
                    ), out["error"]
                key = out["status"] if out["status"] == "ok" else out["error"].splitlines()[-1][:40]
                outcomes[key] = outcomes.get(key, 0) + 1

            async def chaos() -> None:
                for _ in range(calls // 10):
                    await anyio.sleep(rng.uniform(0.01, 0.1))
                    session = f"s{rng.randrange(sessions)}"
                    action = rng.choice(["interrupt", "interrupt", "interrupt", "reset", "shutdown", "list_sessions"])
                    args = {} if action == "list_sessions" else {"session": session}
                    result = await client.call_tool(action, args)
                    if action == "list_sessions":
                        kernel_pids.update(s["pid"] for s in result.structured_content["sessions"] if s["pid"])
                    elif result.is_error:
                        assert "No session named" in result.content[0].text or "could not restart" in result.content[0].text

            async with anyio.create_task_group() as group:
                group.start_soon(chaos)
                for call in range(calls):
                    group.start_soon(one_call, call)
            listing = await client.call_tool("list_sessions", {})
            kernel_pids.update(s["pid"] for s in listing.structured_content["sessions"] if s["pid"])
            kernel_pids |= kernels_below(server_pid)  # spares included
            rss_end = memory_kib(server_pid, "VmRSS")
    elapsed = time.monotonic() - started

    assert sum(outcomes.values()) == calls, outcomes
    assert outcomes.get("ok", 0) > calls // 2, outcomes
    with anyio.fail_after(10):
        while any(process_running(pid) for pid in kernel_pids | {server_pid}):
            await anyio.sleep(0.05)
    growth_mib = (rss_end - rss_start) / 1024
    report = {
        "sessions": sessions, "calls": calls, "seconds": round(elapsed, 1), "outcomes": outcomes,
        "server_rss_start_mib": round(rss_start / 1024, 1), "server_rss_end_mib": round(rss_end / 1024, 1),
        "kernels_seen": len(kernel_pids),
    }
    print("\nSTRESS " + json.dumps(report))
    assert growth_mib < 150, report
