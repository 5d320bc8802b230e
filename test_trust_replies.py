"""Replies an agent can trust (issues 11 and 12): bounded whatever a cell displays, never broken
by our own post-processing, the same best text for a rich result as for its display, and no
terminal control sequences in the text an agent reads.

Each test runs a real kernel behind a real MCP client (in-memory, or over stdio where the
server's own memory is measured), is bounded by ``anyio.fail_after``, and synchronises on
replies and files only.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

import ipython_mcp
from conftest import SERVER_PID_CODE, QUICK_S, SLOW_S, connect, memory_kib, own_sessions, run, stdio_parameters, text_of

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024


async def call(client: Client, session: str, code: str, **arguments: Any) -> Any:
    """``execute``, returning the whole CallToolResult (text block, images, structured content)."""
    result = await client.call_tool("execute", {"session": session, "code": code, **arguments})
    assert not result.is_error, text_of(result)
    return result


def image_blocks(result: Any) -> list[bytes]:
    return [base64.b64decode(block.data) for block in result.content if block.type == "image"]


# --- One budget per call for display text and images -------------------------------------------


async def test_ten_thousand_displays_keep_the_reply_and_the_server_memory_bounded(tmp_path: Path) -> None:
    # 10 000 × 2 000 characters: 20 MB of display text, which used to be sent whole (and to
    # cost the server about 120 MB at its peak).
    parameters = stdio_parameters("--output-dir", str(tmp_path / "output"), "--envs-dir", str(tmp_path), "--spare-kernels", "0")
    code = (
        "from IPython.display import Markdown, display\n"
        "for i in range(10_000):\n"
        "    display(Markdown(f'{i:05d}' + 'm' * 1995))"
    )
    with anyio.fail_after(SLOW_S):
        async with Client(parameters) as client:
            server_pid = int((await run(client, "s", SERVER_PID_CODE))["result"])
            before_kib = memory_kib(server_pid, "VmRSS")
            result = await call(client, "s", code, timeout_s=SLOW_S - 10)
            peak_kib = memory_kib(server_pid, "VmHWM")
            out = result.structured_content
            assert out["status"] == "ok", out
            assert len(json.dumps(out)) < 200_000  # the default --output-limit is 100 000 characters
            assert len(text_of(result)) < 200_000
            assert out["display"][0].startswith("00000m") and out["display"][-1].startswith("09999m")  # head and tail
            assert any("display outputs cut" in text for text in out["display"])
            assert "10000 displays" in out["warning"] and out["output_files"]["display"] in out["warning"]
            saved = Path(out["output_files"]["display"]).read_text()
            assert len(saved) >= 20_000_000 and "05000m" in saved and "09999m" in saved
            assert (peak_kib - before_kib) * 1024 < 40 * MIB, f"server RSS grew from {before_kib} KiB to a peak of {peak_kib} KiB"


async def test_a_thirty_megabyte_json_display_is_not_sent_whole(shared_server: Client) -> None:
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(SLOW_S):
            result = await call(client, "s", "from IPython.display import JSON, display\ndisplay(JSON({'k': 'v' * 30_000_000}))\n'after'")
    out = result.structured_content
    assert out["status"] == "ok" and out["result"] == "'after'"
    assert len(json.dumps(out)) < 200_000 and len(text_of(result)) < 200_000
    assert out["display"][0].startswith('{"k": "vvv') and out["display"][0].endswith('vvv"}')
    assert "application/json" in out["warning"] and "cut before sending" in out["warning"]  # the kernel's cut is said
    assert "display" in out["output_files"]


async def test_html_cut_by_the_kernel_is_said_in_the_warning(shared_server: Client) -> None:
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", "from IPython.display import HTML, display\ndisplay(HTML('<p>' + 'h' * 3_000_000 + '</p>'))")
    assert out["status"] == "ok"
    assert out["display"][0].startswith("<p>hhh") and out["display"][0].endswith("hhh</p>")
    assert "1 display output(s) of text/html were longer than the 2000000 characters a kernel sends" in out["warning"]
    assert "3000007" in out["warning"]  # the size it had


async def test_many_open_figures_give_at_most_the_image_budget_inline(shared_server: Client) -> None:
    # 40 figures rather than 200, to keep the suite quick: the budget counts figures the same way.
    code = (
        "import matplotlib.pyplot as plt\n"
        "for i in range(40):\n"
        "    plt.figure(figsize=(1, 1), dpi=20).gca().axis('off')\n"
        "    plt.plot([0, i])\n"
    )
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(SLOW_S):
            result = await call(client, "s", code, timeout_s=SLOW_S - 10)
        out = result.structured_content
        assert out["status"] == "ok", out
        assert len(image_blocks(result)) == 10
        assert len(out["images"]) == 40  # every figure is still in a file
        assert all(Path(image["path"]).is_file() for image in out["images"])
        assert "The cell showed 40 images; 10 were sent inline" in out["warning"]
        assert "30 more were only saved to files" in out["warning"]
        assert "[image 10: image/png]" in text_of(result)


async def test_images_past_the_count_bound_are_dropped_with_a_count(tmp_path: Path) -> None:
    code = (
        "import io\n"
        "from PIL import Image as PILImage\n"
        "from IPython.display import Image, display\n"
        "buffer = io.BytesIO(); PILImage.new('RGB', (4, 4), 'red').save(buffer, 'PNG')\n"
        "for i in range(300):\n"
        "    display(Image(data=buffer.getvalue()))\n"
    )
    async with connect(tmp_path, image_limit=3) as client:
        with anyio.fail_after(SLOW_S):
            result = await call(client, "s", code)
    out = result.structured_content
    assert len(image_blocks(result)) == 3
    assert len(out["images"]) == 3 + ipython_mcp.IMAGE_FILE_ONLY_MAX_COUNT
    dropped = 300 - 3 - ipython_mcp.IMAGE_FILE_ONLY_MAX_COUNT
    assert f"{dropped} were dropped" in out["warning"]
    assert "image not kept: over the image budget" in text_of(result)


async def test_images_past_the_byte_budget_are_saved_to_files_only(tmp_path: Path) -> None:
    # Noise does not compress: each PNG is about 190 KB, so two fit a 500 KB budget.
    code = (
        "import io, os\n"
        "from PIL import Image as PILImage\n"
        "from IPython.display import Image, display\n"
        "for i in range(5):\n"
        "    buffer = io.BytesIO(); PILImage.frombytes('RGB', (256, 256), os.urandom(256 * 256 * 3)).save(buffer, 'PNG')\n"
        "    display(Image(data=buffer.getvalue()))\n"
    )
    async with connect(tmp_path, image_bytes_limit=500_000) as client:
        with anyio.fail_after(QUICK_S):
            result = await call(client, "s", code)
        out = result.structured_content
        assert len(image_blocks(result)) == 2
        assert [Path(image["path"]).stat().st_size for image in out["images"]] == [image["bytes"] for image in out["images"]]
        assert len(out["images"]) == 5
        assert "3 more were only saved to files" in out["warning"] and "500000 bytes per call" in out["warning"]


# --- Our own post-processing never becomes the user's exception ---------------------------------


TRUNCATED_PNG = (
    "import io, os\n"
    "from PIL import Image as PILImage\n"
    "from IPython.display import Image, display\n"
    "buffer = io.BytesIO()\n"
    "PILImage.frombytes('RGB', (2000, 2000), os.urandom(2000 * 2000 * 3)).save(buffer, 'PNG')\n"
    "truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]\n"
)


async def test_a_truncated_image_pillow_cannot_decode_does_not_stop_the_cell(shared_server: Client) -> None:
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            await run(client, "s", TRUNCATED_PNG)
            shown = await call(client, "s", "display(Image(data=truncated))\nprint('the rest of the cell ran')")
            as_result = await call(client, "s", "Image(data=truncated)")
        out = shown.structured_content
        assert out["status"] == "ok", out
        assert out["stdout"] == "the rest of the cell ran\n"
        assert "could not be downscaled" in out["warning"] and "sent as it was" in out["warning"]
        assert len(out["images"]) == 1 and Path(out["images"][0]["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert as_result.structured_content["status"] == "ok"
        assert "could not be downscaled" in as_result.structured_content["warning"]


async def test_a_display_that_is_not_json_does_not_raise_in_the_cell(shared_server: Client) -> None:
    code = (
        "import datetime\n"
        "display({'application/json': {'when': datetime.date(2026, 1, 2)}}, raw=True)\n"
        "print('after')"
    )
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", code)
    assert out["status"] == "ok", out
    assert out["stdout"] == "after\n"
    assert out["display"] == ['{"when": "datetime.date(2026, 1, 2)"}']


# --- A rich result gives the same text as its display -------------------------------------------


RICH_OBJECTS = {
    "markdown": "from IPython.display import Markdown\nobj = Markdown('# hi')",
    "html": "from IPython.display import HTML\nobj = HTML('<b>bold</b>')",
    "latex": "from IPython.display import Latex\nobj = Latex(r'$\\alpha^2$')",
    "json": "from IPython.display import JSON\nobj = JSON({'a': [1, 2]})",
    "repr_html": "class Table:\n    def _repr_html_(self):\n        return '<table><tr><td>1</td></tr></table>'\nobj = Table()",
    "repr_markdown": "class Note:\n    def _repr_markdown_(self):\n        return '*note*'\nobj = Note()",
    "plain_wins_over_html": (
        "class Frame:\n    def __repr__(self):\n        return 'a  b\\n1  2'\n    def _repr_html_(self):\n        return '<table/>'\nobj = Frame()"
    ),
}
EXPECTED_TEXT = {
    "markdown": "# hi",
    "html": "<b>bold</b>",
    "latex": "$\\alpha^2$",
    "json": '{"a": [1, 2]}',
    "repr_html": "<table><tr><td>1</td></tr></table>",
    "repr_markdown": "*note*",
    "plain_wins_over_html": "a  b\n1  2",
}


@pytest.mark.parametrize("kind", sorted(RICH_OBJECTS))
async def test_a_rich_last_expression_gives_the_same_text_as_its_display(shared_server: Client, kind: str) -> None:
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            await run(client, "s", RICH_OBJECTS[kind])
            out = await run(client, "s", "display(obj)\nobj")
    assert out["status"] == "ok"
    assert out["result"] == out["display"][0] == EXPECTED_TEXT[kind]


async def test_a_dataframe_last_expression_gives_its_table_text(shared_server: Client) -> None:
    pytest.importorskip("pandas")  # the sessions run in this interpreter
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2]})\ndisplay(df)\ndf")
    assert out["result"] == out["display"][0] and "a" in out["result"] and "object" not in out["result"]


async def test_a_rich_result_is_cut_in_the_middle_and_saved_like_a_plain_one(tmp_path: Path) -> None:
    code = "class Big:\n    def _repr_html_(self):\n        return '<p>' + 'h' * 50_000 + '</p>'\nBig()"
    async with connect(tmp_path, output_limit=1000) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", code)
        assert out["status"] == "ok"
        assert len(out["result"]) < 1200
        assert out["result"].startswith("<p>hhh") and out["result"].endswith("hhh</p>")
        saved = out["warning"].split("Full text: ")[1].split()[0]
        assert Path(saved).read_text() == "<p>" + "h" * 50_000 + "</p>"


async def test_plain_results_are_unchanged(shared_server: Client) -> None:
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            assert (await run(client, "s", "1 + 1"))["result"] == "2"
            assert (await run(client, "s", "'text'"))["result"] == "'text'"
            assert (await run(client, "s", "class Bare: pass\nBare()"))["result"].startswith("<__main__.Bare")


# --- No terminal control sequences in what the agent reads --------------------------------------


COLOURED = (
    "import sys\n"
    "print('\\x1b[1;31mred\\x1b[0m and \\x1b]8;;https://example.com\\x1b\\\\a link\\x1b]8;;\\x1b\\\\ and \\x1b]0;title\\x07end')\n"
    "print('  0%\\r\\x1b[32m 50%\\x1b[0m\\r\\x1b[32m100%\\x1b[0m\\x1b[K')\n"
    "print('\\x1b[2A\\x1b[10Cmoved\\x1b(B\\x1b7\\x1b8', file=sys.stderr)\n"
    "display({'text/plain': '\\x1b[1mbold display\\x1b[0m'}, raw=True)\n"
)


async def test_terminal_escape_sequences_are_removed_from_stdout_stderr_display_and_the_text_block(shared_server: Client) -> None:
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            result = await call(client, "s", COLOURED)
    out = result.structured_content
    assert out["stdout"] == "red and a link and end\n100%\n"
    assert out["stderr"] == "moved\n"
    assert out["display"] == ["bold display"]
    assert "\x1b" not in text_of(result) and "red and a link and end" in text_of(result)


async def test_the_saved_full_text_keeps_the_raw_escape_sequences(tmp_path: Path) -> None:
    code = "for i in range(200):\n    print(f'\\x1b[31mline {i}\\x1b[0m')"
    async with connect(tmp_path, output_limit=1000) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", code)
        assert "\x1b" not in out["stdout"] and out["stdout"].startswith("line 0\n")
        saved = Path(out["output_files"]["stdout"]).read_text()
        assert "\x1b[31mline 199\x1b[0m" in saved


def test_reply_text_removes_every_kind_of_terminal_sequence() -> None:
    raw = (
        "\x1b[38;5;208morange\x1b[0m "  # CSI colour
        "\x1b]8;id=1;https://x.y\x1b\\link\x1b]8;;\x1b\\ "  # OSC 8 hyperlink, ended by ST
        "\x1b]2;title\x07"  # OSC ended by BEL
        "\x1bP1$r0m\x1b\\"  # DCS string
        "\x9b1mc1\x9b0m "  # the one-character CSI
        "\x1b=\x1b>\x1b(0\x1bM"  # keypad, charset, reverse index
        "plain [brackets] and ]8;; stay"
    )
    assert ipython_mcp.reply_text(raw) == "orange link c1 plain [brackets] and ]8;; stay"


async def test_terminal_sequences_in_an_exception_message_are_removed_from_the_error(shared_server: Client) -> None:
    async with own_sessions(shared_server) as client:
        with anyio.fail_after(QUICK_S):
            out = await run(client, "s", "raise ValueError('see \\x1b]8;;https://example.com\\x1b\\\\the docs\\x1b]8;;\\x1b\\\\')")
    assert out["status"] == "error"
    assert out["error"].endswith("ValueError: see the docs")
