"""Rich output and long cells (issue 6), through real MCP clients and real kernels.

Images (matplotlib, ``IPython.display.Image``, ``_repr_png_``, Pillow) come back as MCP
image blocks and as files; ``display()`` of text forms, ``clear_output`` and carriage-return
redraws; progress notifications for long cells; cells left running with
``on_timeout='continue'`` and followed with ``wait``; tracebacks as plain text.

Like ``test_ipython_mcp.py``: each test gets its own in-memory server (its kernels die with
it), is bounded by ``anyio.fail_after``, and synchronises on output, results or files,
never on a sleep. A cell that must still be running when the test acts loops until the
test creates a release file.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

import ipython_mcp
from conftest import FAILED, QUICK_S, SLOW_S, connect, run, stdio_parameters, text_of

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
ANSI_ESCAPE = re.compile(r"\x1b\[")
# The longest side the server promises for an image (what vision models use unscaled).
MAX_SIDE_PX = 1568

pytestmark = pytest.mark.anyio


# --- Helpers of this file -------------------------------------------------------------------------


async def call(client: Client, tool: str, **arguments: Any) -> Any:
    """A tool call that answers with structured content (a tool error only when its cell failed)."""
    result = await client.call_tool(tool, arguments)
    assert result.structured_content is not None, text_of(result)
    assert result.is_error == (result.structured_content.get("status") in FAILED)
    assert result.content[0].type == "text", "every result carries a readable text block first"
    return result


def image_blocks(result: Any) -> list[tuple[str, bytes]]:
    """(mime type, decoded bytes) of each image content block, in order."""
    return [(block.mime_type, base64.b64decode(block.data)) for block in result.content if block.type == "image"]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which always comes first."""
    assert data.startswith(PNG_SIGNATURE), data[:16]
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def touch(path: Path) -> None:
    path.write_text("")


def loop_until(release: Path, body: str = "") -> str:
    """Cell code that prints numbered steps until ``release`` exists, then ends with 'finished'."""
    return (
        "import os, time\n"
        f"{body}"
        "step = 0\n"
        f"while not os.path.exists({str(release)!r}):\n"
        "    print('step', step, flush=True)\n"
        "    step += 1\n"
        "    time.sleep(0.1)\n"
        "'finished'"
    )


# Cell code that makes small PNG/JPEG images with Pillow (it comes with matplotlib).
MAKE_PNG = (
    "import io\n"
    "from PIL import Image as PILImage\n"
    "def make(width, height, fmt='PNG'):\n"
    "    buffer = io.BytesIO()\n"
    "    PILImage.new('RGB', (width, height), 'teal').save(buffer, fmt)\n"
    "    return buffer.getvalue()\n"
)


# --- Images: matplotlib ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module-wide, for the module-scoped server below


@pytest.fixture(scope="module")
async def plots(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """One in-memory server whose session 's' has imported pyplot (a second of CPU per kernel),
    shared by the tests that make figures and read what their one cell showed: every figure is
    sent and closed at the end of its cell, so no test sees another's (one asserts exactly that).
    ``%matplotlib inline`` before the first import has a fresh kernel of its own."""
    async with connect(tmp_path_factory.mktemp("plots")) as client:
        with anyio.fail_after(SLOW_S):
            out = await run(client, "s", "import matplotlib.pyplot as plt")
        assert out["status"] == "ok", out["error"]
        yield client


async def test_plt_show_gives_exactly_one_png_block_matching_its_structured_entry_and_file(plots: Client) -> None:
    with anyio.fail_after(SLOW_S):
        code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
        result = await call(plots, "execute", session="s", code=code)
    out = result.structured_content
    assert out["status"] == "ok", out["error"]
    [(mime, png)] = image_blocks(result)
    assert mime == "image/png"
    width, height = png_size(png)
    assert 100 < width <= MAX_SIDE_PX and 100 < height <= MAX_SIDE_PX
    [info] = out["images"]
    assert (info["index"], info["mime_type"], info["bytes"]) == (0, "image/png", len(png))
    assert Path(info["path"]).read_bytes() == png
    assert info["path"] in text_of(result), "the text block names the file for clients without images"


async def test_a_figure_left_open_at_the_end_of_a_cell_appears_once(plots: Client) -> None:
    with anyio.fail_after(SLOW_S):
        result = await call(plots, "execute", session="s", code="import matplotlib.pyplot as plt\nplt.plot([1, 2])\nx = 1")
    out = result.structured_content
    assert out["status"] == "ok", out["error"]
    assert [mime for mime, _ in image_blocks(result)] == ["image/png"]
    assert len(out["images"]) == 1


async def test_two_figures_in_one_cell_come_back_in_the_order_they_were_made(plots: Client) -> None:
    code = (
        "import matplotlib.pyplot as plt\n"
        "plt.figure(figsize=(6, 1.5)); plt.plot([1, 2])\n"  # wide
        "plt.figure(figsize=(1.5, 6)); plt.plot([2, 1])\n"  # tall
    )
    with anyio.fail_after(SLOW_S):
        result = await call(plots, "execute", session="s", code=code)
    sizes = [png_size(png) for _, png in image_blocks(result)]
    assert len(sizes) == 2, sizes
    (wide_w, wide_h), (tall_w, tall_h) = sizes
    assert wide_w > 2 * wide_h, "the first figure made comes first"
    assert tall_h > 2 * tall_w
    assert [info["index"] for info in result.structured_content["images"]] == [0, 1]


async def test_figures_are_closed_after_they_are_sent(plots: Client) -> None:
    with anyio.fail_after(SLOW_S):
        await run(plots, "s", "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.figure()\nplt.plot([3])")
        after = await call(plots, "execute", session="s", code="x = 2\nplt.get_fignums()")
    assert after.structured_content["result"] == "[]"
    assert image_blocks(after) == [], "a figure shown once is not shown again by the next cell"
    assert after.structured_content["images"] == []


async def test_a_figure_closed_in_the_cell_is_not_shown(plots: Client) -> None:
    with anyio.fail_after(SLOW_S):
        code = "import matplotlib.pyplot as plt\nfig = plt.figure()\nplt.plot([1])\nplt.close(fig)"
        result = await call(plots, "execute", session="s", code=code)
    assert image_blocks(result) == []


async def test_a_huge_figure_is_downscaled_to_the_image_budget_with_a_warning(plots: Client) -> None:
    code = "import matplotlib.pyplot as plt\nplt.figure(figsize=(40, 30), dpi=100)\nplt.plot(range(100))\nplt.show()"
    with anyio.fail_after(SLOW_S):
        result = await call(plots, "execute", session="s", code=code)
    out = result.structured_content
    [(_, png)] = image_blocks(result)
    assert max(png_size(png)) <= MAX_SIDE_PX
    assert max(png_size(png)) > MAX_SIDE_PX // 2, "scaled to fit, not shrunk to a thumbnail"
    assert out["warning"] and "downscaled" in out["warning"]
    assert out["images"][0]["bytes"] == len(png) <= ipython_mcp.IMAGE_MAX_BYTES


# --- Images: IPython.display, _repr_png_, Pillow ----------------------------------------------------


async def test_displayed_ipython_image_comes_back_with_its_own_bytes(client: Client) -> None:
    code = MAKE_PNG + "from IPython.display import Image, display\npng = make(11, 13)\ndisplay(Image(data=png))\nlen(png)"
    with anyio.fail_after(QUICK_S):
        result = await call(client, "execute", session="s", code=code)
    out = result.structured_content
    [(mime, png)] = image_blocks(result)
    assert mime == "image/png"
    assert png_size(png) == (11, 13)
    assert out["result"] == str(len(png)), "small images are passed through unchanged"
    assert Path(out["images"][0]["path"]).read_bytes() == png


async def test_displayed_jpeg_comes_back_as_a_jpeg_block(client: Client) -> None:
    code = MAKE_PNG + "from IPython.display import Image, display\ndisplay(Image(data=make(9, 9, 'JPEG'), format='jpeg'))"
    with anyio.fail_after(QUICK_S):
        result = await call(client, "execute", session="s", code=code)
    [(mime, jpeg)] = image_blocks(result)
    assert mime == "image/jpeg"
    assert jpeg.startswith(JPEG_SIGNATURE)
    [info] = result.structured_content["images"]
    assert info["mime_type"] == "image/jpeg" and info["path"].endswith(".jpg")


async def test_display_of_an_object_with_repr_png_shows_its_image(client: Client) -> None:
    code = MAKE_PNG + (
        "from IPython.display import display\n"
        "class Chart:\n"
        "    def _repr_png_(self):\n"
        "        return make(7, 5)\n"
        "display(Chart())"
    )
    with anyio.fail_after(QUICK_S):
        result = await call(client, "execute", session="s", code=code)
    [(mime, png)] = image_blocks(result)
    assert (mime, png_size(png)) == ("image/png", (7, 5))


async def test_a_pil_image_as_last_expression_comes_back_as_an_image(client: Client) -> None:
    code = "from PIL import Image\nImage.new('RGB', (30, 20), 'red')"
    with anyio.fail_after(QUICK_S):
        result = await call(client, "execute", session="s", code=code)
    out = result.structured_content
    [(mime, png)] = image_blocks(result)
    assert (mime, png_size(png)) == ("image/png", (30, 20))
    assert out["result"] and "PIL" in out["result"], "the text repr is still the result"
    [info] = out["images"]
    assert Path(info["path"]).read_bytes() == png


async def test_a_huge_image_as_last_expression_is_downscaled_too(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        result = await call(client, "execute", session="s", code="from PIL import Image\nImage.new('RGB', (4000, 3000), 'red')")
    [(_, png)] = image_blocks(result)
    assert max(png_size(png)) <= MAX_SIDE_PX
    assert result.structured_content["warning"] and "downscaled" in result.structured_content["warning"]


@pytest.mark.parametrize("show", ["fig", "display(fig)"])
async def test_a_figure_shown_explicitly_and_left_open_appears_once(plots: Client, show: str) -> None:
    code = f"import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2])\n{show}"
    with anyio.fail_after(SLOW_S):
        result = await call(plots, "execute", session="s", code=code)
    assert len(image_blocks(result)) == 1
    assert len(result.structured_content["images"]) == 1


async def test_matplotlib_inline_magic_works_and_figures_still_appear_once(client: Client) -> None:
    with anyio.fail_after(SLOW_S):
        magic = await run(client, "s", "%matplotlib inline")
        result = await call(client, "execute", session="s", code="import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()")
    assert magic["status"] == "ok", magic["error"]
    assert len(image_blocks(result)) == 1


# --- display() of text forms ----------------------------------------------------------------------


async def test_display_of_markdown_gives_its_markdown_text(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        code = "from IPython.display import Markdown, display\ndisplay(Markdown('**x**'))"
        result = await call(client, "execute", session="s", code=code)
    out = result.structured_content
    assert out["display"] == ["**x**"]
    assert "**x**" in text_of(result)
    assert image_blocks(result) == []


async def test_display_of_html_gives_its_html_since_its_plain_text_is_only_a_default_repr(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", "from IPython.display import HTML, display\ndisplay(HTML('<b>x</b>'))")
    assert out["display"] == ["<b>x</b>"]


async def test_print_and_display_appear_in_the_order_the_cell_produced_them(client: Client) -> None:
    code = "from IPython.display import Markdown, display\nprint('alpha')\ndisplay(Markdown('middle'))\nprint('omega')"
    with anyio.fail_after(QUICK_S):
        result = await call(client, "execute", session="s", code=code)
    text = result.content[0].text
    assert 0 <= text.index("alpha") < text.index("middle") < text.index("omega")
    out = result.structured_content
    assert (out["stdout"], out["display"]) == ("alpha\nomega\n", ["middle"])


# --- clear_output and carriage-return redraws -------------------------------------------------------


async def test_clear_output_in_a_loop_leaves_only_the_last_output(client: Client) -> None:
    code = "from IPython.display import clear_output\nfor i in range(1000):\n    clear_output(wait=True)\n    print(i)"
    with anyio.fail_after(QUICK_S):
        result = await call(client, "execute", session="s", code=code)
    assert result.structured_content["stdout"] == "999\n"
    assert "998" not in result.content[0].text


async def test_carriage_return_redraws_come_back_as_their_last_state(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        code = "import sys\nfor i in range(10000):\n    print(f'\\r{i}', end='')\nsys.stderr.write('\\r50%\\r100%\\n')"
        out = await run(client, "s", code)
    assert out["stdout"] == "9999"
    assert out["stderr"] == "100%\n"


async def test_images_redrawn_with_clear_output_are_numbered_from_zero_in_the_text_block(client: Client) -> None:
    code = MAKE_PNG + (
        "from IPython.display import Image, clear_output, display\n"
        "for i in range(3):\n"
        "    clear_output(wait=True)\n"
        "    display(Image(data=make(5 + i, 5)))"
    )
    with anyio.fail_after(QUICK_S):
        result = await call(client, "execute", session="s", code=code)
    [(_, png)] = image_blocks(result)
    assert png_size(png) == (7, 5), "the last image drawn is the one kept"
    assert "[image 0: image/png]" in result.content[0].text


async def test_clear_output_with_wait_and_nothing_after_it_keeps_the_output(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", "from IPython.display import clear_output\nprint('final state')\nclear_output(wait=True)")
    assert out["stdout"] == "final state\n"


# --- Progress notifications -----------------------------------------------------------------------


PROGRESS_CELL = "import time\nfor i in range({lines}):\n    print('line', i, flush=True)\n    time.sleep(0.5)"
PROGRESS_MESSAGE = re.compile(r"(\d+(?:\.\d+)?) s\b.*\bline (\d+)")


def check_progress_updates(updates: list[tuple[float, float | None, str | None]], lines: int) -> None:
    """Several updates, elapsed time rising, each naming the elapsed seconds and a printed line."""
    assert len(updates) >= 2, updates
    progress_values = [progress for progress, _, _ in updates]
    assert progress_values == sorted(progress_values) and len(set(progress_values)) == len(progress_values)
    seen_lines = []
    for progress, _, message in updates:
        match = PROGRESS_MESSAGE.search(message or "")
        assert match, message
        assert abs(float(match.group(1)) - progress) < 0.2, "the message states the elapsed seconds"
        seen_lines.append(int(match.group(2)))
    assert all(0 <= line < lines for line in seen_lines)
    assert seen_lines == sorted(seen_lines), "each message carries the latest line, never an older one"
    assert len(set(seen_lines)) >= 2


async def test_a_long_cell_sends_progress_with_elapsed_time_and_latest_line(client: Client) -> None:
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    with anyio.fail_after(QUICK_S):
        await run(client, "s", "1")  # kernel started, so the cell's time is its own
        arguments = {"session": "s", "code": PROGRESS_CELL.format(lines=6)}
        result = await client.call_tool("execute", arguments, progress_callback=on_progress)
    assert result.structured_content["status"] == "ok"
    check_progress_updates(updates, lines=6)
    assert len(updates) >= 3, "a 3 s cell gets an update every half second after the first second"


async def test_a_quick_cell_sends_no_progress(client: Client) -> None:
    updates: list[Any] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, message))

    with anyio.fail_after(QUICK_S):
        await run(client, "s", "1")
        result = await client.call_tool("execute", {"session": "s", "code": "print('quick')\n2"}, progress_callback=on_progress)
    assert result.structured_content["result"] == "2"
    assert updates == []


async def test_progress_reaches_a_client_over_stdio_as_notifications(tmp_path: Path) -> None:
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    parameters = stdio_parameters("--output-dir", str(tmp_path), "--spare-kernels", "0")
    with anyio.fail_after(SLOW_S):
        async with Client(parameters) as client:
            await run(client, "s", "1")
            arguments = {"session": "s", "code": PROGRESS_CELL.format(lines=5)}
            result = await client.call_tool("execute", arguments, progress_callback=on_progress)
    assert result.structured_content["status"] == "ok"
    check_progress_updates(updates, lines=5)


# --- Long cells: on_timeout='continue', busy, wait, interrupt, reset --------------------------------


async def test_a_cell_left_running_is_followed_with_wait_without_repeats_until_its_result(client: Client, tmp_path: Path) -> None:
    release = tmp_path / "release"
    pieces: list[str] = []
    with anyio.fail_after(QUICK_S):
        await run(client, "s", "1")  # start the kernel: the 1 s below is the cell's own
        first = await run(client, "s", loop_until(release), timeout_s=1, on_timeout="continue")
        pieces.append(first["stdout"])

        started = time.monotonic()
        busy = await run(client, "s", "ran_while_busy = True")
        busy_took = time.monotonic() - started
        info = {i["name"]: i for i in (await call(client, "list_sessions")).structured_content["sessions"]}["s"]

        middle = (await call(client, "wait", session="s", timeout_s=0.3)).structured_content
        pieces.append(middle["stdout"])
        touch(release)
        final = (await call(client, "wait", session="s", timeout_s=QUICK_S)).structured_content
        pieces.append(final["stdout"])
        after = await run(client, "s", "'ran_while_busy' in globals()")

    assert first["status"] == "running"
    assert first["stdout"].startswith("step 0\n"), "the output so far comes back with 'running'"
    assert (first["result"], first["execution_count"]) == (None, None)
    assert first["warning"] and "wait" in first["warning"]

    assert busy["status"] == "busy"
    assert busy_took < 1.0, "busy answers at once instead of queueing behind the cell"
    assert busy["error"] and "wait" in busy["error"]
    assert (busy["stdout"], busy["execution_count"]) == ("", None)

    assert info["status"] == "busy"
    assert info["busy_s"] and info["busy_s"] > 0

    assert middle["status"] == "running"
    assert final["status"] == "ok", final["error"]
    assert (final["result"], final["execution_count"]) == ("'finished'", 2)

    steps = "".join(pieces).splitlines()
    assert steps == [f"step {i}" for i in range(len(steps))], "each step exactly once, in order, across calls"
    assert after["result"] == "False", "the code sent while busy never ran"
    assert after["execution_count"] == 3


async def test_interrupt_stops_a_cell_left_running_and_wait_reports_keyboard_interrupt(client: Client, tmp_path: Path) -> None:
    release = tmp_path / "never"
    with anyio.fail_after(QUICK_S):
        first = await run(client, "s", loop_until(release, body="kept = 41\n"), timeout_s=0.5, on_timeout="continue")
        answer = await call(client, "interrupt", session="s")
        ended = (await call(client, "wait", session="s", timeout_s=QUICK_S)).structured_content
        after = await run(client, "s", "kept + 1")
    assert first["status"] == "running"
    assert answer.structured_content["outcome"] == "interrupted"
    assert ended["status"] == "error"
    assert ended["error"].endswith("KeyboardInterrupt")
    assert after["result"] == "42", "the session keeps its state"


async def test_wait_on_a_session_with_nothing_running_is_a_tool_error(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        await run(client, "s", "x = 1")
        result = await client.call_tool("wait", {"session": "s", "timeout_s": 1})
    assert result.is_error
    assert "nothing to wait for" in text_of(result) or "no cell" in text_of(result)


async def test_reset_ends_a_cell_left_running_and_the_next_execute_works_without_state(client: Client, tmp_path: Path) -> None:
    release = tmp_path / "never"
    with anyio.fail_after(QUICK_S):
        first = await run(client, "s", loop_until(release, body="kept = 1\n"), timeout_s=0.5, on_timeout="continue")
        await call(client, "reset", session="s")
        after = await run(client, "s", "'kept' in globals(), 6 * 7")
        nothing = await client.call_tool("wait", {"session": "s", "timeout_s": 1})
        info = {i["name"]: i for i in (await call(client, "list_sessions")).structured_content["sessions"]}["s"]
    assert first["status"] == "running"
    assert after["status"] == "ok"
    assert after["result"] == "(False, 42)"
    assert nothing.is_error, "the cell left running died with the old kernel"
    assert info["status"] == "idle"


async def test_an_invalid_on_timeout_is_a_tool_error(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        result = await client.call_tool("execute", {"session": "s", "code": "1", "on_timeout": "ignore"})
    assert result.is_error
    assert "on_timeout" in text_of(result)


# --- Tracebacks -----------------------------------------------------------------------------------


async def test_traceback_is_plain_text_with_ipython_style_cell_context(client: Client) -> None:
    code = "def inner():\n    raise ValueError('bad value')\n\ninner()"
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", code)
    error = out["error"]
    assert out["status"] == "error"
    assert not ANSI_ESCAPE.search(error)
    assert "Cell In[1]" in error
    assert "----> 4 inner()" in error
    assert "raise ValueError('bad value')" in error
    assert error.endswith("ValueError: bad value")


async def test_deep_recursion_traceback_is_cut_in_the_middle_not_dropped(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", "def dive(n):\n    return dive(n + 1)\n\ndive(0)")
    error = out["error"]
    assert out["status"] == "error"
    assert error.endswith("RecursionError: maximum recursion depth exceeded")
    assert len(error) < 25_000
    assert "Cell In[1]" in error and "dive(0)" in error, "the start of the traceback is kept"
    assert "skipping similar frames" in error or "characters of traceback cut" in error


async def test_a_huge_exception_message_is_cut_in_the_middle_keeping_both_ends(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        out = await run(client, "s", "raise ValueError('start' + 'x' * 100_000 + 'end')")
    error = out["error"]
    assert len(error) < 25_000
    assert "characters of traceback cut" in error
    assert "Cell In[1]" in error[:2000], "the start of the traceback is kept"
    assert error.endswith("xxxend")


# --- The schema ------------------------------------------------------------------------------------


async def test_execute_output_schema_documents_running_busy_display_and_images(client: Client) -> None:
    with anyio.fail_after(QUICK_S):
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    schema = tools["execute"].output_schema
    properties = schema["properties"]
    contract = {"status", "session", "stdout", "stderr", "result", "error", "execution_count", "warning", "duration_s", "output_files"}
    assert contract <= set(properties)
    assert {"ok", "error", "timeout", "env_error", "running", "busy"} <= set(properties["status"]["enum"])
    assert "running" in properties["status"]["description"] and "busy" in properties["status"]["description"]
    assert properties["display"]["type"] == "array"
    assert properties["images"]["type"] == "array"
    image_ref = properties["images"]["items"]["$ref"].rsplit("/", 1)[-1]
    assert set(schema["$defs"][image_ref]["properties"]) >= {"index", "mime_type", "bytes", "path"}
    input_properties = tools["execute"].input_schema["properties"]
    assert set(input_properties["on_timeout"]["enum"]) == {"interrupt", "continue"}
    assert "wait" in tools and tools["wait"].output_schema["properties"]["status"]["enum"] == properties["status"]["enum"]
