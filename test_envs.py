"""Environments: every common Python env works, or says exactly how to fix it, or fixes itself.

Real envs are made in a temporary folder (venvs with and without IPython, a fake conda
prefix, a pixi-style project, a system interpreter); the auto-install test installs
ipykernel from the package index for real (marked ``network``: deselect it offline with
``-m "not network"``). Install hints are checked as pure functions too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

import ipython_mcp
from conftest import QUICK_S, SLOW_S, connect, own_sessions, run
from ipython_mcp import KERNEL_PROTOCOL_VERSION, EnvError, hello_problem, install_plan, interpreter_for, python_in

UV = os.environ.get("UV") or shutil.which("uv")
SYSTEM_PYTHON = Path("/usr/bin/python3")

pytestmark = pytest.mark.anyio


def make_venv(folder: Path, *packages: str, python: str = sys.executable) -> Path:
    """A venv at ``folder`` (no pip), with ``packages`` installed by uv; returns its python."""
    if UV is None:
        pytest.skip("uv is needed to build test envs")
    subprocess.run([UV, "venv", "--quiet", "--python", python, str(folder)], check=True, timeout=120)
    if packages:
        subprocess.run(
            [UV, "pip", "install", "--quiet", "--python", str(folder / "bin" / "python"), *packages], check=True, timeout=300
        )
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def envs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``envs/`` with ``good`` (IPython), ``bare`` (no IPython), ``condaish`` (a conda-like prefix
    without IPython), ``old`` (an IPython that is too old), and ``project/`` (pixi layout)."""
    base = tmp_path_factory.mktemp("envs-home")
    folder = base / "envs"
    make_venv(folder / "good", "ipython")
    make_venv(folder / "bare")
    make_venv(folder / "condaish")
    (folder / "condaish" / "conda-meta").mkdir()
    (folder / "condaish" / "pyvenv.cfg").rename(folder / "condaish" / "pyvenv.cfg.off")
    # A conda prefix has no pyvenv.cfg; keep the interpreter working through a wrapper.
    real = os.path.realpath(folder / "condaish" / "bin" / "python")
    (folder / "condaish" / "bin" / "python").unlink()
    wrapper = folder / "condaish" / "bin" / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {real} -S \"$@\"\n")
    wrapper.chmod(0o755)
    old = make_venv(folder / "old")
    site = next((folder / "old" / "lib").glob("python3*/site-packages"))
    (site / "IPython").mkdir()
    (site / "IPython" / "__init__.py").write_text("__version__ = '6.5.0'\nversion_info = (6, 5, 0)\n")
    assert old.exists()
    project = base / "project"
    make_venv(project / ".pixi" / "envs" / "default", "ipython")
    return folder


@pytest.fixture(scope="module")
async def envs_server(envs: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    """One in-memory server on ``envs``, for the tests that only run sessions in them."""
    async with connect(tmp_path_factory.mktemp("envs-server"), envs_dir=envs) as client:
        yield client


# --- Install hints fit the env (pure functions) ----------------------------------------------------


def test_conda_prefix_hint_uses_mamba_when_on_path_else_conda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = tmp_path / "env"
    (prefix / "conda-meta").mkdir(parents=True)
    (prefix / "bin").mkdir()
    python = prefix / "bin" / "python"
    tools = tmp_path / "tools"
    tools.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    assert install_plan(python).text == f"conda install -p {prefix} -c conda-forge ipykernel"
    (tools / "mamba").write_text("#!/bin/sh\n")
    (tools / "mamba").chmod(0o755)
    assert install_plan(python).text == f"mamba install -p {prefix} -c conda-forge ipykernel"


def test_pixi_env_hint_is_pixi_add_in_the_project_folder(tmp_path: Path) -> None:
    prefix = tmp_path / "proj" / ".pixi" / "envs" / "default"
    (prefix / "conda-meta").mkdir(parents=True)
    plan = install_plan(prefix / "bin" / "python")
    assert plan.text == f"cd {tmp_path / 'proj'} && pixi add ipykernel"
    assert plan.argv == ("pixi", "add", "ipykernel") and plan.cwd == tmp_path / "proj"


def test_venv_hint_is_uv_pip_when_uv_is_on_path_else_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "v" / "bin").mkdir(parents=True)
    (tmp_path / "v" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    python = tmp_path / "v" / "bin" / "python"
    tools = tmp_path / "tools"
    tools.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    assert install_plan(python).text == f"{python} -m pip install ipykernel"
    (tools / "uv").write_text("#!/bin/sh\n")
    (tools / "uv").chmod(0o755)
    assert install_plan(python).text == f"uv pip install --python {python} ipykernel"


def test_interpreter_without_pip_or_uv_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    plan = install_plan(tmp_path / "bin" / "python", has_pip=False)
    assert plan.argv is None
    assert "has no pip" in plan.text and "ensurepip" in plan.text


def test_externally_managed_system_python_is_pointed_at_a_venv(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib" / "python3.11").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "python3.11" / "EXTERNALLY-MANAGED").write_text("[externally-managed]\n")
    plan = install_plan(tmp_path / "usr" / "bin" / "python3")
    assert plan.argv is None
    assert "-m venv" in plan.text and "system package manager" in plan.text


def test_hints_name_the_envs_folder_they_are_given(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib" / "python3.11").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "python3.11" / "EXTERNALLY-MANAGED").write_text("[externally-managed]\n")
    assert f"{tmp_path / 'mine'}/NAME" in install_plan(tmp_path / "usr" / "bin" / "python3", envs_dir=tmp_path / "mine").text
    too_old = hello_problem(
        {"protocol": KERNEL_PROTOCOL_VERSION, "missing": "python", "error": "Python 3.7", "min_python": "3.9", "min_ipython": "7.0"},
        "old", tmp_path / "bin" / "python", tmp_path / "mine",
    )
    assert too_old is not None and f"{tmp_path / 'mine'}/NAME" in too_old.hint


def test_the_minimum_python_in_hints_is_the_one_the_kernel_says(tmp_path: Path) -> None:
    hello = {"protocol": KERNEL_PROTOCOL_VERSION, "missing": "python", "error": "Python 3.10", "min_python": "3.11", "min_ipython": "8.0"}
    too_old = hello_problem(hello, "old", tmp_path / "bin" / "python")
    assert too_old is not None and "Use an env with Python 3.11 or newer" in too_old.hint


def test_a_kernel_speaking_another_protocol_version_is_an_env_error_naming_both(tmp_path: Path) -> None:
    problem = hello_problem({"protocol": KERNEL_PROTOCOL_VERSION + 1, "ipython": "9.0"}, "other", tmp_path / "bin" / "python")
    assert problem is not None
    assert f"protocol version {KERNEL_PROTOCOL_VERSION + 1}" in problem.message
    assert f"this server speaks version {KERNEL_PROTOCOL_VERSION}" in problem.message
    assert hello_problem({"protocol": KERNEL_PROTOCOL_VERSION, "ipython": "9.0"}, "same", tmp_path / "bin" / "python") is None


# --- Env resolution (pure functions) ---------------------------------------------------------------


def test_windows_style_scripts_layout_is_recognised(tmp_path: Path) -> None:
    (tmp_path / "winenv" / "Scripts").mkdir(parents=True)
    (tmp_path / "winenv" / "Scripts" / "python.exe").write_text("")
    assert python_in(tmp_path / "winenv") == tmp_path / "winenv" / "Scripts" / "python.exe"
    assert interpreter_for(str(tmp_path / "winenv"), tmp_path)[1] == tmp_path / "winenv" / "Scripts" / "python.exe"


def test_bare_name_never_guesses_outside_the_envs_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conda = tmp_path / "miniconda" / "envs" / "x"
    (conda / "bin").mkdir(parents=True)
    (conda / "bin" / "python").write_text("")
    monkeypatch.setenv("CONDA_PREFIX", str(tmp_path / "miniconda"))
    with pytest.raises(EnvError) as missing:
        interpreter_for("x", tmp_path / "envs")
    assert missing.value.kind == "no_interpreter"
    assert str(tmp_path / "envs" / "x" / "bin" / "python") in missing.value.message


def test_envs_dir_default_follows_ipython_mcp_envs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPYTHON_MCP_ENVS_DIR", str(tmp_path / "elsewhere"))
    assert ipython_mcp.envs_dir_default() == tmp_path / "elsewhere"
    monkeypatch.delenv("IPYTHON_MCP_ENVS_DIR")
    assert ipython_mcp.envs_dir_default() == Path("~/envs").expanduser()


# --- Real envs through a real client -----------------------------------------------------------------


async def test_pixi_project_folder_runs_in_its_default_env(envs_server: Client, envs: Path) -> None:
    project = envs.parent / "project"
    with anyio.fail_after(QUICK_S):
        async with own_sessions(envs_server) as client:
            out = await run(client, "p", "import sys; sys.executable", env=str(project))
    assert out["status"] == "ok", out
    assert out["result"] == repr(str(project / ".pixi" / "envs" / "default" / "bin" / "python"))


async def test_conda_prefix_without_ipython_gets_a_conda_install_hint(envs_server: Client, envs: Path) -> None:
    with anyio.fail_after(QUICK_S):
        async with own_sessions(envs_server) as client:
            out = await run(client, "c", "1", env="condaish")
    assert out["status"] == "env_error"
    assert "ipykernel not found in env 'condaish'" in out["error"]
    assert f"install -p {envs / 'condaish'} -c conda-forge ipykernel" in out["error"]


async def test_too_old_ipython_is_env_error_naming_the_minimum(envs_server: Client, envs: Path) -> None:
    with anyio.fail_after(QUICK_S):
        async with own_sessions(envs_server) as client:
            out = await run(client, "o", "1", env="old")
    assert out["status"] == "env_error"
    assert "IPython 6.5.0 is older than the 7.0" in out["error"]
    assert "Install with:" in out["error"]


async def test_missing_env_lists_the_envs_that_exist(envs_server: Client, envs: Path) -> None:
    with anyio.fail_after(QUICK_S):
        async with own_sessions(envs_server) as client:
            out = await run(client, "m", "1", env="goood")
    assert out["status"] == "env_error"
    assert str(envs / "goood" / "bin" / "python") in out["error"]
    assert "good" in out["error"].split("Envs found in")[1]
    assert "python3 -m venv" in out["error"]


async def test_list_envs_shows_versions_and_what_is_usable(tmp_path: Path, envs: Path) -> None:
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, envs_dir=envs) as client:
            result = await client.call_tool("list_envs", {})
            started = time.monotonic()
            again = await client.call_tool("list_envs", {})
            cached_s = time.monotonic() - started
    assert not result.is_error
    listing = {env["name"]: env for env in result.structured_content["envs"]}
    assert listing["default"]["usable"] and listing["default"]["python"] == sys.executable
    assert listing["good"]["usable"] and listing["good"]["ipython_version"]
    assert listing["good"]["python_version"] == "%d.%d.%d" % sys.version_info[:3]
    assert not listing["bare"]["usable"] and "Install with:" in listing["bare"]["problem"]
    assert "good" in result.content[0].text and "not usable" in result.content[0].text
    assert again.structured_content == result.structured_content
    assert cached_s < 1.0, "a second listing is answered from the cache"


async def test_auto_install_is_off_by_default_and_installs_nothing(envs_server: Client, envs: Path) -> None:
    with anyio.fail_after(QUICK_S):
        async with own_sessions(envs_server) as client:
            out = await run(client, "b", "1", env="bare")
    assert out["status"] == "env_error"
    assert not list((envs / "bare" / "lib").glob("python3*/site-packages/IPython"))


async def test_failed_auto_install_is_env_error_with_the_installers_words(tmp_path: Path, envs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # neither mamba nor conda can be found
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, envs_dir=envs, auto_install=True) as client:
            out = await run(client, "c", "1", env="condaish")
    assert out["status"] == "env_error"
    assert "conda install" in out["error"] and "install ipykernel into env 'condaish'" in out["error"]


@pytest.mark.network
async def test_auto_install_installs_ipykernel_and_starts_the_session(tmp_path: Path) -> None:
    envs_dir = tmp_path / "envs"
    make_venv(envs_dir / "fresh")
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    with anyio.fail_after(300):
        async with connect(tmp_path, envs_dir=envs_dir, auto_install=True) as client:
            result = await client.call_tool(
                "execute", {"session": "f", "code": "import IPython, sys; sys.executable", "env": "fresh"}, progress_callback=on_progress
            )
    out = result.structured_content
    assert out["status"] == "ok", out
    assert out["result"] == repr(str(envs_dir / "fresh" / "bin" / "python"))
    assert "ipykernel was installed into env 'fresh'" in out["warning"]
    assert any(message.startswith("installing ipykernel") for message in messages)


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no system Python at /usr/bin/python3")
async def test_system_python_and_the_default_run_side_by_side(tmp_path: Path) -> None:
    """Debian's /usr/bin/python3 (in a venv with IPython) next to the server's own Python."""
    system_env = tmp_path / "system-env"
    make_venv(system_env, "ipython", python=str(SYSTEM_PYTHON))
    code = "import sys; (sys.executable, sys.base_prefix)"
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, envs_dir=tmp_path / "envs") as client:
            async with anyio.create_task_group() as group:
                outs: dict[str, Any] = {}

                async def one(name: str, env: str | None) -> None:
                    outs[name] = await run(client, name, code, **({"env": env} if env else {}))

                group.start_soon(one, "ours", None)
                group.start_soon(one, "system", str(system_env))
            listing = await client.call_tool("list_sessions", {})
    assert outs["ours"]["status"] == outs["system"]["status"] == "ok"
    assert str(system_env / "bin" / "python") in outs["system"]["result"]
    assert outs["ours"]["result"] != outs["system"]["result"]
    shown = {s["name"]: s["python"] for s in listing.structured_content["sessions"]}
    assert shown == {"ours": sys.executable, "system": str(system_env / "bin" / "python")}


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no system Python at /usr/bin/python3")
async def test_system_python_without_ipython_gets_a_hint_it_can_follow(tmp_path: Path) -> None:
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import IPython"], check=False, capture_output=True)
    if probe.returncode == 0:
        pytest.skip("the system Python has IPython")
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, envs_dir=tmp_path / "envs") as client:
            out = await run(client, "sys", "1", env=str(SYSTEM_PYTHON))
    assert out["status"] == "env_error"
    assert f"python: {SYSTEM_PYTHON}" in out["error"]
    assert "Install with:" in out["error"]


# --- Other Python versions: the oldest supported, newer ones side by side, too old ----------------


def pythons(*versions: str) -> list[Path]:
    """Interpreters of these minor versions on this machine (pyenv's, the system's), newest first."""
    found: list[Path] = []
    for version in versions:
        candidates = sorted(Path("~/.pyenv/versions").expanduser().glob(f"{version}.*/bin/python{version}"), reverse=True)
        candidates += [Path(f"/usr/bin/python{version}"), Path(f"/usr/local/bin/python{version}")]
        found += [path for path in candidates if path.is_file()][:1]
    return found


OTHER_MINOR = [p for p in pythons("3.13", "3.12", "3.10", "3.9") if not p.name.endswith("%d.%d" % sys.version_info[:2])]
TOO_OLD = pythons("3.8", "3.7", "3.6")


@pytest.mark.skipif(not pythons("3.9"), reason="no Python 3.9 on this machine")
async def test_the_oldest_supported_python_3_9_runs_a_session(tmp_path: Path) -> None:
    python = make_venv(tmp_path / "py39", "ipython", python=str(pythons("3.9")[0]))
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, envs_dir=tmp_path / "envs") as client:
            out = await run(client, "old", "import sys\nprint('hi')\nsys.version_info[:2]", env=str(python))
            failed = await run(client, "old", "1/0")
    assert (out["status"], out["stdout"], out["result"]) == ("ok", "hi\n", "(3, 9)"), out
    assert failed["error"].endswith("ZeroDivisionError: division by zero")


@pytest.mark.skipif(not OTHER_MINOR, reason="no Python of another minor version on this machine")
async def test_sessions_on_different_python_versions_run_side_by_side(tmp_path: Path) -> None:
    other = make_venv(tmp_path / "other", "ipython", python=str(OTHER_MINOR[0]))
    code = "import sys\nsys.version_info[:2]"
    with anyio.fail_after(SLOW_S):
        async with connect(tmp_path, envs_dir=tmp_path / "envs") as client:
            ours = await run(client, "ours", code)
            theirs = await run(client, "theirs", code, env=str(other))
            listing = await client.call_tool("list_sessions", {})
    assert ours["result"] == repr(sys.version_info[:2])
    assert theirs["result"] != ours["result"] and theirs["status"] == "ok"
    versions = {s["name"]: s["python_version"] for s in listing.structured_content["sessions"]}
    assert versions["ours"] != versions["theirs"]


@pytest.mark.skipif(not TOO_OLD, reason="no Python older than 3.9 on this machine")
async def test_a_python_older_than_3_9_is_env_error_naming_the_minimum(tmp_path: Path) -> None:
    with anyio.fail_after(QUICK_S):
        async with connect(tmp_path, envs_dir=tmp_path / "envs") as client:
            out = await run(client, "old", "1", env=str(TOO_OLD[0]))
    assert out["status"] == "env_error"
    assert "older than the 3.9 this kernel needs" in out["error"]
    assert "Python 3.9 or newer" in out["error"] and "uv venv" in out["error"]
