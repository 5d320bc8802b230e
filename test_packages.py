"""Packages: `%pip` and `!pip` in a session install into that session's own interpreter.

Each test makes a real env in a temporary folder (a uv venv without pip, a venv with pip, a
venv without pip where no uv can be found, a project folder with `.venv`) that borrows IPython
from the test run's own site-packages through a `.pth` line (the way `uv run --with` layers
envs), so no env needs the package index. What gets installed is a tiny wheel written by the
test. The one test that asks PyPI for a package that does not exist is marked ``network``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from conftest import BOOTSTRAP, connect, own_sessions, run, stdio_parameters, wait_until_gone

pytestmark = pytest.mark.anyio

UV = os.environ.get("UV") or shutil.which("uv")
# Making a venv with pip (ensurepip) and installing with pip take seconds, or a minute on a
# loaded machine; install cells get INSTALL_S, each test PACKAGE_TEST_S.
INSTALL_S = 150
PACKAGE_TEST_S = 240


def make_wheel(folder: Path, name: str) -> Path:
    """A wheel of the one-module package ``name``, whose module says where it was imported from."""
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": "import os\nWHERE = os.path.dirname(os.path.abspath(__file__))\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test_packages\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def borrow_ipython(env: Path) -> Path:
    """Let the env import IPython (and mcp) from this test run's site-packages; returns its python."""
    site_packages = next((env / "lib").glob("python3*/site-packages"))
    (site_packages / "_borrowed_from_the_test_run.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env / "bin" / "python"


def uv_venv(env: Path) -> Path:
    """A venv made by uv: no pip in it, like the env `uv run ipython_mcp.py` makes."""
    if UV is None:
        pytest.skip("uv is needed to make a venv without pip")
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, str(env)], check=True, timeout=120)
    return borrow_ipython(env)


def std_venv(env: Path, with_pip: bool) -> Path:
    command = [sys.executable, "-m", "venv", str(env)] + ([] if with_pip else ["--without-pip"])
    subprocess.run(command, check=True, timeout=PACKAGE_TEST_S)
    return borrow_ipython(env)


def has_pip(python: Path) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('pip') is None)"
    return subprocess.run([str(python), "-c", probe], check=False, timeout=60).returncode == 0


async def ok(client: Client, session: str, code: str, **arguments: Any) -> dict[str, Any]:
    out = await run(client, session, code, **arguments)
    assert out["status"] == "ok", out
    return out


async def test_pip_magic_in_the_default_env_of_a_uv_started_server_installs_with_uv_and_imports_at_once(
    tmp_path: Path,
) -> None:
    # The server runs in a uv-made env without pip, with UV set, as `uv run ipython_mcp.py` starts it.
    server_env = tmp_path / "server-env"
    python = uv_venv(server_env)
    wheel = make_wheel(tmp_path / "wheels", "probe_default")
    params = stdio_parameters(command=[python], UV=UV, IPYTHON_MCP_SPARE_KERNELS="0", IPYTHON_MCP_ENVS_DIR=str(tmp_path))
    with anyio.fail_after(PACKAGE_TEST_S):
        async with Client(params) as client:
            install = await ok(client, "s", f"%pip install {wheel}")
            assert "probe-default" in (install["stdout"] + install["stderr"]).replace("_", "-"), install
            imported = await ok(client, "s", "import probe_default; probe_default.WHERE")
            assert imported["result"].strip("'").startswith(str(server_env)), imported
            shell = await ok(client, "s", "!python -c 'import sys; print(sys.prefix)'")
            assert shell["stdout"].strip() == str(server_env)
    assert not has_pip(python), "uv installed the package; pip was not put into the server's env"


async def test_pip_magic_in_a_venv_with_pip_uses_its_pip_and_the_package_imports_at_once(shared_server: Client, tmp_path: Path) -> None:
    env = tmp_path / "with-pip"
    with anyio.fail_after(PACKAGE_TEST_S):
        std_venv(env, with_pip=True)
        wheel = make_wheel(tmp_path / "wheels", "probe_pip")
        async with own_sessions(shared_server) as client:
            install = await ok(client, "v", f"%pip install {wheel}", env=str(env), timeout_s=INSTALL_S)
            assert "Successfully installed probe" in install["stdout"], install
            imported = await ok(client, "v", "import probe_pip; probe_pip.WHERE")
            assert imported["result"].strip("'").startswith(str(env)), imported
            await ok(client, "v", "%pip uninstall probe_pip", timeout_s=INSTALL_S)  # no -y: nobody could answer the prompt
            gone = await run(client, "v", "%pip show probe_pip", timeout_s=INSTALL_S)
            assert gone["status"] == "error", gone


async def test_pip_magic_in_a_venv_without_pip_installs_lists_and_uninstalls_with_uv(shared_server: Client, tmp_path: Path) -> None:
    env = tmp_path / "no-pip"
    python = uv_venv(env)
    wheel = make_wheel(tmp_path / "wheels", "probe_uv")
    with anyio.fail_after(PACKAGE_TEST_S):
        async with own_sessions(shared_server) as client:
            await ok(client, "u", f"%pip install {wheel}", env=str(env))
            imported = await ok(client, "u", "import probe_uv; probe_uv.WHERE")
            assert imported["result"].strip("'").startswith(str(env)), imported
            listed = await ok(client, "u", "%pip list")
            assert "probe-uv" in listed["stdout"].replace("_", "-"), listed
            await ok(client, "u", "%pip uninstall probe_uv")
            gone = await run(client, "u", "%pip show probe_uv")
            assert gone["status"] == "error", gone
    assert not has_pip(python)


# Slow: ensurepip, then pip, in the cell (a minute on a loaded machine). Its quicker siblings in the
# default run: pip in a venv that has it, and uv in one without (the same `%pip` dispatch).
@pytest.mark.slow
async def test_pip_magic_where_neither_pip_nor_uv_is_found_bootstraps_pip_with_ensurepip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = tmp_path / "bare"
    python = std_venv(env, with_pip=False)
    wheel = make_wheel(tmp_path / "wheels", "probe_ensurepip")
    monkeypatch.delenv("UV", raising=False)
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not os.path.exists(os.path.join(d, "uv"))]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    with anyio.fail_after(PACKAGE_TEST_S):
        async with connect(tmp_path) as client:
            install = await ok(client, "e", f"%pip install {wheel}", env=str(env), timeout_s=INSTALL_S)
            assert "Successfully installed probe" in install["stdout"], install
            imported = await ok(client, "e", "import probe_ensurepip; probe_ensurepip.WHERE")
            assert imported["result"].strip("'").startswith(str(env)), imported
    assert has_pip(python)


def test_where_neither_pip_nor_uv_is_found_pip_magic_runs_ensurepip_then_pip(tmp_path: Path) -> None:
    """The quick sibling of the ensurepip test above: the commands `%pip install` runs in such an env."""
    python = std_venv(tmp_path / "bare", with_pip=False)
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not os.path.exists(os.path.join(d, "uv"))]
    environ = {k: v for k, v in os.environ.items() if k not in ("UV", "IPYTHON_MCP_UV")} | {"PATH": os.pathsep.join(path)}
    code = f"import json, sys\nsys.path.insert(0, {str(BOOTSTRAP.parent)!r})\nimport bootstrap_kernel\n"
    code += "print(json.dumps(bootstrap_kernel.pip_commands(['install', 'probe'])))"
    done = subprocess.run([str(python), "-c", code], env=environ, capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(done.stdout) == [[str(python), "-m", "ensurepip", "--default-pip"], [str(python), "-m", "pip", "install", "probe"]]


async def test_shell_pip_installs_into_the_sessions_interpreter_not_the_first_pip_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = tmp_path / "no-pip"
    uv_venv(env)
    wheels = tmp_path / "wheels"
    plain, in_shell, in_subprocess = (make_wheel(wheels, name) for name in ("probe_plain", "probe_shell", "probe_sub"))
    # A pip ahead of everything on the server's PATH (the issue: uv's own venv's pip) must not be the one that runs.
    decoys = tmp_path / "decoys"
    decoys.mkdir()
    marker = tmp_path / "decoy-ran"
    (decoys / "pip").write_text(f"#!/bin/sh\ntouch {marker}\necho Successfully installed nothing\n")
    (decoys / "pip").chmod(0o755)
    monkeypatch.setenv("PATH", f"{decoys}{os.pathsep}{os.environ['PATH']}")
    with anyio.fail_after(PACKAGE_TEST_S):
        async with connect(tmp_path) as client:
            await ok(client, "sh", f"plain_wheel = {str(plain)!r}", env=str(env))
            await ok(client, "sh", "!pip install {plain_wheel}")
            shell_line = await ok(client, "sh", f"!cd {tmp_path} && pip install {in_shell} && echo installed-in-a-shell-line")
            assert "installed-in-a-shell-line" in shell_line["stdout"] and "command !pip" not in shell_line["stderr"], shell_line
            await ok(client, "sh", f"import subprocess; subprocess.run(['pip', 'install', {str(in_subprocess)!r}], check=True)")
            modules = "probe_plain, probe_shell, probe_sub"
            imported = await ok(client, "sh", f"import {modules}\n[m.WHERE for m in ({modules})]")
    assert imported["result"].count(str(env)) == 3, imported
    assert not marker.exists(), "the decoy pip first on the server's PATH ran"


async def test_failed_install_ends_the_cell_with_error_and_the_installers_last_lines(shared_server: Client, tmp_path: Path) -> None:
    env = tmp_path / "no-pip"
    uv_venv(env)
    with anyio.fail_after(PACKAGE_TEST_S):
        async with own_sessions(shared_server) as client:
            failed = await run(client, "f", "%pip install --no-index this-package-does-not-exist-xyz\nprint('went on')", env=str(env))
            assert failed["status"] == "error", failed
            assert "went on" not in failed["stdout"], "the rest of the cell must not run after a failed install"
            *installer_lines, last = failed["error"].splitlines()
            assert last.startswith("PipFailed: `pip install --no-index this-package-does-not-exist-xyz` failed with exit code"), last
            assert any("this-package-does-not-exist-xyz" in line for line in installer_lines), failed["error"]
            assert installer_lines[-1] in failed["stderr"], "the error's lines are the installer's own words"
            for line in ("!pip install --no-index", "!python -m pip install --no-index"):  # quoted, as shells read it
                shell = await run(client, "f", f"{line} 'this-package-does-not-exist-xyz<2'")
                assert shell["status"] == "error" and "PipFailed" in shell["error"], shell
            assert (await ok(client, "f", "1 + 1"))["result"] == "2", "the session lives on"


async def test_interrupted_install_stops_the_installer_and_keeps_the_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The uv the server knows of (its UV) hangs and ignores SIGINT: the kernel kills it, and the cell still ends in time.
    env = tmp_path / "no-pip"
    uv_venv(env)
    pid_file = tmp_path / "installer-pid"
    hanging_uv = tmp_path / "tools" / "uv"
    hanging_uv.parent.mkdir()
    hanging_uv.write_text(f"#!/bin/sh\necho $$ > {pid_file}\necho resolving...\ntrap '' INT\nexec sleep 300\n")
    hanging_uv.chmod(0o755)
    monkeypatch.setenv("UV", str(hanging_uv))
    with anyio.fail_after(PACKAGE_TEST_S):
        async with connect(tmp_path) as client:
            await ok(client, "i", "x = 41", env=str(env))
            started = time.monotonic()
            out = await run(client, "i", "%pip install anything", timeout_s=3)
            assert out["status"] == "timeout" and "resolving..." in out["stdout"], out
            assert time.monotonic() - started < 3 + 3, "ended within the interrupt grace, without killing the kernel"
            await wait_until_gone(int(pid_file.read_text()))
            still = await ok(client, "i", "x + 1")
            assert still["result"] == "42" and still["warning"] is None, still

@pytest.mark.network
async def test_install_of_a_package_that_is_not_on_pypi_is_an_error_naming_it(shared_server: Client, tmp_path: Path) -> None:
    env = tmp_path / "no-pip"
    uv_venv(env)
    with anyio.fail_after(PACKAGE_TEST_S):
        async with own_sessions(shared_server) as client:
            failed = await run(client, "n", "%pip install this-package-does-not-exist-xyz", env=str(env))
    assert failed["status"] == "error", failed
    assert "this-package-does-not-exist-xyz was not found in the package registry" in failed["error"], failed["error"]
    assert failed["error"].splitlines()[-1].startswith("PipFailed: `pip install this-package-does-not-exist-xyz` failed")


async def test_shell_sees_the_project_venv_activated(shared_server: Client, tmp_path: Path) -> None:
    project = tmp_path / "project"
    venv = project / ".venv"
    uv_venv(venv)
    with anyio.fail_after(PACKAGE_TEST_S):
        async with own_sessions(shared_server) as client:
            out = await ok(
                client, "p", "!python -c 'import sys; print(sys.prefix)'; printenv VIRTUAL_ENV; command -v python", env=str(project)
            )
    assert out["stdout"].splitlines() == [str(venv), str(venv), str(venv / "bin" / "python")], out


async def test_pip_scripts_are_in_a_private_folder_that_goes_with_the_kernel(shared_server: Client) -> None:
    with anyio.fail_after(PACKAGE_TEST_S):
        async with own_sessions(shared_server) as client:
            found = await ok(client, "k", "!command -v pip")
            pid = (await ok(client, "k", "import os; os.getpid()"))["result"]
            shim = Path(found["stdout"].strip())
            assert shim.name == "pip" and shim.parent.name.startswith("ipython-mcp-pip-"), found
            assert shim.parent.stat().st_mode & 0o777 == 0o700
            result = await client.call_tool("shutdown", {"session": "k"})
            assert not result.is_error
            await wait_until_gone(int(pid))
            while shim.parent.exists():
                await anyio.sleep(0.02)


async def test_execute_tool_description_says_how_to_add_a_package(shared_server: Client) -> None:
    with anyio.fail_after(PACKAGE_TEST_S):
        async with own_sessions(shared_server) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert "%pip install NAME" in tools["execute"].description
