# /// script
# requires-python = ">=3.10"
# dependencies = ["mcp>=2.3,<3", "ipython"]
# ///
"""ipython-mcp: stateful IPython sessions for AI agents, one per name, in any Python env.

An MCP server (stdio, or streamable HTTP with ``--transport http``) with the five tools
of the spec, ``execute``, ``list_sessions``, ``reset``, ``shutdown``, ``interrupt``, plus
``wait`` (follow a cell left running), ``list_envs``, and ``history`` / ``export_notebook``
(the session record, also served as resources and exported by ``ipython-mcp export SESSION
[PATH]`` from a terminal). Each named session is one kernel process: the target env's
Python running ``bootstrap_kernel.py`` beside this file, which embeds IPython's
``InteractiveShell`` and speaks JSON lines over its stdin/stdout (that file documents the
messages). No jupyter_client, no ZeroMQ. A kernel is our child, or is reached through a
launcher from the config file (``ssh``, ``docker exec -i``, ``kubectl exec -i``, ``srun``,
``bwrap``; ``env="ssh://host/path"``): then the bootstrap travels over the pipe, and
interrupts go as messages, since no signal crosses. Every server also serves MCP on a Unix
socket in the user's private runtime folder, so a person can ``ipython-mcp attach SESSION``
(a prompt on the agent's kernel) or ``ipython-mcp watch SESSION``. On Linux a local kernel
is forked by its interpreter's fork server (``ForkServer``: IPython imported once, a kernel
in tens of milliseconds); elsewhere, or with ``--no-fork-server``, it is spawned.

Session lifecycle::

    created --(kernel says hello)--> idle <--> busy --(kernel exits)--> dead
       |                               |                                  |
       +-- env_error (nothing kept)    +-- reset: fresh kernel, same      +-- next execute:
                                       |   name and env                       fresh kernel,
                                       +-- shutdown: killed, forgotten        warning "state lost"
                                       +-- idle past --idle-timeout-s: stopped (like dead)

A kernel start runs on its own (``SessionManager._ensure_kernel``): a call waits for it
until its deadline, then answers ``busy`` while the start goes on for the next call.

A cell ends ``ok`` or ``error``; past ``timeout_s`` it is interrupted (``timeout``), or,
with ``on_timeout="continue"``, it is left running (``running``, then ``wait``; meanwhile
``execute`` answers ``busy``). Each execute or wait call is one ``CellCall``: its deadline
bounds the whole call (waiting for the session, its kernel and the cell), and every reply,
whatever its status, is built by ``CellCall.result``.

How the file reads, top to bottom: constants; exceptions; pure functions (envs, hints,
timeouts); saved output files and the per-call output buffers; background work (``Jobs``:
every task in one anyio task group that the lifespan owns); the wire (``Execution``);
``Kernel`` (one child process), fork servers and the orphan guard; envs (install, list); sessions
(``Config``, ``Session``, ``CellCall``, ``SessionManager``: names -> kernels, locks);
the session record; the MCP tools; the transports (stdio, HTTP, the person's Unix socket)
and the ``attach``/``watch`` clients; the command line.

Guarantees:
- Every call returns by ``timeout_s`` plus a grace: cells are bounded by ``timeout_s``;
  a cell that ignores SIGINT is killed after a short grace period and its kernel
  restarted in the background, after the reply; a kernel start no call waits for
  longer than its deadline (or a short start grace).
- No orphan processes: each kernel leads its own process group, and the whole group
  is killed on shutdown, reset, server exit (stdin EOF, SIGTERM, SIGINT, SIGHUP, a
  client that closed our stdout), kernels still starting included. A server that
  vanished (SIGKILL) takes its kernels too: PR_SET_PDEATHSIG on Linux (for a forked
  kernel, its fork server kills it when our socket closes), an orphan guard process that
  kills each kernel's group, and the kernel's own watch of its pipe.
- Nothing but JSON-RPC reaches the server's stdout; logs go to stderr.
- Saved output (the full text of cut output, images) is private: folders 0700, files
  0600 created new, never through a folder or link someone else planted; it is capped
  per file and per server, and removed at a session's shutdown and the server's exit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import datetime
import enum
import errno
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

__version__ = "0.1.0"

# `ipython-mcp --version` answers here, before the MCP SDK, uvicorn and pydantic are imported
# (~0.8 s): the console script imports this whole module to call main(), too late for a fast
# path there. Only the exact command line `<ipython-mcp or ipython_mcp.py> --version` counts,
# so importing this module (tests, `import ipython_mcp`) never exits.
if sys.argv[1:] == ["--version"] and Path(sys.argv[0] or "").name in ("ipython-mcp", "ipython_mcp.py"):
    print(f"ipython-mcp {__version__}", file=sys.stdout)  # no server here: the answer is the output
    sys.exit(0)

import anyio
import anyio.abc
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import NotificationOptions
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.message import SessionMessage
from mcp.types import (
    INVALID_REQUEST,
    PARSE_ERROR,
    CallToolResult,
    ErrorData,
    ImageContent,
    JSONRPCError,
    ListResourcesResult,
    PaginatedRequestParams,
    Resource,
    TextContent,
    ToolAnnotations,
)
from pydantic import BaseModel, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("ipython_mcp")
T = TypeVar("T")

# --- Constants: every timing and size, with why ---------------------------------------

BOOTSTRAP = Path(__file__).with_name("bootstrap_kernel.py")
# The version of the protocol between server and kernel (bootstrap_kernel.PROTOCOL_VERSION);
# a kernel that says another one in its hello is an env_error, not a puzzle later.
KERNEL_PROTOCOL_VERSION = 1
# A cold start imports IPython, which can take seconds in a big env on a busy disk.
KERNEL_START_TIMEOUT_S = 60.0
# A call that has to start its session's kernel waits for it this long even when its
# timeout_s is shorter (a start takes well under a second on an idle machine, a few on a
# busy one); past that, or past timeout_s when longer, it answers busy and the start goes on.
KERNEL_START_GRACE_S = 5.0
# What clients allow a tool call when MCP_TOOL_TIMEOUT is unset (Claude Code: 60 s).
DEFAULT_TIMEOUT_S = 58.0
# Return this long before the client's own timeout, so partial output reaches it.
TIMEOUT_MARGIN_S = 2.0
# A cell always gets at least this long, even when waiting for its session used up timeout_s.
MIN_CELL_S = 1.0
# After SIGINT, time for a cell to unwind (finally blocks, traceback) before we kill.
INTERRUPT_GRACE_S = 3.0
# Sessions alive at once, by default: each kernel costs ~20-60 MB, and a runaway agent
# loop creating sessions must hit a clear error long before it takes the machine.
DEFAULT_MAX_SESSIONS = 32
# The idle-kernel check runs this often at most (a quarter of the idle timeout when shorter).
IDLE_CHECK_MAX_S = 5.0
# After SIGKILL, time for the kernel to be reaped; it cannot ignore SIGKILL.
KILL_REAP_TIMEOUT_S = 5.0
# After a dead kernel's process exits, time to read what is still in its pipe.
DEATH_DRAIN_S = 0.5
# What is collected from a dead kernel's output pipes (64 KiB reads), at most.
LEFTOVER_MAX_CHUNKS = 64
# Largest protocol line (a display bundle with a large image, a long traceback).
WIRE_LINE_LIMIT = 256 * 1024 * 1024
# Output returned per call, total over stdout and stderr (head and tail are kept).
DEFAULT_OUTPUT_LIMIT_CHARS = 100_000
# Progress notifications: none for cells quicker than this, then at most this often.
PROGRESS_FIRST_S = 1.0
PROGRESS_INTERVAL_S = 0.5
# ... and a heartbeat with the elapsed time when no new line arrived for this long.
PROGRESS_HEARTBEAT_S = 2.0
# Images are downscaled in the kernel (with Pillow, which matplotlib brings) to fit
# these, so one figure cannot flood the agent's context; 1568 px is the longest side
# vision models use without downscaling themselves.
IMAGE_MAX_BYTES = 1_000_000
IMAGE_MAX_SIDE_PX = 1568
# Images still larger than this (no Pillow in the env) are not sent inline; the
# warning names the file that holds them.
IMAGE_INLINE_MAX_BYTES = 4_000_000
# Images sent inline per call, by count and total bytes (a loop of plt.show() must not
# flood the agent's context); later ones are only saved to files.
DEFAULT_IMAGE_LIMIT = 10
DEFAULT_IMAGE_BYTES_LIMIT = 5_000_000
# Images past the inline budget are held until the reply saves them to files; beyond
# these they are counted and dropped, so the server's memory stays bounded whatever a
# cell shows (the byte bound is above the largest image a kernel sends).
IMAGE_FILE_ONLY_MAX_COUNT = 200
IMAGE_FILE_ONLY_MAX_BYTES = 40_000_000
# A traceback longer than this (deep recursion) is cut in the middle.
ERROR_LIMIT_CHARS = 20_000
# An automatic `pip install ipykernel` (or conda/uv/pixi) must end within this.
INSTALL_TIMEOUT_S = 600.0
# Installer output kept for an env_error when the install fails.
INSTALL_LOG_TAIL_CHARS = 3_000
# An installer line longer than this (a progress bar redrawn with \r, say) is read past, not kept.
INSTALL_LINE_LIMIT_BYTES = 1024 * 1024
# list_envs probes each interpreter at most this long, and reuses answers this long.
ENV_PROBE_TIMEOUT_S = 15.0
ENV_PROBE_CACHE_S = 60.0
# A fork server that did not say it is ready within this is ended; kernels are spawned instead.
FORK_SERVER_START_TIMEOUT_S = 60.0
# After a fork server of an interpreter could not start (no IPython there), kernels of that
# interpreter are spawned for this long before a new fork server is tried.
FORK_SERVER_RETRY_S = 30.0
# A fork request (the kernel's environment) or report fits in one packet of this size.
FORK_PACKET_BYTES = 1 << 20
# No spare kernel when the machine has less memory available than this.
SPARE_MIN_AVAILABLE_BYTES = 2 * 1024**3
# Kernel log lines kept for the death message (a segfault dump, an import error).
KERNEL_LOG_TAIL_CHARS = 4_000
SESSION_NAME_RULE = "1-64 characters of letters, digits, '_', '-', '.', not starting with '.'"
SESSION_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
ENV_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
IMAGE_MIME_TYPES = ("image/png", "image/jpeg")
# A saved output file (spilled stdout/stderr, a result's full repr, an image) stops
# growing here: a runaway print loop writes ~58 MB/s, into a /tmp that is often RAM.
DEFAULT_SPILL_FILE_LIMIT_BYTES = 50 * 1024**2
# Everything one server keeps in its output folder; past it the oldest files go first,
# never those the last reply of a session named.
DEFAULT_OUTPUT_DIR_LIMIT_BYTES = 1024**3
# Spilled text is gathered up to this before a write(2): a million tiny prints are not a million syscalls.
SPILL_BUFFER_BYTES = 64 * 1024
# One server's folder inside the output folder: its pid says when it is stale.
SERVER_FOLDER = re.compile(r"server-(\d+)-[0-9a-f]+")


# The session record (history, notebook, export).
# Cells one session's record keeps in memory (for `history` and the resources); the
# file keeps them all.
RECORD_MAX_CELLS = 500
# ... and characters of text for all of them together, so a chatty session stays small.
RECORD_MEMORY_CHARS = 8_000_000
# A cell's code, and each of its outputs, are kept up to this (head and tail).
RECORD_CODE_CHARS = 100_000
RECORD_TEXT_CHARS = 20_000
# Outputs kept per cell (stream pieces, displays, images): a display loop keeps its first ones.
RECORD_OUTPUTS_PER_CELL = 200
# `history`: cells shown when `last` is not given, and how much of each.
HISTORY_DEFAULT_CELLS = 20
HISTORY_CODE_CHARS = 2_000
HISTORY_EXCERPT_CHARS = 300
RECORD_FILE_SUFFIX = "record.jsonl"
RECORD_FORMAT = 1
NOTEBOOK_MIME_TYPE = "application/x-ipynb+json"

# HTTP transport.
HTTP_PATH = "/mcp"
# A megabyte of code is a large cell, and JSON escaping can make it six; a bigger body is refused
# (413) from its Content-Length, or as soon as the bytes streamed in pass the limit (the SDK's check).
HTTP_BODY_LIMIT_BYTES = 16 * 1024 * 1024
# After SIGTERM the kernels are gone first; open streams then get this long to close (whole seconds).
HTTP_SHUTDOWN_GRACE_S = 2
# A shorter secret could be guessed over a network; a generated one has 256 bits.
TOKEN_MIN_CHARS = 16
TOKEN_ENV = "IPYTHON_MCP_TOKEN"
# Key in each HTTP request's ASGI scope: an event that NoticeDisconnects sets when the client leaves.
DISCONNECTED = "ipython_mcp.disconnected"

Progress = Callable[[float, str], Awaitable[None]]  # (elapsed seconds, message) -> a progress notification
OnTimeout = Literal["interrupt", "continue"]  # what a cell past its timeout_s does
SessionStatus = Literal["starting", "idle", "busy", "dead", "stopped"]
ActionOutcome = Literal["reset", "shut_down", "interrupted", "idle", "no_kernel"]  # of reset, shutdown, interrupt


# --- Exceptions that carry data ---------------------------------------------------------


EnvErrorKind = Literal["bad_name", "no_interpreter", "missing_ipython", "start_failed"]


class EnvError(Exception):
    """The env cannot run a kernel; ``reason`` says why (prose), ``hint`` how to fix it, and
    ``kind`` which case it is: ``bad_name``, ``no_interpreter``, ``missing_ipython`` (the one
    the server acts on: it may install ipykernel), or ``start_failed`` (anything else).
    """

    def __init__(
        self, env: str, python: str | None, reason: str, hint: str | None = None, kind: EnvErrorKind = "start_failed", has_pip: bool = True,
        plan: InstallPlan | None = None,
    ):
        self.env, self.python, self.reason, self.hint, self.kind, self.has_pip = env, python, reason, hint, kind, has_pip
        self.plan = plan  # how to install ipykernel there, when not the local install_plan (a launched env)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return self.reason + (f"\n{self.hint}" if self.hint else "")


class KernelStarting(Exception):
    """The session's kernel was still starting at this call's deadline; it keeps starting."""

    def __init__(self, session: str, env: str, python: Path, since: float):
        self.session, self.env, self.python, self.since = session, env, python, since
        super().__init__(session)


class KernelDied(Exception):
    """The kernel process ended while a cell ran (or before it said hello)."""

    def __init__(self, how: str, log_tail: str = "", stop: StopReason | None = None):
        self.how, self.log_tail, self.stop = how, log_tail, stop  # stop: why we ended it, if we did
        super().__init__(how)


class UnsafeFolder(OSError):
    """A folder we must not write into: a link, not a folder, another user's, or writable by others."""


class ExportFailed(Exception):
    """Why `ipython-mcp export` wrote nothing."""


class HttpSetupError(Exception):
    """The HTTP server cannot start as asked: unsafe flags, a weak token, an unsafe folder, a busy port."""


# --- Pure functions: env spec -> interpreter, install hints, defaults -----------------


def check_session_name(name: str) -> None:
    if not isinstance(name, str) or not SESSION_NAME.fullmatch(name):
        shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:80]}…"
        raise ToolError(f"Invalid session name {shown!r}: a session name is {SESSION_NAME_RULE}.")


def envs_dir_default() -> Path:
    return Path(os.environ.get("IPYTHON_MCP_ENVS_DIR") or "~/envs").expanduser()


def python_in(folder: Path) -> Path | None:
    """The interpreter of an env or project folder, trying the layouts users have."""
    for relative in (
        "bin/python",
        "Scripts/python.exe",
        ".venv/bin/python",
        ".venv/Scripts/python.exe",
        ".pixi/envs/default/bin/python",
        ".pixi/envs/default/python.exe",
    ):
        candidate = folder / relative
        if candidate.is_file():
            return candidate
    return None


def interpreter_for(env: str | None, envs_dir: Path, launchers: LaunchConfig | None = None) -> tuple[str, Path | LaunchedPython]:
    """Map an ``env`` argument to (label shown to users, interpreter path or launched Python).

    None or "" -> this server's own Python; a name from the config file -> its launcher;
    ``ssh://...`` -> that Python over ssh; a bare name -> ``<envs_dir>/<name>/bin/python``;
    anything with ``/`` or ``~`` -> that path (an interpreter, or an env/project folder).
    Raises EnvError when there is no interpreter, naming what was looked for, and when a
    folder on the way cannot be entered (PermissionError), naming that folder.
    """
    if env and launchers is not None and env in launchers.envs:
        return env, launchers.envs[env]
    if env and env.startswith("ssh:"):
        return env, ssh_url_python(env, launchers.ssh_command if launchers is not None else ("ssh",))
    try:
        return _interpreter_for(env, envs_dir)
    except OSError as exc:
        raise unreachable_env_error(env or "default", exc) from exc


def unreachable_env_error(env: str, exc: OSError) -> EnvError:
    """An env this server's user may not read: say which folder stops it, and who it is."""
    target = Path(exc.filename) if isinstance(exc.filename, str) else None
    blocked = next((folder for folder in reversed(target.parents) if not os.access(folder, os.X_OK)), None) if target else None
    try:
        import pwd

        user = f"user {pwd.getpwuid(os.geteuid()).pw_name!r}"
    except (ImportError, KeyError):
        user = f"uid {os.geteuid()}"
    if isinstance(exc, PermissionError):
        where = f"the folder {blocked}" if blocked else (str(target) if target else "a folder on the way")
        reason = (
            f"Env {env!r} cannot be used: permission denied. This server runs as {user}, which may not enter {where}"
            + (f", so it cannot reach {target}" if target and blocked else "")
            + ". Make it readable for this user, or use an env this user can read."
        )
    else:
        reason = f"Env {env!r} cannot be used: {exc.strerror or exc} ({target or 'its path'})."
    return EnvError(env, str(target) if target else None, reason, kind="no_interpreter")


def _interpreter_for(env: str | None, envs_dir: Path) -> tuple[str, Path]:
    if env is None or env.strip() == "":
        return "default", Path(sys.executable)
    if "/" in env or "~" in env or "\\" in env:
        if env.startswith("~") and not env.startswith(("~/", "~\\")) and env != "~":
            raise EnvError(
                env, None, f"Env {env!r} names another user's home folder (~user), which is not supported; give the full path instead.", kind="bad_name"
            )
        path = Path(env).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        if path.is_file():
            return env, path
        found = python_in(path)
        if found is not None:
            return env, found
        expected = path / "bin" / "python"
        if not path.exists():
            reason = f"No Python interpreter for env {env!r}: the folder {path} does not exist."
        else:
            reason = f"No Python interpreter for env {env!r}: {expected} does not exist (nor .venv/ or .pixi/envs/default/ inside it)."
        raise EnvError(env, str(expected), reason, create_hint(path), kind="no_interpreter")
    if not ENV_NAME.fullmatch(env):  # also refuses ".", ".." and anything with a separator
        raise EnvError(
            env,
            None,
            f"Invalid env name {env!r}: a bare env name is a folder name under {envs_dir} "
            "(letters, digits, '_', '.', '+', '-'; not '.' or '..'). Give a path containing '/' for anything else.",
            kind="bad_name",
        )
    folder = envs_dir / env
    found = python_in(folder)
    if found is None:
        expected = folder / "bin" / "python"
        reason = f"No Python interpreter for env {env!r}: {expected} does not exist."
        available = sorted(p.name for p in envs_dir.iterdir() if python_in(p)) if envs_dir.is_dir() else []
        reason += f" Envs found in {envs_dir}: {', '.join(available)}." if available else f" No envs found in {envs_dir}."
        raise EnvError(env, str(expected), reason, create_hint(folder), kind="no_interpreter")
    return env, found


def create_hint(folder: Path) -> str:
    return f"Create it with: python3 -m venv {folder} && {folder}/bin/python -m pip install ipykernel"


@dataclasses.dataclass(frozen=True)
class InstallPlan:
    """How to put the prerequisite into one env: a command line, where to run it."""

    argv: tuple[str, ...] | None  # None: nothing we can run for the user
    cwd: Path | None
    text: str  # what the user reads after "Install with:"


def install_plan(python: Path, has_pip: bool = True, envs_dir: Path | None = None) -> InstallPlan:
    """The one command that installs ipykernel (and so IPython) into the env owning ``python``;
    a venv it suggests goes in ``envs_dir`` (the server's envs folder)."""
    prefix = python.parent.parent
    envs = envs_dir if envs_dir is not None else envs_dir_default()
    if (prefix / "conda-meta").is_dir():
        if ".pixi" in prefix.parts and len(prefix.parents) >= 3:
            project = prefix.parents[2]
            return InstallPlan(("pixi", "add", "ipykernel"), project, f"cd {project} && pixi add ipykernel")
        tool = "mamba" if shutil.which("mamba") else "conda"
        argv = (tool, "install", "-y", "-p", str(prefix), "-c", "conda-forge", "ipykernel")
        return InstallPlan(argv, None, f"{tool} install -p {prefix} -c conda-forge ipykernel")
    if any(prefix.glob("lib/python3*/EXTERNALLY-MANAGED")) and not (prefix / "pyvenv.cfg").is_file():
        # A system Python (Debian, Ubuntu, Homebrew) refuses pip installs (PEP 668).
        return InstallPlan(
            None,
            None,
            f"a venv, since {python} belongs to the system package manager: "
            f"`{python} -m venv {envs}/NAME && {envs}/NAME/bin/python -m pip install ipykernel`, then use env 'NAME' "
            "(or install the system package, e.g. `sudo apt install python3-ipykernel`)",
        )
    uv = shutil.which("uv")
    if uv and ((prefix / "pyvenv.cfg").is_file() or not has_pip):
        argv = (uv, "pip", "install", "--python", str(python), "ipykernel")
        return InstallPlan(argv, None, f"uv pip install --python {python} ipykernel")
    if has_pip:
        argv = (str(python), "-m", "pip", "install", "ipykernel")
        return InstallPlan(argv, None, f"{python} -m pip install ipykernel")
    return InstallPlan(
        None,
        None,
        f"{python} has no pip. Either `{python} -m ensurepip` and then `{python} -m pip install ipykernel`, "
        f"or install uv (`pip install uv`) and run `uv pip install --python {python} ipykernel`",
    )


def install_hint(python: Path, has_pip: bool = True, envs_dir: Path | None = None) -> str:
    return f"Install with: {install_plan(python, has_pip, envs_dir).text}"


# --- Launchers: a kernel behind a command (ssh, docker/podman/kubectl exec, srun, bwrap) ---
#
# Such a kernel is reached through the launcher's stdin/stdout, as a person would type
# `ssh gpu-box python`: the server sends the bootstrap's source down the pipe (nothing is
# copied or installed on the far side), then speaks the same JSON lines. Signals do not
# cross ssh or exec, so interrupts travel as messages, and closing the pipe ends the far
# side (the bootstrap kills its own process group at end of input).

# Run as `<python> -u -c KERNEL_LOADER`: read a line with the source's length, then the
# source, and run it. Read with os.read so no byte of the protocol after it is buffered
# away. setsid: the kernel leads its own process group on the far side, so the interrupt
# message and the end of its input reach everything its cells started.
KERNEL_LOADER = (
    "import os,sys\n"
    "try:\n os.setsid()\nexcept OSError:\n pass\n"
    "def r(n):\n b=os.read(0,n)\n if not b:sys.exit(3)\n return b\n"
    "h=b''\n"
    "while h[-1:]!=b'\\n':h+=r(1)\n"
    "n=int(h);s=b''\n"
    "while len(s)<n:s+=r(n-len(s))\n"
    "exec(compile(s,'bootstrap_kernel.py','exec'),{'__name__':'__main__','__file__':'bootstrap_kernel.py'})\n"
)
# ssh ConnectTimeout for ssh:// envs: a host that is down is an env_error within this, not a hang.
SSH_CONNECT_TIMEOUT_S = 15
# After closing a launched kernel's input, how long the far side gets to end its own process
# group (and the launcher to exit) before the launcher is killed here.
LAUNCHER_CLOSE_GRACE_S = 2.0
# What an ssh:// env may contain in its user, host and path: the remote command is one
# string for the far side's shell, and an option-looking host would be an ssh option.
SSH_URL = re.compile(r"ssh://(?:(?P<user>[^@/]*)@)?(?P<host>\[[^\]/]*\]|[^:/]*)(?::(?P<port>[^/]*))?(?P<path>/.*)?", re.DOTALL)
SSH_URL_SAFE = re.compile(r"[A-Za-z0-9_.+@%,=~^/:\[\]-]+")
# How to get a launcher that is not installed here, by program name.
LAUNCHER_INSTALL = {
    "ssh": "install the OpenSSH client (Debian/Ubuntu: `sudo apt install openssh-client`)",
    "docker": "install Docker (https://docs.docker.com/engine/install/) or use podman",
    "podman": "install Podman (https://podman.io/docs/installation)",
    "kubectl": "install kubectl (https://kubernetes.io/docs/tasks/tools/)",
    "srun": "run the server on a Slurm login node, where `srun` is on PATH",
    "bwrap": "install bubblewrap (Debian/Ubuntu: `sudo apt install bubblewrap`)",
}


class ConfigError(Exception):
    """The config file cannot be used; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class LaunchedPython:
    """A Python reached through a launcher command: ``launch + [python, args...]``.

    With ssh the far side's shell parses one command string, so it is quoted for it
    (``exec`` so the kernel is the process sshd started, and a leading ``~/`` left to the
    shell to expand); other launchers (docker exec, kubectl exec, srun, bwrap) take argv.
    """

    launch: tuple[str, ...]  # from the user's config file, or built from an ssh:// env
    python: str  # the interpreter as the far side names it
    host: str | None = None  # for ssh: what "the connection to HOST was lost" names

    @property
    def program(self) -> str:
        return self.launch[0]

    @property
    def through_shell(self) -> bool:
        return os.path.basename(self.program) == "ssh"

    @property
    def where(self) -> str:
        return self.host or shlex.join(self.launch)

    def remote_command(self, *args: str, exec_: bool = False) -> str:
        python = self.python
        quoted = "~/" + shlex.quote(python[2:]) if python.startswith("~/") else shlex.quote(python)
        return ("exec " if exec_ else "") + " ".join([quoted, *map(shlex.quote, args)])

    def argv(self, *args: str) -> list[str]:
        if self.through_shell:
            return [*self.launch, self.remote_command(*args, exec_=True)]
        return [*self.launch, self.python, *args]

    def command_text(self, *args: str) -> str:
        """What a person types to run ``python args`` there (for hints)."""
        if self.through_shell:
            return f"{shlex.join(self.launch)} {shlex.quote(self.remote_command(*args))}"
        return shlex.join(self.argv(*args))

    def __str__(self) -> str:
        return f"{self.python} through `{shlex.join(self.launch)}`"


@dataclasses.dataclass
class LaunchConfig:
    """What the user's config file says: envs behind launchers, and the ssh command of ssh:// envs."""

    envs: dict[str, LaunchedPython] = dataclasses.field(default_factory=dict)
    ssh_command: tuple[str, ...] = ("ssh",)
    source: Path | None = None


def config_path_default(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get("IPYTHON_MCP_CONFIG"):
        return Path(environ["IPYTHON_MCP_CONFIG"]).expanduser()
    base = Path(environ.get("XDG_CONFIG_HOME") or Path("~/.config").expanduser())
    return base / "ipython-mcp" / "config.toml"


def read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"Reading the config file {path} needs Python 3.11 or newer, or the tomli package (pip install tomli).") from None
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"Cannot read the config file {path}: {exc.strerror or exc}.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"The config file {path} is not valid TOML: {exc}.") from exc


def string_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, str) and item for item in value)


def load_launch_config(path: Path | None, required: bool = False) -> LaunchConfig:
    """Parse the config file (absent and not ``required``: nothing configured). Raises ConfigError."""
    if path is None or (not required and not path.exists()):
        return LaunchConfig()
    data = read_toml(path)
    config = LaunchConfig(source=path)
    ssh = data.get("ssh_command", ["ssh"])
    if not string_list(ssh):
        raise ConfigError(f"In {path}: ssh_command must be a non-empty list of strings, like [\"ssh\", \"-F\", \"/path/ssh_config\"].")
    config.ssh_command = tuple(ssh)
    envs = data.get("envs", {})
    if not isinstance(envs, dict):
        raise ConfigError(f"In {path}: [envs] must be a table of [envs.NAME] tables.")
    for name, table in envs.items():
        where = f"In {path}, [envs.{name}]"
        if not ENV_NAME.fullmatch(name):
            raise ConfigError(f"{where}: an env name is letters, digits, '_', '.', '+', '-'.")
        if not isinstance(table, dict) or not string_list(table.get("launch")):
            raise ConfigError(f"{where}: launch must be a non-empty list of strings, like [\"ssh\", \"gpu-box\"].")
        python = table.get("python", "python3")
        if not isinstance(python, str) or not python:
            raise ConfigError(f"{where}: python must be the far side's interpreter, like \"~/envs/torch/bin/python\".")
        launch = tuple(table["launch"])
        host = launch[-1] if os.path.basename(launch[0]) == "ssh" else None
        config.envs[name] = LaunchedPython(launch, python, host)
    return config


def ssh_url_python(env: str, ssh_command: Sequence[str] = ("ssh",)) -> LaunchedPython:
    """``ssh://[user@]host[:port]/abs/path/to/env`` (or to its python) as a launched Python.

    Only the user's ssh config says how to connect: the URL gives no option, and a user,
    host or path that a shell or ssh would read as more than a name is refused.
    """
    match = SSH_URL.fullmatch(env)
    if match is None or not match["host"] or not match["path"]:
        raise EnvError(env, None, f"Invalid ssh env {env!r}: write ssh://[user@]host[:port]/absolute/path/to/env.", kind="bad_name")
    user, host, port, path = match["user"], match["host"], match["port"], match["path"]
    for what, value in (("user", user), ("host", host), ("path", path)):
        if value is None:
            continue
        if value.startswith("-") or not SSH_URL_SAFE.fullmatch(value) or "/-" in value:
            raise EnvError(
                env, None,
                f"Refused ssh env {env!r}: its {what} {value!r} is not a plain name (it starts with '-' or holds spaces, quotes, "
                "';', '$', backticks or other characters a shell or ssh would act on). Connection options belong in your ssh config.",
                kind="bad_name",
            )
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise EnvError(env, None, f"Invalid ssh env {env!r}: the port {port!r} is not a number from 1 to 65535.", kind="bad_name")
    argv = [*ssh_command, "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}"]
    if port:
        argv += ["-p", port]
    if user:
        argv += ["-l", user]
    argv += ["--", host.strip("[]")]
    name = path.rstrip("/").rsplit("/", 1)[-1]
    python = path if name.startswith("python") else path.rstrip("/") + "/bin/python"
    return LaunchedPython(tuple(argv), python, host)


def launcher_missing_error(env: str, launched: LaunchedPython, source: Path | None) -> EnvError:
    program = launched.program
    how = LAUNCHER_INSTALL.get(os.path.basename(program), f"install {program} or fix `launch`")
    where = f" in {source}" if source else ""
    return EnvError(
        env, launched.python,
        f"The launcher{f' of env {env!r}' if env else ''}, `{program}`, is not installed here (not found on PATH); "
        f"{how}, or change the env's `launch`{where}.",
        kind="no_interpreter",
    )


def default_timeout_s(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """``MCP_TOOL_TIMEOUT`` (ms) minus a margin, so we answer before the client gives up."""
    raw = environ.get("MCP_TOOL_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        client_timeout_s = float(raw) / 1000
    except ValueError:
        log.warning("MCP_TOOL_TIMEOUT=%r is not a number of milliseconds; using %ss", raw, DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S
    if not math.isfinite(client_timeout_s) or client_timeout_s <= 0:
        return DEFAULT_TIMEOUT_S
    return max(client_timeout_s - TIMEOUT_MARGIN_S, client_timeout_s / 2)


def setting_from_env(environ: Mapping[str, str], variable: str, parse: Callable[[str], Any], default: Any, what: str) -> Any:
    """A setting from an environment variable: unset or empty gives ``default``; a value that
    ``parse`` refuses (ValueError) is reported and ignored, never the end of the server."""
    raw = environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError:
        log.warning("%s=%r is not %s; using %r", variable, raw, what, default)
        return default


def positive_count(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def spare_kernels_default(environ: Mapping[str, str]) -> int | None:
    """IPYTHON_MCP_SPARE_KERNELS, or None (Config decides: see its ``spare_kernels``); set but
    empty: 0 (off); a value that is not a count is reported and ignored."""
    if environ.get("IPYTHON_MCP_SPARE_KERNELS", "unset").strip() == "":
        return 0
    return setting_from_env(environ, "IPYTHON_MCP_SPARE_KERNELS", lambda raw: max(int(raw), 0), None, "a number")


def fork_server_default(environ: Mapping[str, str], platform: str = sys.platform) -> bool:
    """Fork servers on Linux unless IPYTHON_MCP_FORK_SERVER is 0/false/no; elsewhere (macOS,
    where forking a process that imported system frameworks is unsafe) kernels are spawned."""
    if not platform.startswith("linux") or not hasattr(socket, "send_fds") or not hasattr(os, "pidfd_open"):
        return False
    if environ.get("IPYTHON_MCP_FORK_SERVER", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:  # the exits of a dead fork server's kernels are watched by pidfd: Linux 5.3+, and no seccomp filter against it
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


def max_sessions_default(environ: Mapping[str, str]) -> int:
    """IPYTHON_MCP_MAX_SESSIONS, or 32; a value that is not a positive count is reported and ignored."""
    return setting_from_env(environ, "IPYTHON_MCP_MAX_SESSIONS", positive_count, DEFAULT_MAX_SESSIONS, "a positive number")


def idle_timeout_default(environ: Mapping[str, str]) -> float | None:
    """IPYTHON_MCP_IDLE_TIMEOUT_S in seconds, or None: off (so are 0 and values that are not numbers)."""

    def seconds(raw: str) -> float | None:
        value = float(raw)
        return value if math.isfinite(value) and value > 0 else None

    return setting_from_env(environ, "IPYTHON_MCP_IDLE_TIMEOUT_S", seconds, None, "a number of seconds")


def byte_count(text: str) -> int:
    """``52428800``, ``50M``, ``50MB``, ``1G``, ``64k`` (binary units) -> bytes. Raises ValueError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a size in bytes (e.g. 50M, 1G, 1048576)")
    scale = 1024 ** ("KMGT".find(match[2].upper()) + 1) if match[2] else 1
    return int(float(match[1]) * scale)


def byte_limit_default(variable: str, default: int, environ: Mapping[str, str] = os.environ) -> int:
    """A size from an environment variable, or ``default``; a value that is not a size is reported and ignored."""
    return setting_from_env(environ, variable, byte_count, default, "a size in bytes (e.g. 50M, 1G)")


def memory_to_spare() -> bool:
    """Whether an idle spare kernel (about 30 MB) is cheap here: not on a machine short of memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024 >= SPARE_MIN_AVAILABLE_BYTES
    except (OSError, KeyError, ValueError):
        return True  # not Linux: assume a desktop


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def shown(text: str | os.PathLike[str]) -> str:
    r"""``text`` (a path, a name, a message) fit for a reply: JSON cannot carry lone surrogates.

    A file name's bytes that are not UTF-8 arrive as surrogates (b'caf\xe9' -> 'caf\udce9');
    they become a backslash escape of the byte (the four characters \xe9), any other lone
    surrogate a \uXXXX escape.
    """
    text = os.fspath(text)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return LONE_SURROGATE.sub(
            lambda m: f"\\x{ord(m[0]) - 0xDC00:02x}" if 0xDC80 <= ord(m[0]) <= 0xDCFF else f"\\u{ord(m[0]):04x}", text
        )
    return text


def printable(value: Any) -> Any:
    """``value`` (structured content) with every string, keys included, passed through ``shown``."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {printable(key): printable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [printable(item) for item in value]
    return value


def describe_exit(returncode: int | None) -> str:
    if returncode is None:  # a forked kernel whose fork server ended before it did
        return "an exit whose status nobody could read"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def descendants(pid: int) -> list[int]:
    """Processes below ``pid``, whatever their process group (Linux /proc; else none).

    A double-forked daemon has left the tree already; it is the one process that can
    outlive its session.
    """
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


# --- Saved output: one private folder per server, files made safely, capped ------------


def create_private_file(name: str | Path, dir_fd: int | None = None) -> int:
    """A new file that only this user can read or write (0600), open for writing.

    Never an existing file, nor a symlink planted under that name: O_EXCL makes both a
    FileExistsError, and O_NOFOLLOW guards systems where O_EXCL alone would follow it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o600, dir_fd=dir_fd)


def open_private_folder(name: str | Path, dir_fd: int | None = None, create: bool = True) -> int:
    """Open (creating it 0700 if missing and ``create``) a folder that only this user can write to; returns its fd.

    Refuses (UnsafeFolder) a symlink, anything that is not a folder, another user's folder
    and a folder others can write to: whoever can write there can plant a link where our
    next file goes. A folder of ours that others may only read is used as it is: every
    folder we make inside is 0700, so they see names, never contents.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise
        try:
            is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        raise UnsafeFolder(exc.errno, f"{name} is {'a symbolic link' if is_link else 'not a folder'}") from None
    info = os.fstat(fd)  # of what was opened, so nothing can be swapped in after the check
    problem = None
    if info.st_uid != os.getuid():
        problem = f"{name} belongs to another user (uid {info.st_uid})"
    elif info.st_mode & 0o022:
        problem = f"{name} can be written by other users (mode {stat.S_IMODE(info.st_mode):o})"
    if problem is not None:
        os.close(fd)
        raise UnsafeFolder(errno.EPERM, problem)
    return fd


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclasses.dataclass
class SavedFile:
    session: str
    size: int = 0  # bytes written (or about to be)
    writing: bool = True  # still open: never deleted under its writer
    kept: bool = True  # named by the last reply of its session, or made since: never deleted to make room


class OutputFiles:
    """This server's saved output: ``<output_dir>/server-<pid>-<random>/<session>/<file>``.

    Private: every folder 0700, every file 0600 and new (``create_private_file``); an
    output folder that is a link, not a folder, another user's or writable by others is
    refused, with a warning, for a fresh private one. Capped: bytes per file and bytes
    for all of this server's files; past the latter the oldest files go first, never one
    the last reply of its session named. Cleaned up: a session's files at its shutdown,
    the server's folder at exit, folders of servers that are gone at start.
    """

    def __init__(self, output_dir: Path, file_limit: int, folder_limit: int):
        self.file_limit, self.folder_limit = max(file_limit, 0), max(folder_limit, 0)
        self.root = output_dir
        self.folder: Path | None = None  # this server's folder, once made
        self.problem: str | None = None  # why nothing can be saved
        self.total = 0  # bytes of all files in self._files
        self._fd: int | None = None  # of self.folder
        self._session_fds: dict[str, int] = {}
        self._files: dict[Path, SavedFile] = {}  # oldest first
        self._fresh: dict[str, set[Path]] = {}  # per session: made since its last reply
        self._named: dict[str, set[Path]] = {}  # per session: named by its last reply
        self._counter = itertools.count(1)
        self._made_root = False  # the root is a fallback of our own: removed at exit too
        self._open()

    def _open(self) -> None:
        try:
            self._open_in(self.root)
            return
        except OSError as exc:
            reason = exc.strerror if isinstance(exc, UnsafeFolder) else str(exc)
        try:
            fallback = Path(tempfile.mkdtemp(prefix=f"ipython-mcp-{os.getuid()}-"))
            self._made_root = True
            self._open_in(fallback)
        except OSError as exc:
            self.problem = f"the output folder {self.root} cannot be used ({reason}), nor a fresh private one ({exc})"
            log.warning("%s: the full text of cut output is not saved", self.problem)
            return
        log.warning("the output folder %s is not used: %s. Saving output in a fresh private folder, %s, instead.", self.root, reason, fallback)
        self.root = fallback

    def _open_in(self, root: Path) -> None:
        root.parent.mkdir(parents=True, exist_ok=True)
        root_fd = open_private_folder(root)
        try:
            self._remove_stale(root, root_fd)
            for _ in range(100):
                name = f"server-{os.getpid()}-{secrets.token_hex(4)}"
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=root_fd)
                    break
            else:
                raise OSError(errno.EEXIST, f"no free folder name in {root}")
            self._fd = open_private_folder(name, root_fd)
            self.folder = root / name
        finally:
            os.close(root_fd)

    @staticmethod
    def _remove_stale(root: Path, root_fd: int) -> None:
        """Remove folders that servers now gone left behind (SIGKILL, a crash): only real folders of ours."""
        for name in os.listdir(root_fd):
            match = SERVER_FOLDER.fullmatch(name)
            if match is None or process_alive(int(match[1])):
                continue
            try:
                info = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                    shutil.rmtree(root / name)  # never follows a link inside
                    log.info("removed %s, left by a server that is gone", root / name)
            except OSError as exc:
                log.warning("could not remove %s, left by a server that is gone: %s", root / name, exc)

    def _session_fd(self, session: str) -> int:
        fd = self._session_fds.get(session)
        if fd is None:
            if self._fd is None:
                raise OSError(errno.ENOENT, self.problem or "the server's output folder was removed")
            fd = self._session_fds[session] = open_private_folder(session, self._fd)
        return fd

    def create(self, session: str, what: str) -> tuple[Path, int]:
        """A new private file for ``what`` (``stdout.txt``, ``image0.png``) in the session's folder."""
        try:
            return self._create(session, what)
        except FileNotFoundError:
            if self._fd is None:
                raise
        # Our folder was deleted under us (say `rm -rf` in a cell): start a new one.
        log.warning("the output folder %s was removed while in use; making a new one", self.folder)
        for fd in [*self._session_fds.values(), self._fd]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._session_fds.clear()
        self._files.clear()
        self._fresh.clear()
        self._named.clear()
        self._fd, self.folder, self.total = None, None, 0
        self._open_in(self.root)
        return self._create(session, what)

    def _create(self, session: str, what: str) -> tuple[Path, int]:
        dir_fd = self._session_fd(session)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for _ in range(100):
            name = f"{stamp}-{next(self._counter)}-{what}"
            try:
                fd = create_private_file(name, dir_fd)
            except FileExistsError:  # not ours: never written through, never reused
                log.warning("%s already exists in the output folder; not touching it", name)
                continue
            path = self.folder / session / name  # type: ignore[operator]
            self._files[path] = SavedFile(session)
            self._fresh.setdefault(session, set()).add(path)
            return path, fd
        raise OSError(errno.EEXIST, "no free file name in the output folder")

    def reserve(self, path: Path, size: int) -> int:
        """How many of ``size`` more bytes ``path`` may take under the folder's cap (old files are deleted to make room)."""
        entry = self._files.get(path)
        if entry is None:  # its session was shut down meanwhile
            return 0
        if self.total + size > self.folder_limit:
            self._free(self.total + size - self.folder_limit)
            size = max(min(size, self.folder_limit - self.total), 0)
        entry.size += size
        self.total += size
        return size

    def _free(self, need: int) -> None:
        for path, entry in list(self._files.items()):
            if need <= 0:
                return
            if not entry.writing and not entry.kept:
                need -= entry.size
                self._delete(path)

    def _delete(self, path: Path) -> None:
        entry = self._files.pop(path)
        self.total -= entry.size
        fd = self._session_fds.get(entry.session)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path.name, dir_fd=fd)

    def closed(self, path: Path, size: int) -> None:
        """The writer of ``path`` is done; ``size`` bytes are on disk."""
        entry = self._files.get(path)
        if entry is not None:
            self.total += size - entry.size
            entry.size, entry.writing = size, False

    def save(self, session: str, what: str, data: bytes) -> Path:
        """Save ``data`` whole in a new private file, or raise OSError saying why not."""
        if len(data) > self.file_limit:
            raise OSError(errno.EFBIG, f"{len(data)} bytes is over the limit per saved file, --spill-file-limit {self.file_limit}")
        path, fd = self.create(session, what)
        written = 0
        try:
            if self.reserve(path, len(data)) < len(data):
                raise OSError(errno.ENOSPC, f"the output folder is full (--output-dir-limit {self.folder_limit})")
            while written < len(data):
                written += os.write(fd, data[written:] if written else data)
        except OSError:
            self._delete(path)
            raise
        finally:
            os.close(fd)
        self.closed(path, written)
        return path

    def kernel_file(self, session: str) -> tuple[str, int] | None:
        """Where the kernel may save a cut result's full text, and how many bytes of it at most."""
        try:
            self._session_fd(session)
        except OSError:
            return None
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._counter)}-result.txt"
        return str(self.folder / session / name), max(min(self.file_limit, self.folder_limit - self.total), 0)  # type: ignore[operator]

    def adopt(self, session: str, path: str, size: int) -> None:
        """Count a file the kernel saved (see ``kernel_file``)."""
        saved = Path(path)
        if self.folder is None or saved.parent != self.folder / session or saved in self._files:
            return
        self._files[saved] = SavedFile(session, size, writing=False)
        self._fresh.setdefault(session, set()).add(saved)
        self.total += size
        if self.total > self.folder_limit:
            self._free(self.total - self.folder_limit)

    def keep_named(self, session: str, paths: list[str | None]) -> None:
        """The last reply of ``session`` named ``paths``: keep them; its older files may go when room is short."""
        named = {Path(path) for path in paths if path}
        fresh = self._fresh.get(session, set())
        still_writing = set()
        for path in fresh | self._named.get(session, set()):  # only these can change: no scan of every file
            entry = self._files.get(path)
            if entry is not None and entry.writing:  # a cell left running still writes it
                still_writing.add(path)
            elif entry is not None:
                entry.kept = path in named
        self._fresh[session] = still_writing
        self._named[session] = {path for path in named if path in self._files}

    def remove_session(self, session: str) -> None:
        """Delete a session's files and folder (at its shutdown)."""
        for path in [path for path, entry in self._files.items() if entry.session == session]:
            entry = self._files.pop(path)
            self.total -= entry.size
        self._fresh.pop(session, None)
        self._named.pop(session, None)
        fd = self._session_fds.pop(session, None)
        if fd is not None:
            os.close(fd)
        if self.folder is not None:
            try:
                shutil.rmtree(self.folder / session)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove the files of session %r: %s", session, exc)

    def remove_all(self) -> None:
        """Delete this server's folder (at exit); nothing is saved after this."""
        for fd in [*self._session_fds.values(), *([self._fd] if self._fd is not None else [])]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._session_fds.clear()
        self._files.clear()
        self._fresh.clear()
        self._named.clear()
        self._fd, self.total = None, 0
        folder, self.folder = self.folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            if self._made_root:
                with contextlib.suppress(OSError):
                    os.rmdir(self.root)


class SpillFile:
    """One file of saved text, written through a small buffer, within the caps.

    It never raises: a cap or a full disk costs the end of the file, never the reply's
    head and tail; ``problem`` says what the file lacks.
    """

    def __init__(self, files: OutputFiles, path: Path, fd: int):
        self.path, self._files, self._fd = path, files, fd
        self._pending = bytearray()
        self.size = 0  # bytes taken so far (written, or waiting in the buffer)
        self._granted = 0  # bytes the caps allow beyond size, asked for in blocks (not on every write)
        self.cut_at: int | None = None  # where a cap stopped the file
        self.cut_by = ""  # "file" or "folder": which cap
        self.error: str | None = None  # a write that failed (disk full, file too large)

    def write(self, text: str) -> None:
        if self._fd < 0 or self.cut_at is not None or not text:
            return
        data = text.encode("utf-8", "replace")
        if len(data) > self._granted:
            room = max(self._files.file_limit - self.size - self._granted, 0)
            ask = min(max(len(data) - self._granted, SPILL_BUFFER_BYTES), room)
            got = self._files.reserve(self.path, ask)
            self._granted += got
            if len(data) > self._granted:
                self.cut_by = "folder" if got < ask else "file"
                data = data[: self._granted]
                self.cut_at = self.size + len(data)
        self._granted -= len(data)
        self.size += len(data)
        if not self._pending and len(data) >= SPILL_BUFFER_BYTES:
            self._write_out(data)  # a big chunk goes straight out, uncopied
            return
        self._pending += data
        if len(self._pending) >= SPILL_BUFFER_BYTES or self.cut_at is not None:
            self._flush()

    def _flush(self) -> None:
        data, self._pending = self._pending, bytearray()
        self._write_out(data)

    def _write_out(self, data: bytes | bytearray) -> None:
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:] if written else data)
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            self.size -= len(data) - written
            self._close_fd()

    def close(self) -> None:
        if self._fd >= 0 and self._pending:
            self._flush()
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
            self._files.closed(self.path, self.size)

    @property
    def problem(self) -> str | None:
        """Why the file does not hold the full text, or None."""
        if self.error is not None:
            return f"The saved text in {self.path} is incomplete: writing it failed after {self.size} bytes ({self.error})."
        if self.cut_at is not None:
            if self.cut_by == "file":
                limit = f"the limit per saved file, --spill-file-limit {self._files.file_limit}"
            else:
                limit = f"the output folder is full, --output-dir-limit {self._files.folder_limit}"
            return f"The saved text in {self.path} was cut at {self.cut_at} bytes ({limit})."
        return None


@dataclasses.dataclass
class SpillTarget:
    """Where one call's cut output goes: a new file in its session's folder."""

    files: OutputFiles
    session: str

    def __call__(self, stream: str) -> SpillFile:
        path, fd = self.files.create(self.session, f"{stream}.txt")
        return SpillFile(self.files, path, fd)

    def for_kernel(self) -> dict[str, Any]:
        """The execute message's ``spill_path`` and ``spill_limit``: where the kernel saves a cut result."""
        target = self.files.kernel_file(self.session)
        return {"spill_path": target[0], "spill_limit": target[1]} if target else {"spill_path": None, "spill_limit": 0}


# --- Output kept per call: bounded in memory, full text spilled to a file ------------


# Python's default repr, and IPython's form of it (`<__main__.C at 0x7f...>`).
DEFAULT_REPR = re.compile(r"<[\w.<>]+ object( at 0x[0-9a-fA-F]+)?>|<[\w.<>]+ at 0x[0-9a-fA-F]+>")


def display_text(bundle: dict[str, str]) -> str:
    """The best text form of a display bundle: markdown, then plain, then HTML.

    A plain form that is only the default ``<X object>`` repr says nothing, so HTML
    (or LaTeX, JSON) wins over it.
    """
    plain = bundle.get("text/plain")
    if isinstance(plain, str) and DEFAULT_REPR.fullmatch(plain.strip()):
        plain = None
    for text in (bundle.get("text/markdown"), plain, bundle.get("text/html"), bundle.get("text/latex")):
        if isinstance(text, str) and text:
            return text
    if "application/json" in bundle:
        value = bundle["application/json"]
        return value if isinstance(value, str) else json.dumps(value)  # a str: JSON the kernel cut to size
    return bundle.get("text/plain") or ""


def collapse_redraws(text: str) -> str:
    """Apply carriage returns the way a terminal shows them: a redrawn line keeps its last state."""
    if "\r" not in text:
        return text
    lines = text.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        if "\r" in line:
            lines[i] = next((part for part in reversed(line.split("\r")) if part), "")
    return "\n".join(lines)


# Terminal control sequences (ECMA-48): OSC strings such as hyperlinks and window titles
# (ended by BEL or ST), DCS/SOS/PM/APC strings, CSI sequences (colours, cursor moves,
# erase), then any other escape (charset, keypad, save cursor; or an introducer whose
# string was never ended). U+009B is the one-character CSI.
TERMINAL_SEQUENCE = re.compile(
    r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|\x1b[PX^_][^\x1b]*\x1b\\"
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|\x1b[ -/]*[0-~]"
)


def reply_text(text: str) -> str:
    """Output text as a reply shows it: terminal control sequences removed (the agent
    reads text, not a terminal). Saved files keep the raw stream."""
    if "\x1b" not in text and "\x9b" not in text:
        return text
    return TERMINAL_SEQUENCE.sub("", text)


def cut_middle(text: str, limit: int, what: str = "characters cut") -> tuple[str, int]:
    """``text`` in at most ``limit`` characters: head and tail around one marker, ``… [N {what}] …``.

    Returns the text and how many characters were cut. Every cut in the middle (output,
    tracebacks, the record) goes through here, so they all read alike.
    """
    if len(text) <= limit:
        return text, 0
    half = max(limit - 60 - len(what), 2) // 2  # room for the marker
    cut = len(text) - 2 * half
    return f"{text[:half]}\n… [{cut} {what}] …\n{text[-half:]}", cut


class OutputBuffer:
    """One stream of one cell: everything up to ``limit`` chars, then head + tail.

    Once the limit is passed, the whole text goes to a file (so nothing is lost)
    and memory holds only the head and a tail of the same size. Progress bars that
    redraw with ``\r`` are collapsed to their last state as they arrive.
    """

    def __init__(self, name: str, limit: int, spill_path: Callable[[str], SpillFile] | None):
        self.name, self.limit, self._spill_path = name, max(limit, 2), spill_path
        self.head = ""
        self.tail = ""
        self.total = 0  # characters kept (after redraws collapsed), in memory or in the file
        # Past the limit: memory keeps head and tail only, and the file (if one could be made,
        # and this buffer has a spill target at all) keeps everything.
        self.overflowed = False
        self._file: SpillFile | None = None
        self.file_path: Path | None = None
        self.last_line = ""

    def write(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)  # the file keeps the raw stream
        if "\r" in text:
            text = self._reopen_last_line() + text
            text = collapse_redraws(text)
        self.total += len(text)
        if not self.overflowed and self.total <= self.limit:
            self.head += text
        else:
            if not self.overflowed:
                self._spill()
                if self._file is not None:
                    self._file.write(text)
            keep = self.limit // 2
            if len(self.head) < keep:  # the chunk that overflowed may be the first one
                self.head, text = self.head + text[: keep - len(self.head)], text[keep - len(self.head) :]
            self.tail += text
            if len(self.tail) > 2 * self.limit:  # trim now and then, not on every write
                self.tail = self.tail[-self.limit // 2 :]
        stripped = text.rstrip("\n")
        if stripped:
            self.last_line = stripped.rsplit("\n", 1)[-1][-200:]

    def _reopen_last_line(self) -> str:
        """Take the unfinished last line back out, so a redraw can replace it."""
        buffer = "tail" if self.overflowed else "head"
        kept = getattr(self, buffer)
        cut = kept.rfind("\n") + 1
        setattr(self, buffer, kept[:cut])
        self.total -= len(kept) - cut
        return kept[cut:]

    def _spill(self) -> None:
        self.overflowed = True
        if self._spill_path is not None:
            try:
                self._file = self._spill_path(self.name)  # never raises once made: a full disk cuts the file only
                self.file_path = self._file.path
                self._file.write(self.head)
            except OSError as exc:  # an unwritable output folder costs the full text, not the call
                log.warning("cannot save the full %s: %s", self.name, exc)
                self.file_path = None
                self._file = None
        keep = self.limit // 2
        self.head, self.tail = self.head[:keep], self.head[keep:]

    @property
    def ends_line(self) -> bool:
        return (self.tail if self.overflowed else self.head).endswith("\n")

    def clear(self) -> None:
        """clear_output(): what the agent gets starts again (a spill file so far is closed and not named)."""
        self.head, self.tail, self.total, self.overflowed = "", "", 0, False
        if self._file is not None:
            self._file.close()
        self._file, self.file_path = None, None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    @property
    def saved_problem(self) -> str | None:
        """Why the file named does not hold the full text (a cap, a full disk), or None."""
        return getattr(self._file, "problem", None) if self.file_path else None

    @property
    def cut(self) -> int:
        return max(self.total - len(self.head) - len(self._kept_tail), 0) if self.overflowed else 0

    @property
    def _kept_tail(self) -> str:
        return self.tail[-max(self.limit - len(self.head), 0) :] if self.limit > len(self.head) else ""

    @property
    def text(self) -> str:
        if not self.overflowed:
            return self.head
        where = ""
        if self.file_path:
            where = f"; saved text in {self.file_path} is incomplete" if self.saved_problem else f"; full text in {self.file_path}"
        return f"{self.head}\n… [{self.cut} characters cut{where}] …\n{self._kept_tail}"


class DisplayTexts:
    """The text forms of one call's display() outputs, bounded like a stream.

    The first texts (up to half of ``limit`` characters) and the last ones (the other
    half) are kept; one text longer than half is cut in its middle; the texts between
    are only counted. Once anything is cut, the full text of every display goes to a
    file (through an OutputBuffer, so it is saved exactly as stdout is).
    """

    name = "display"

    def __init__(self, limit: int, spill_path: SpillTarget | None):
        self.limit = max(limit, 4)
        self._full = OutputBuffer(self.name, self.limit // 2, spill_path)
        self.head: list[str] = []
        self.tail: collections.deque[str] = collections.deque()
        self._head_chars = self._tail_chars = 0
        self._head_open = True
        self.count = 0  # display() outputs with text
        self.total = 0  # their characters
        self.cut = 0  # characters not in the reply
        self.dropped = 0  # whole texts not in the reply

    def add(self, text: str) -> None:
        self.count += 1
        self.total += len(text)
        self._full.write(text if text.endswith("\n") else text + "\n")
        keep = self.limit // 2
        text, cut = cut_middle(text, keep, f"characters cut{self._where}")
        self.cut += cut
        if self._head_open and self._head_chars + len(text) <= keep:
            self.head.append(text)
            self._head_chars += len(text)
            return
        self._head_open = False
        self.tail.append(text)
        self._tail_chars += len(text)
        while self._tail_chars > keep and len(self.tail) > 1:
            dropped = self.tail.popleft()
            self._tail_chars -= len(dropped)
            self.dropped += 1
            self.cut += len(dropped)

    @property
    def _where(self) -> str:
        return f"; full text in {self.file_path}" if self.file_path else ""

    @property
    def file_path(self) -> Path | None:
        return self._full.file_path

    @property
    def saved_problem(self) -> str | None:
        return self._full.saved_problem

    @property
    def texts(self) -> list[str]:
        if not self.dropped:
            return self.head + list(self.tail)
        marker = f"… [{self.dropped} display outputs cut{self._where}] …"
        return [*self.head, marker, *self.tail]

    def clear(self) -> None:
        self._full.clear()
        self.head, self.tail = [], collections.deque()
        self._head_chars = self._tail_chars = 0
        self._head_open = True
        self.count = self.total = self.cut = self.dropped = 0

    def close(self) -> None:
        self._full.close()


class ShownImages:
    """The images of one call: the first ones inline, within a count and a byte budget;
    later ones only saved to files (kept in memory until the reply saves them, up to a
    bound); beyond that bound they are only counted."""

    def __init__(self, max_inline: int, max_inline_bytes: int):
        self.max_inline, self.max_inline_bytes = max_inline, max_inline_bytes
        self.kept: list[tuple[str, str, bool]] = []  # (mime, base64, sent inline)
        self.inline = self.inline_bytes = 0
        self.file_only = self.file_only_bytes = 0
        self.dropped = 0

    def add(self, mime: str, data: str) -> int | None:
        """Keep an image; its index among the kept ones, or None when it was dropped."""
        size = len(data) * 3 // 4  # decoded bytes, near enough
        if self.inline < self.max_inline and self.inline_bytes + size <= self.max_inline_bytes and size <= IMAGE_INLINE_MAX_BYTES:
            self.inline += 1
            self.inline_bytes += size
            inline = True
        elif self.file_only < IMAGE_FILE_ONLY_MAX_COUNT and self.file_only_bytes + size <= IMAGE_FILE_ONLY_MAX_BYTES:
            self.file_only += 1
            self.file_only_bytes += size
            inline = False
        else:
            self.dropped += 1
            return None
        self.kept.append((mime, data, inline))
        return len(self.kept) - 1

    def note(self) -> str | None:
        """What the warning says when the budget left images out of the reply."""
        # (an image too big to send inline at all has a warning of its own)
        over_budget = sum(1 for _, data, inline in self.kept if not inline and len(data) * 3 // 4 <= IMAGE_INLINE_MAX_BYTES)
        if not over_budget and not self.dropped:
            return None
        shown = len(self.kept) + self.dropped
        note = (
            f"The cell showed {shown} images; {self.inline} were sent inline (at most {self.max_inline} images "
            f"and {self.max_inline_bytes} bytes per call)"
        )
        if over_budget:
            note += f", {over_budget} more were only saved to files (see images[].path)"
        if self.dropped:
            note += (
                f", {self.dropped} were dropped (over {IMAGE_FILE_ONLY_MAX_COUNT} images or "
                f"{IMAGE_FILE_ONLY_MAX_BYTES} bytes per call)"
            )
        return note + ". Close figures you do not need (plt.close), or save them with savefig and show a few."


# --- Background work: every task has an owner -------------------------------------------
#
# The server's background tasks (each kernel's readers and exit watch, session starts, fork
# servers, spare kernels, the idle watch) run in one anyio task group that the server
# lifespan owns (``Jobs``), so none outlives the server and none fails unseen. Whoever starts
# a ``Job`` can cancel it and wait for its end, as with an asyncio Task; a ``OneShot`` is a
# value that arrives once (a reply, a hello, an exit status), as an asyncio Future, but
# waiting for it can be cancelled without touching it.


class OneShot(Generic[T]):
    """A value, or an error, set once and awaited by any number of tasks."""

    def __init__(self) -> None:
        self._arrived = anyio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._error_tb: types.TracebackType | None = None

    def done(self) -> bool:
        return self._arrived.is_set()

    def set(self, value: T) -> None:
        if not self.done():
            self._value = value
            self._arrived.set()

    def fail(self, error: BaseException) -> None:
        if not self.done():
            self._error, self._error_tb = error, error.__traceback__
            self._arrived.set()

    def result(self) -> T:
        """The value, or the error raised; only once done."""
        assert self.done()
        if self._error is not None:
            raise self._error.with_traceback(self._error_tb)  # as asyncio's Future: each waiter's traceback starts afresh
        return self._value  # type: ignore[return-value]

    async def wait(self) -> T:
        if not self.done():  # a value already there is taken at once, even past a deadline
            await self._arrived.wait()
        return self.result()


class Job:
    """One task of ``Jobs``: ``cancel()`` it, ``wait()`` for its end; ``error`` is what it raised."""

    def __init__(self, name: str, on_done: Callable[[Job], None] | None = None):
        self.name, self.on_done = name, on_done  # on_done(job) runs as it ends, before any waiter wakes
        self.scope = anyio.CancelScope()  # entered by the task itself; cancelled even before it runs
        self.finished = anyio.Event()
        self.error: Exception | None = None

    def done(self) -> bool:
        return self.finished.is_set()

    def cancel(self) -> None:
        if not self.done():  # a scope long exited (the server's loop gone, say) is left alone
            self.scope.cancel()

    async def wait(self, timeout: float | None = None) -> bool:
        """True once it has ended, False at ``timeout``; a cancelled waiter leaves the job running."""
        if not self.done():
            with anyio.move_on_after(timeout):
                await self.finished.wait()
        return self.done()


class Jobs:
    """The task group every background task of a server runs in (opened by the lifespan).

    A job that raises is logged and ends alone: it never cancels its siblings or the
    server. When the group closes, every job still running is cancelled.
    """

    def __init__(self, group: anyio.abc.TaskGroup):
        self._group = group

    @classmethod
    @asynccontextmanager
    async def open(cls) -> AsyncIterator[Jobs]:
        """The jobs of one server lifespan; at its end, the ones still running are cancelled."""
        async with anyio.create_task_group() as group:
            try:
                yield cls(group)
            finally:
                group.cancel_scope.cancel()

    def start(
        self, work: Callable[..., Awaitable[Any]], *args: Any, name: str, on_done: Callable[[Job], None] | None = None
    ) -> Job:
        """Run ``work(*args)`` as a job; ``on_done(job)`` runs as it ends, before any waiter wakes."""
        job = Job(name, on_done)
        self._group.start_soon(self._run, job, work, args, name=name)
        return job

    @staticmethod
    async def _run(job: Job, work: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            with job.scope:
                if not job.scope.cancel_called:  # cancelled before it ran: none of it runs, as with a Task
                    await work(*args)
        except Exception as exc:
            job.error = exc
            log.exception("background task %s failed", job.name)
        finally:
            try:
                if job.on_done is not None:
                    job.on_done(job)
            except Exception:
                log.exception("background task %s: its clean-up failed", job.name)
            finally:
                job.finished.set()


# --- The wire: one cell in flight on one kernel --------------------------------------


@dataclasses.dataclass
class Execution:
    """What one ``execute`` request collects until the kernel says ``done``."""

    request_id: int
    limit: int  # characters kept per stream, and for the display texts
    spill: SpillTarget | None  # where the full text of cut output goes
    image_limit: int = DEFAULT_IMAGE_LIMIT  # images sent inline per call
    image_bytes_limit: int = DEFAULT_IMAGE_BYTES_LIMIT
    stdout: OutputBuffer = dataclasses.field(init=False)
    stderr: OutputBuffer = dataclasses.field(init=False)
    displays: DisplayTexts = dataclasses.field(init=False)  # display() text, bounded like stdout
    images: ShownImages = dataclasses.field(init=False)
    # stdout and display() text interleaved as the cell produced them, for the text block
    transcript: OutputBuffer = dataclasses.field(init=False)
    reply: OneShot[dict[str, Any]] = dataclasses.field(default_factory=OneShot)
    started: float = dataclasses.field(default_factory=time.monotonic)
    last_stream: str = "stdout"
    clear_pending: bool = False  # clear_output() was called; clear at the next output
    lines_seen: int = 0  # bumps on every stream message, so progress knows something is new
    code: str = ""  # the cell's source, for `ipython-mcp watch` to show while it runs

    def on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "stream":
            self.last_stream = "stderr" if message.get("name") == "stderr" else "stdout"
            text = message.get("text", "")
            self._clear_if_pending()
            if self.last_stream == "stderr":
                self.stderr.write(text)
            else:
                self.stdout.write(text)
                self._transcribe(text)
            self.lines_seen += 1
        elif kind == "display":
            self._clear_if_pending()
            self._transcribe(self._display_line(message.get("data") or {}), display=True)
        elif kind == "clear":
            # clear_output(wait=True) clears when the next output arrives, as in Jupyter,
            # so a cell that ends with it keeps its last state.
            self.clear_pending = True
            if not message.get("wait"):
                self._clear_if_pending()
        elif kind == "done":
            self.reply.set(message)

    def __post_init__(self) -> None:
        self._collect_afresh()

    def _collect_afresh(self) -> None:
        """New buffers for all a cell shows: at its start, and each time `wait` takes the output so far."""
        self.stdout = OutputBuffer("stdout", self.limit, self.spill)
        self.stderr = OutputBuffer("stderr", self.limit, self.spill)
        self.transcript = OutputBuffer("output", self.limit, None)  # a view: stdout and displays keep the files
        self.displays = DisplayTexts(self.limit, self.spill)
        self.images = ShownImages(self.image_limit, self.image_bytes_limit)

    def _clear_if_pending(self) -> None:
        if not self.clear_pending:
            return
        self.clear_pending = False
        self.stdout.clear()
        self.stderr.clear()
        self.displays.clear()
        self.images = ShownImages(self.image_limit, self.image_bytes_limit)
        self.transcript.clear()

    def _transcribe(self, text: str, display: bool = False) -> None:
        if not text:
            return
        if display and self.transcript.total and not self.transcript.ends_line:
            text = "\n" + text
        self.transcript.write(text)

    def _display_line(self, bundle: dict[str, Any]) -> str:
        """Keep a display (its text, or its image within the budget); its line for the transcript."""
        mime = next((m for m in IMAGE_MIME_TYPES if m in bundle), None)
        if mime is not None:
            index = self.images.add(mime, bundle[mime]) if isinstance(bundle[mime], str) else None
            return f"[image {index}: {mime}]\n" if index is not None else f"[{mime} image not kept: over the image budget]\n"
        text = display_text(bundle)
        if text:
            self.displays.add(text)
        return f"{text.rstrip()}\n" if text else ""

    def take_output(self) -> tuple[OutputBuffer, OutputBuffer, DisplayTexts, ShownImages]:
        """Hand over what was collected so far and start collecting afresh (for `wait`)."""
        taken = self.stdout, self.stderr, self.displays, self.images
        self._collect_afresh()
        return taken

    @property
    def last_line(self) -> str:
        return self.stderr.last_line if self.last_stream == "stderr" else self.stdout.last_line

    def fail(self, error: BaseException) -> None:
        self.reply.fail(error)


# --- Kernel: one child process, knows nothing of MCP ---------------------------------


class StopReason(str, enum.Enum):
    """Why this server ended a kernel on purpose; a kernel that ended by itself has none."""

    RESET = "reset"
    SHUTDOWN = "shutdown"
    KILLED = "killed"  # its cell ignored an interrupt, its start failed, or the server stops
    IDLE = "idle"


class PipeReader(anyio.abc.ByteReceiveStream):
    """Our end of a pipe a kernel writes (its stdout or stderr), as an anyio byte stream."""

    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.BaseTransport):
        self._reader, self._transport = reader, transport

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._reader.read(max_bytes)
        if not data:
            raise anyio.EndOfStream
        return data

    async def aclose(self) -> None:
        self._transport.close()


class PipeWriter(anyio.abc.ByteSendStream):
    """Our end of the pipe a kernel reads (its stdin), as an anyio byte stream."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer

    @property
    def closing(self) -> bool:
        return self._writer.is_closing()

    async def send(self, item: bytes) -> None:
        if self.closing:
            raise anyio.ClosedResourceError
        self._writer.write(item)
        try:
            await self._writer.drain()
        except ConnectionError as exc:  # the kernel (or launcher) is gone
            raise anyio.BrokenResourceError from exc

    def close(self) -> None:
        self._writer.close()

    async def aclose(self) -> None:
        self.close()


async def connect_pipes(stdin: int, stdout: int, stderr: int) -> tuple[PipeWriter, PipeReader, PipeReader]:
    """Streams on our ends of a kernel's three pipes; on failure the fds are closed.

    anyio's ``open_process`` makes its own pipes, but a forked kernel's are made here and
    sent to its fork server, so every kernel's pipes are made here and read the same way:
    through asyncio's pipe transports, which take an fd off the event loop before closing it.
    """
    loop = asyncio.get_running_loop()
    files = [os.fdopen(stdin, "wb", 0), os.fdopen(stdout, "rb", 0), os.fdopen(stderr, "rb", 0)]
    transports: list[asyncio.BaseTransport] = []  # a file under a transport is closed by aborting it
    try:
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, files[0])
        transports.append(transport)
        writer = PipeWriter(asyncio.StreamWriter(transport, protocol, None, loop))  # type: ignore[arg-type]
        readers = []
        for file in files[1:]:
            reader = asyncio.StreamReader(limit=WIRE_LINE_LIMIT, loop=loop)
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), file)  # noqa: B023
            transports.append(transport)
            readers.append(PipeReader(reader, transport))
    except BaseException:
        for transport in transports:
            transport.abort()  # type: ignore[attr-defined]
        for file in files[len(transports):]:
            file.close()
        raise
    return writer, readers[0], readers[1]


class LineReader:
    """The lines of a byte stream (the wire: a kernel's stdout), each at most ``limit`` bytes."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream, limit: int):
        self._stream, self._limit = stream, limit
        self._buffer = bytearray()

    async def receive_line(self) -> bytes | None:
        """The next line with its newline (the last may lack it); b"" at the end of the stream;
        None for a line over the limit, which is skipped."""
        searched, overlong = 0, False
        while True:
            index = self._buffer.find(b"\n", searched)
            if index >= 0:
                line = bytes(self._buffer[: index + 1])
                del self._buffer[: index + 1]
                return None if overlong else line
            if len(self._buffer) > self._limit:
                overlong = True
                self._buffer.clear()
            searched = len(self._buffer)
            try:
                data = await self._stream.receive()
            except anyio.EndOfStream:
                line, self._buffer = bytes(self._buffer), bytearray()
                return b"" if overlong else line
            self._buffer += data


def make_pipes(count: int) -> list[tuple[int, int]]:
    """``count`` new pipes as (read end, write end); OSError (none left open) when the fds run out."""
    pipes: list[tuple[int, int]] = []
    try:
        for _ in range(count):
            pipes.append(os.pipe())
    except OSError:
        close_fds(fd for pipe in pipes for fd in pipe)
        raise
    return pipes


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class KernelProcess:
    """The process a kernel runs in: spawn or fork, pipes, reap, kill. Knows nothing of the protocol.

    Local: the env's Python, leader of its own process group, which signals reach.
    Launched: the launcher (ssh, docker exec, bwrap) in its own group here; the kernel is
    on the far side, where our signals do not go (``signals`` is False): the protocol
    carries interrupts, and closing the launcher's input ends the far side.
    Either way its stdin, stdout and stderr are pipes made here (``connect_pipes``).
    """

    def __init__(self, guard: OrphanGuard | None, signals: bool):
        self.guard, self.signals = guard, signals
        self.process: anyio.abc.Process | ForkedProcess | None = None
        self.stdin: PipeWriter | None = None
        self.stdout: PipeReader | None = None
        self.stderr: PipeReader | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def spawn(self, argv: Sequence[str], environ: dict[str, str], pass_fds: Sequence[int] = ()) -> None:
        """Spawn ``argv`` on three new pipes. OSError: it could not start (nothing is left open)."""

        async def start(theirs: list[int]) -> anyio.abc.Process:
            return await anyio.open_process(
                argv, stdin=theirs[0], stdout=theirs[1], stderr=theirs[2],
                start_new_session=True,  # own process group: interrupt and kill reach its children
                env=environ, pass_fds=pass_fds,
            )

        await self._start_on_pipes(make_pipes(3), start)

    async def fork(self, forks: ForkServer, environ: dict[str, str], output_fds: Sequence[int]) -> None:
        """A kernel forked by ``forks`` on three new pipes and ``output_fds`` (the output pipes, both
        ends). Raises ForkUnavailable, having started nothing and left ``output_fds`` as they were."""
        try:
            pipes = make_pipes(3)
        except OSError as exc:
            raise ForkUnavailable(f"no pipes for the kernel: {exc}") from exc
        await self._start_on_pipes(pipes, lambda theirs: forks.fork(environ, [*theirs, *output_fds]))

    async def _start_on_pipes(
        self, pipes: list[tuple[int, int]], start: Callable[[list[int]], Awaitable[anyio.abc.Process | ForkedProcess]]
    ) -> None:
        """``start(theirs)`` on the kernel's ends of stdin, stdout and stderr, then our ends become
        its streams; whatever fails, no fd is left open."""
        (in_read, in_write), (out_read, out_write), (err_read, err_write) = pipes
        try:
            self.process = await start([in_read, out_write, err_write])
        except BaseException:
            close_fds([in_write, out_read, err_read])
            raise
        finally:
            close_fds([in_read, out_write, err_write])
        if self.guard is not None:
            self.guard.watch(self.process.pid)
        await self._connect(in_write, out_read, err_read)

    async def _connect(self, stdin: int, stdout: int, stderr: int) -> None:
        try:
            self.stdin, self.stdout, self.stderr = await connect_pipes(stdin, stdout, stderr)
        except BaseException:  # cancelled: the kernel started already goes now
            self.kill_now(running=True)
            if self.guard is not None and self.pid is not None:
                self.guard.forget(self.pid)
            raise

    async def wait(self) -> int | None:
        assert self.process
        returncode = await self.process.wait()
        if self.guard is not None:
            self.guard.forget(self.process.pid)
        return returncode

    def signal_group(self, signum: int) -> bool:
        """Signal the kernel's process group; False when that cannot reach the kernel."""
        if not self.signals or self.pid is None:
            return False
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def close_input(self) -> None:
        if self.stdin is not None:
            self.stdin.close()

    def kill_now(self, running: bool) -> None:
        """SIGKILL the process group, and descendants that left it (setsid). A process not seen
        to exit yet is also killed by pid: a forked kernel may not have reached its setsid()."""
        if self.pid is None:
            return
        strays = descendants(self.pid) if running else []
        for kill in (os.killpg, os.kill) if running else (os.killpg,):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(self.pid, signal.SIGKILL)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class ForkUnavailable(Exception):
    """No kernel from this fork server (its env has no IPython, it died, its env changed): spawn one."""


class ForkedProcess:
    """A kernel forked by a ForkServer, shaped like anyio's Process for KernelProcess: its
    ``pid``, and ``wait()`` for the exit status the fork server reports (it is the kernel's parent)."""

    def __init__(self, pid: int, exit_status: OneShot[int | None]):
        self.pid, self._exit_status = pid, exit_status
        self.returncode: int | None = None

    async def wait(self) -> int | None:
        """The exit status; None when nobody could read it (the fork server had ended first)."""
        self.returncode = await self._exit_status.wait()
        return self.returncode


class ForkServer:
    """One local interpreter's fork server (Linux): ``bootstrap_kernel.py --fork-server``, a
    process that has imported IPython once and forks a kernel per request, in ~1/10 of the
    time a fresh interpreter takes to import it (bootstrap_kernel.py says what each kernel
    resets of what it inherits).

    The server makes each kernel's pipes, exactly as for a spawned one, and hands them over
    a socket (SCM_RIGHTS). The kernel is the fork server's child, not ours: its exit status
    comes back as a message; if the fork server itself ends, its kernels live on (their pipes
    are ours) and their exits are seen through a pidfd, status unknown.
    """

    def __init__(self, python: Path, guard: OrphanGuard | None, jobs: Jobs):
        self.python, self.guard, self.jobs = python, guard, jobs
        self.process: anyio.abc.Process | None = None
        self.failed: str | None = None  # why it cannot fork (any more)
        self._socket: socket.socket | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, OneShot[ForkedProcess | dict[str, Any]]] = {}  # request id -> the kernel, or the refusal
        self._sending = anyio.Lock()
        self._unwanted: set[int] = set()  # requests whose caller was cancelled: a kernel forked for one is killed
        self._exits: dict[int, OneShot[int | None]] = {}  # kernel pid -> its exit status
        self._ready: OneShot[dict[str, Any]] = OneShot()
        self._reader: Job | None = None
        self.started = time.monotonic()
        self.was_ready = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def usable(self) -> bool:
        return self.failed is None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, environ: dict[str, str]) -> None:
        """Start it and wait until it has imported IPython. Raises ForkUnavailable."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = await anyio.open_process(
                [str(self.python), "-u", str(BOOTSTRAP), "--fork-server", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, env=environ, pass_fds=[theirs.fileno()],
            )
        except BaseException as exc:  # OSError, or cancelled while starting
            ours.close()
            self.failed = f"could not start: {exc}"
            if isinstance(exc, OSError):
                raise ForkUnavailable(self.failed) from exc
            raise
        finally:
            theirs.close()
        if self.guard is not None:
            self.guard.watch(self.process.pid)
        ours.setblocking(False)
        self._socket = ours
        self._reader = self.jobs.start(self._read, name=f"fork-server-{self.process.pid}")
        try:
            with anyio.fail_after(FORK_SERVER_START_TIMEOUT_S):
                ready = await self._ready.wait()
        except (TimeoutError, ForkUnavailable) as exc:
            self.failed = self.failed or f"not ready within {FORK_SERVER_START_TIMEOUT_S:.0f} s"
            self.close()
            raise ForkUnavailable(self.failed) from exc
        except BaseException:
            self.close()
            raise
        if not ready.get("ok"):
            self.failed = f"cannot run kernels: {ready.get('error')}"
            self.close()
            raise ForkUnavailable(self.failed)
        self.was_ready = True
        log.info("fork server %s ready for %s", self.pid, self.python)

    async def fork(self, environ: dict[str, str], fds: Sequence[int]) -> ForkedProcess:
        """A kernel forked with these fds as its stdin, stdout, stderr and output pipes.
        Raises ForkUnavailable (nothing was started; the caller still owns ``fds``)."""
        if self.failed is not None or self._socket is None:
            raise ForkUnavailable(self.failed or "not started")
        request_id = next(self._ids)
        reply = self._replies[request_id] = OneShot()
        try:
            cwd: str | None = os.getcwd()
        except OSError:  # deleted: the kernel starts where the fork server is
            cwd = None
        request = json.dumps({"kind": "fork", "id": request_id, "environ": environ, "cwd": cwd}).encode()
        try:
            await self._send(request, fds)
        except (OSError, anyio.ClosedResourceError) as exc:
            self._replies.pop(request_id, None)
            why = str(exc) or "the socket closed"
            if getattr(exc, "errno", None) != errno.EMSGSIZE:  # EMSGSIZE: this request (a huge environment) only
                self.retire(f"its socket failed: {why}")
            raise ForkUnavailable(f"the fork request could not be sent: {why}") from exc
        try:
            answer = await reply.wait()
        except BaseException:  # cancelled: the kernel is forked all the same, and must not outlive the caller
            await self._end_unwanted(request_id, reply)
            raise
        if isinstance(answer, ForkedProcess):
            return answer
        if answer.get("stale"):
            self.retire("its env's packages changed")  # the next kernel gets a fresh fork server
        raise ForkUnavailable(str(answer.get("error")))

    async def _send(self, request: bytes, fds: Sequence[int]) -> None:
        """One request and its fds, on a socket that may be full (the fork server busy) or closing."""
        sock = self._socket
        async with self._sending:  # one waiter per socket at a time, as anyio.wait_writable allows
            while True:
                if sock is None or self._socket is not sock:
                    raise anyio.ClosedResourceError
                try:
                    socket.send_fds(sock, [request], list(fds))
                    return
                except BlockingIOError:
                    await anyio.wait_writable(sock)  # ClosedResourceError if the reader closes it meanwhile

    async def _end_unwanted(self, request_id: int, reply: OneShot[ForkedProcess | dict[str, Any]]) -> None:
        """A fork whose caller was cancelled: its kernel, once forked (in milliseconds), is killed and
        reaped before the cancellation goes on, so a shutdown racing a start leaves no kernel."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_REAP_TIMEOUT_S):
            answer = await reply.wait()
            self._kill_unwanted(answer)
            if isinstance(answer, ForkedProcess):
                await answer.wait()  # its exit status: the fork server has reaped it
        if not reply.done():  # no answer in time: killed when it comes
            self._unwanted.add(request_id)

    @staticmethod
    def _kill_unwanted(answer: ForkedProcess | dict[str, Any]) -> None:
        if isinstance(answer, ForkedProcess):
            for kill in (os.killpg, os.kill):  # os.kill: it may not have reached setsid() yet
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(answer.pid, signal.SIGKILL)

    async def _read(self) -> None:
        assert self._socket is not None
        sock, why = self._socket, "it exited"
        try:
            while True:
                try:
                    data = sock.recv(FORK_PACKET_BYTES)
                except BlockingIOError:
                    await anyio.wait_readable(sock)
                    continue
                if not data:
                    break
                try:
                    message = json.loads(data)
                except ValueError:
                    log.warning("fork server %s sent a packet that is not JSON: %.200r", self.pid, data)
                    continue
                self._dispatch(message)
        except OSError as exc:
            why = f"its socket failed: {exc}"
        except anyio.get_cancelled_exc_class():
            why = "it was closed"
            raise
        finally:
            self._lost(why)
            anyio.notify_closing(sock)  # a fork() waiting to send hears it, and no stale wait stays on the loop
            sock.close()
            self._socket = None

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "ready":
            self._ready.set(message)
        elif kind in ("forked", "refused"):
            answer: ForkedProcess | dict[str, Any] = message
            if kind == "forked" and isinstance(message.get("pid"), int):  # its exit may be the next message
                status = self._exits[message["pid"]] = OneShot()
                answer = ForkedProcess(message["pid"], status)
            reply = self._replies.pop(message.get("id"), None)  # type: ignore[arg-type]
            if reply is not None:
                reply.set(answer)
            if message.get("id") in self._unwanted:
                self._unwanted.discard(message["id"])
                self._kill_unwanted(answer)
        elif kind == "exited" and message.get("pid") in self._exits:
            returncode = message.get("returncode")
            self._exit_seen(message["pid"], returncode if isinstance(returncode, int) else None)

    def _exit_seen(self, pid: int, returncode: int | None) -> None:
        status = self._exits.pop(pid, None)
        if status is not None:
            status.set(returncode)
        if self.failed is not None and not self._exits:  # retired (or gone), and its last kernel has ended
            self.close()

    def _lost(self, why: str) -> None:
        """The fork server is gone: no more forks; its live kernels are watched through pidfds."""
        if self.failed is None:
            self.failed = why
            log.info("fork server %s for %s: %s", self.pid, self.python, why)
        replies, self._replies = self._replies, {}
        for reply in replies.values():
            reply.set({"kind": "refused", "error": f"the fork server ended ({why})"})
        self._ready.fail(ForkUnavailable(f"it ended before it was ready ({why})"))
        for pid in list(self._exits):
            self._watch_orphan(pid)

    def _watch_orphan(self, pid: int) -> None:
        """Learn a kernel's exit without its parent: its pidfd becomes readable (Linux 5.3+)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:  # gone already (fork_server_default checked that pidfds work here)
            if not isinstance(exc, ProcessLookupError):
                log.warning("kernel %s: its exit cannot be watched (%s); taken as ended", pid, exc)
            self._exit_seen(pid, None)
            return

        async def watch() -> None:
            try:
                await anyio.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            self._exit_seen(pid, None)

        self.jobs.start(watch, name=f"orphan-kernel-{pid}")

    def retire(self, why: str) -> None:
        """No more forks; it ends when its last kernel has (their exit statuses still come)."""
        if self.failed is None:
            self.failed = why
        if not self._exits:
            self.close()

    def close(self) -> None:
        """End the fork server, and not its kernels: SIGKILLed, it has no time to end them (an
        end of file on its socket would have it do so). Their exits are then watched by pidfd."""
        if self.failed is None:
            self.failed = "it was closed"
        if self.process is not None:
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            if self.guard is not None:
                self.guard.forget(self.process.pid)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()  # it closes the socket as it ends, once it no longer waits on it
        elif self._socket is not None:
            self._socket.close()
            self._socket = None


def kernel_minimums(hello: dict[str, Any] | None = None) -> tuple[str, str]:
    """The Python and IPython versions the kernel needs ("3.9", "7.0"): as its hello says, or,
    for a kernel that died before saying hello, as bootstrap_kernel.py defines them."""
    if hello and hello.get("min_python") and hello.get("min_ipython"):
        return str(hello["min_python"]), str(hello["min_ipython"])
    pattern = r"^(MIN_PYTHON|MIN_IPYTHON) = \((\d+), (\d+)\)"
    found = {name: f"{major}.{minor}" for name, major, minor in re.findall(pattern, BOOTSTRAP.read_text(), re.M)}
    return found.get("MIN_PYTHON", "?"), found.get("MIN_IPYTHON", "?")


def hello_problem(hello: dict[str, Any], env: str, python: Path | LaunchedPython, envs_dir: Path | None = None) -> EnvError | None:
    """What a kernel's hello says is missing there, as the EnvError to report; None when it can run.
    Hints that suggest a new env put it in ``envs_dir`` (the server's envs folder)."""
    envs = envs_dir if envs_dir is not None else envs_dir_default()
    if hello.get("protocol") != KERNEL_PROTOCOL_VERSION:
        return EnvError(
            env,
            str(python),
            f"The kernel in env {env!r} (python: {python}) speaks protocol version {hello.get('protocol')}, "
            f"this server speaks version {KERNEL_PROTOCOL_VERSION}.",
            f"Use the {BOOTSTRAP.name} that came with this {Path(__file__).name} (the two files go together).",
        )
    min_python = kernel_minimums(hello)[0]
    if hello.get("missing") == "ipython":
        has_pip = bool(hello.get("pip", True))
        if hello.get("ipython"):  # there, but too old
            reason = f"IPython in env {env!r} (python: {python}) cannot run this kernel: {hello.get('error')}."
        else:
            reason = f"ipykernel not found in env {env!r} (python: {python}): IPython is not importable there ({hello.get('error')})."
        if isinstance(python, LaunchedPython):
            args = ("-m", "pip", "install", "ipykernel")
            plan = InstallPlan(tuple(python.argv(*args)), None, python.command_text(*args))
            return EnvError(env, python.python, reason, f"Install with: {plan.text}", "missing_ipython", has_pip, plan=plan)
        return EnvError(env, str(python), reason, install_hint(python, has_pip, envs), "missing_ipython", has_pip)
    if hello.get("missing") == "python":
        return EnvError(
            env,
            str(python),
            f"The Python of env {env!r} (python: {python}) cannot run a session: {hello.get('error')}.",
            f"Use an env with Python {min_python} or newer, for example: "
            f"uv venv -p 3.12 {envs}/NAME && uv pip install --python {envs}/NAME/bin/python ipykernel",
        )
    if hello.get("error"):
        return EnvError(env, str(python), f"The kernel in env {env!r} (python: {python}) cannot start: {hello['error']}.")
    return None


def kernel_environment(python: Path, pip_shims: str | None = None) -> dict[str, str]:
    """A local kernel's environment: the session's env activated, as a person's shell has it.

    `!python`, `!jupyter` and the like are the env's own (its bin first on PATH), and
    `!pip` is a script that installs into the session's interpreter even in an env
    without pip (the pip-shim folder comes first). The kernel learns where uv is, for
    `%pip` in such envs.
    """
    environ = dict(os.environ)
    bin_dir = str(python.parent)
    shims = [pip_shims] if pip_shims else []
    environ["PATH"] = os.pathsep.join([*shims, bin_dir, environ.get("PATH", "")])
    if pip_shims:
        environ["IPYTHON_MCP_PIP_SHIMS"] = pip_shims
    uv = environ.get("UV") or shutil.which("uv")
    if uv:
        environ["IPYTHON_MCP_UV"] = uv
    prefix = python.parent.parent
    for variable in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONHOME"):
        environ.pop(variable, None)
    if (prefix / "pyvenv.cfg").is_file():
        environ["VIRTUAL_ENV"] = str(prefix)
    elif (prefix / "conda-meta").is_dir():
        environ["CONDA_PREFIX"] = str(prefix)
    environ["PYTHONUNBUFFERED"] = "1"
    environ["PYTHONIOENCODING"] = "utf-8"
    return environ


class Kernel:
    """The protocol with one kernel (bootstrap_kernel.py in the target env's Python): send,
    dispatch, the current execution, interrupt. Its ``proc`` is the process it runs in,
    here or behind a launcher; an exit is seen as the process ending (for a launched
    kernel, the connection closing)."""

    def __init__(
        self, python: Path | LaunchedPython, env_label: str, jobs: Jobs, guard: OrphanGuard | None = None,
        envs_dir: Path | None = None, forks: ForkServer | None = None,
    ):
        self.python, self.env_label, self.jobs, self.guard = python, env_label, jobs, guard
        self.envs_dir = envs_dir  # named in hints that suggest a new env
        self.forks = forks  # a ready fork server of this interpreter: forked, not spawned
        self.launched = python if isinstance(python, LaunchedPython) else None
        self.proc = KernelProcess(guard, signals=self.launched is None)
        self.hello: dict[str, Any] = {}
        self.current: Execution | None = None
        self.exited = anyio.Event()
        self.stop_reason: StopReason | None = None  # we ended it on purpose, and why
        self._ids = itertools.count(1)
        self._log_tail = ""
        self._jobs: list[Job] = []  # its readers and exit watch, in the server's task group
        self._said_hello: OneShot[dict[str, Any]] = OneShot()
        self._reader_done = anyio.Event()
        self._log_done = anyio.Event()
        self._output_read_ends: dict[str, int] = {}
        self._startup_output = ""  # what the env printed on stdout before the hello (a banner)
        self._pip_shims: str | None = None  # private folder of `pip` scripts, while the kernel lives
        self._inline_spills: dict[int, str] = {}  # request id -> local path of a launched kernel's cut result
        self.ended: str | None = None  # how it ended ("signal SIGKILL", "the connection to HOST was lost: ..."), once it has

    @property
    def process(self) -> anyio.abc.Process | ForkedProcess | None:
        return self.proc.process

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and not self.exited.is_set()

    @property
    def busy(self) -> bool:
        return self.current is not None and not self.current.reply.done()

    async def _spawn_local(self, python: Path) -> None:
        try:
            found = python.is_file()
        except OSError as exc:  # a folder on the way became unreadable since the session was made
            raise unreachable_env_error(self.env_label, exc) from exc
        if not found:
            raise EnvError(self.env_label, str(python), f"No Python interpreter at {python}.", kind="no_interpreter")
        if not os.access(python, os.X_OK):
            raise EnvError(self.env_label, str(python), f"{python} is not executable.", kind="no_interpreter")
        # The cell output pipes are made here and handed to the kernel, whose relay thread
        # reads them; we keep a copy of each read end, to collect what a kernel killed by a
        # signal had not forwarded yet (see _collect_leftover_output).
        self._make_pip_shims()
        try:
            pipes = make_pipes(2)
        except OSError as exc:
            self._remove_pip_shims()
            raise EnvError(self.env_label, str(python), f"Could not start {python}: {exc}.") from exc
        handed = [fd for pipe in pipes for fd in pipe]
        environ = kernel_environment(python, self._pip_shims)
        environ["IPYTHON_MCP_OUTPUT_FDS"] = ",".join(map(str, handed))
        environ["IPYTHON_MCP_SERVER_PID"] = str(os.getpid())  # the kernel dies with us (PR_SET_PDEATHSIG, Linux)
        try:
            if not await self._forked(environ, handed):
                await self.proc.spawn([str(python), "-u", str(BOOTSTRAP)], environ, pass_fds=handed)
        except BaseException as exc:  # OSError, or cancelled while spawning: no fd may leak
            close_fds(handed)
            self._remove_pip_shims()
            if isinstance(exc, OSError):
                raise EnvError(self.env_label, str(python), f"Could not start {python}: {exc}.") from exc
            raise
        for read_end, write_end in pipes:
            os.close(write_end)
            os.set_blocking(read_end, False)
        self._output_read_ends = {"stdout": pipes[0][0], "stderr": pipes[1][0]}

    async def _forked(self, environ: dict[str, str], output_fds: list[int]) -> bool:
        """Fork the kernel from the fork server; False (nothing started) when there is none or it cannot."""
        if self.forks is None:
            return False
        try:
            await self.proc.fork(self.forks, environ, output_fds)
        except ForkUnavailable as exc:
            log.info("kernel of env %r spawned: the fork server cannot fork (%s)", self.env_label, exc)
            return False
        return True

    async def _spawn_launched(self, launched: LaunchedPython) -> None:
        """Start the launcher and send the bootstrap's source down its input (see KERNEL_LOADER).

        The far side makes its own output pipes (no IPYTHON_MCP_OUTPUT_FDS); its stderr is
        the launcher's, kept for errors ("Permission denied", "No such container").
        """
        environ = dict(os.environ)
        if shutil.which(launched.program, path=environ.get("PATH")) is None:
            raise launcher_missing_error(self.env_label, launched, None)
        try:
            await self.proc.spawn(launched.argv("-u", "-c", KERNEL_LOADER), environ)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise launcher_missing_error(self.env_label, launched, None) from exc
            raise EnvError(self.env_label, launched.python, f"Could not run the launcher of env {self.env_label!r}, `{launched.program}`: {exc}.") from exc
        assert self.proc.stdin
        source = BOOTSTRAP.read_bytes()
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):  # the launcher ended: its exit says why
            await self.proc.stdin.send(b"%d\n" % len(source) + source)

    async def start(self) -> dict[str, Any]:
        """Spawn and wait for the kernel's hello. Raises EnvError or KernelDied."""
        if self.launched is not None:
            await self._spawn_launched(self.launched)
        else:
            assert isinstance(self.python, Path)
            await self._spawn_local(self.python)
        self._jobs = [
            self.jobs.start(self._read_protocol, name=f"kernel-{self.pid}-protocol"),
            self.jobs.start(self._read_log, name=f"kernel-{self.pid}-log"),
            self.jobs.start(self._watch_exit, name=f"kernel-{self.pid}-exit"),
        ]
        try:
            with anyio.fail_after(KERNEL_START_TIMEOUT_S):
                hello = await self._said_hello.wait()
        except TimeoutError:
            await self.kill(StopReason.KILLED)
            raise EnvError(
                self.env_label,
                str(self.python),
                f"The kernel in env {self.env_label!r} (python: {self.python}) did not start within {KERNEL_START_TIMEOUT_S:.0f} s."
                + self._printed_at_start()
                + (f"\nThe launcher's stderr ended with:\n{self._log_tail.strip()}" if self.launched and self._log_tail.strip() else ""),
            ) from None
        except KernelDied as died:
            await self.kill(StopReason.KILLED)
            raise self._start_died_error(died) from None
        except BaseException:
            await self.kill(StopReason.KILLED)
            raise
        self.hello = hello
        problem = hello_problem(hello, self.env_label, self.python, self.envs_dir)
        if problem is not None:
            await self.kill(StopReason.KILLED)
            problem.reason += self._printed_at_start()
            problem.args = (problem.message,)
            raise problem
        return hello

    def _start_died_error(self, died: KernelDied) -> EnvError:
        if self.launched is None:
            return EnvError(
                self.env_label,
                str(self.python),
                f"The kernel in env {self.env_label!r} (python: {self.python}) exited before it was ready ({died.how})."
                + (f"\nIts stderr ended with:\n{died.log_tail}" if died.log_tail else "")
                + self._printed_at_start()
                + "\nThe bootstrap needs Python {} or newer with IPython {} or newer.".format(*kernel_minimums()),
            )
        launched = self.launched
        said = died.log_tail or "(nothing on stderr)"
        returncode = self.process.returncode if self.process else None
        if returncode == 127 or "not found" in said or "No such file" in said:
            hint = f"Check that {launched.python} exists there: {launched.command_text('--version')}"
        elif launched.through_shell and returncode == 255:
            hint = f"Check that `{shlex.join(launched.launch)} true` works from this machine without a prompt (keys, ssh config)."
        else:
            hint = f"Check that `{launched.command_text('--version')}` works from this machine."
        return EnvError(
            self.env_label,
            launched.python,
            f"The kernel of env {self.env_label!r} did not start through `{shlex.join(launched.launch)}` ({died.how}). "
            f"The launcher said:\n{said}" + self._printed_at_start(),
            hint,
        )

    def _printed_at_start(self) -> str:
        """For a start error: what the env wrote on stdout before the hello, quoted."""
        text = self._startup_output.strip()
        return f"\nBefore it was ready it printed on stdout:\n{text}" if text else ""

    def _make_pip_shims(self) -> None:
        """Write `pip` and `pip3` scripts that run pip for this kernel's interpreter (through
        the bootstrap: the env's pip, else uv, else pip after ensurepip) into a private folder."""
        try:
            folder = tempfile.mkdtemp(prefix="ipython-mcp-pip-")  # 0700, a fresh name
        except OSError as exc:
            log.warning("no pip scripts for the kernel of env %r: %s", self.env_label, exc)
            return
        script = f'#!/bin/sh\nexec {shlex.quote(str(self.python))} {shlex.quote(os.path.abspath(BOOTSTRAP))} --pip "$@"\n'
        try:
            for name in ("pip", "pip3"):
                path = os.path.join(folder, name)
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700), "w") as shim:
                    shim.write(script)
        except OSError as exc:  # a full disk: the kernel runs without them
            log.warning("no pip scripts for the kernel of env %r: %s", self.env_label, exc)
            shutil.rmtree(folder, ignore_errors=True)
            return
        self._pip_shims = folder

    def _remove_pip_shims(self) -> None:
        folder, self._pip_shims = self._pip_shims, None
        if folder:
            shutil.rmtree(folder, ignore_errors=True)

    async def _read_protocol(self) -> None:
        assert self.proc.stdout
        lines = LineReader(self.proc.stdout, WIRE_LINE_LIMIT)
        try:
            while True:
                line = await lines.receive_line()
                if line is None:
                    log.error("kernel %s sent a line over %d bytes; dropped", self.pid, WIRE_LINE_LIMIT)
                    continue
                if not line:
                    return
                try:
                    message = json.loads(line)
                except ValueError:
                    message = None
                if not isinstance(message, dict):
                    message = None
                if not self.hello and (message is None or message.get("kind") != "hello"):
                    # The env printed something at start (the bootstrap puts its hello on a
                    # line of its own): keep it for a start error, then wait for the hello.
                    if line.strip():
                        text = line.decode("utf-8", "replace")
                        self._startup_output = (self._startup_output + text)[-KERNEL_LOG_TAIL_CHARS:]
                        log.info("kernel %s printed at start: %.200r", self.pid, text)
                    continue
                if message is None:  # a line cut short by a kill is expected; anything else is not
                    (log.debug if self.stop_reason else log.warning)("kernel %s sent a line that is not JSON: %.200r", self.pid, line)
                    continue
                if message.get("kind") == "hello":
                    self.hello = message
                self._dispatch(message)
        finally:
            self._reader_done.set()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("kind") == "hello":
            self._said_hello.set(message)
            return
        if message.get("kind") == "done" and "result_file_text" in message:
            self._save_inline_spill(message)
        current = self.current
        if current is None:
            # Output of a background thread or process between cells belongs to no call.
            log.debug("kernel %s: %s between cells dropped", self.pid, message.get("kind"))
            return
        if message.get("kind") == "done" and message.get("id") != current.request_id:
            return
        try:
            current.on_message(message)
        except Exception:  # never let one message stop the reader: the call would hang
            log.exception("kernel %s: could not handle a %s message", self.pid, message.get("kind"))

    def _save_inline_spill(self, message: dict[str, Any]) -> None:
        """A launched kernel sends a cut result's full text in its reply: save it where the
        local kernel would have (the path it was told, which its note names)."""
        text = message.pop("result_file_text")
        path = self._inline_spills.pop(message.get("id"), None)  # type: ignore[arg-type]
        if not isinstance(text, str) or path is None:
            return
        data = text.encode("utf-8", "replace")
        try:
            fd = create_private_file(path)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            message["notes"] = [*(message.get("notes") or []), f"The full text could not be saved in {path} ({exc.strerror or exc})."]
            return
        message["result_file"] = {"path": path, "bytes": len(data)}

    async def _read_log(self) -> None:
        assert self.proc.stderr
        try:
            async for chunk in self.proc.stderr:
                text = chunk.decode("utf-8", "replace")
                self._log_tail = (self._log_tail + text)[-KERNEL_LOG_TAIL_CHARS:]
                for line in text.splitlines():
                    log.info("kernel %s: %s", self.pid, line)
        finally:
            self._log_done.set()

    async def _watch_exit(self) -> None:
        returncode = await self.proc.wait()
        # A forked grandchild may hold the pipes open: read what is there, briefly
        # (its last words on stderr say why it ended, when it knows).
        with anyio.move_on_after(DEATH_DRAIN_S):
            await self._reader_done.wait()
            await self._log_done.wait()
        self.kill_now()  # whatever the kernel left behind goes with it
        self._collect_leftover_output()
        self.ended = self._describe_end(returncode)
        self._mark_exited(KernelDied(self.ended, self._log_tail.strip(), self.stop_reason))
        log.info("kernel %s (%s) ended: %s", self.pid, self.env_label, self.ended)

    def _describe_end(self, returncode: int | None) -> str:
        launched = self.launched
        if launched is None or returncode is None:
            return describe_exit(returncode)
        if launched.through_shell and (returncode == 255 or returncode < 0):
            return f"the connection to {launched.where} was lost: ssh ended with {describe_exit(returncode)}"
        return f"the kernel behind `{shlex.join(launched.launch)}` ended; the launcher exited with {describe_exit(returncode)}"

    def _mark_exited(self, died: KernelDied) -> None:
        """The one place a kernel becomes dead: the start and the running cell hear why."""
        if self.exited.is_set():
            return
        for fd in self._output_read_ends.values():
            os.close(fd)
        self._output_read_ends = {}
        self._said_hello.fail(died)
        if self.current is not None:
            self.current.fail(died)
        self.exited.set()

    def _collect_leftover_output(self) -> None:
        """Output the dead kernel's relay never forwarded is still in the pipes: take it."""
        read_ends, self._output_read_ends = self._output_read_ends, {}
        for name, fd in read_ends.items():
            chunks = []
            try:
                with contextlib.suppress(OSError):  # BlockingIOError: empty
                    while len(chunks) < LEFTOVER_MAX_CHUNKS and (chunk := os.read(fd, 65536)):
                        chunks.append(chunk)
                if chunks and self.current is not None:
                    text = b"".join(chunks).decode("utf-8", "replace")
                    self.current.on_message({"kind": "stream", "name": name, "text": text})
            except Exception:
                log.exception("kernel %s: could not keep its last output", self.pid)
            finally:
                os.close(fd)

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin
        # Closed by kill(), or the kernel is gone: the exit watcher reports the end.
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await self.proc.stdin.send((json.dumps(message) + "\n").encode())

    async def start_execution(
        self, code: str, output_limit: int, spill_path: SpillTarget,
        image_limit: int = DEFAULT_IMAGE_LIMIT, image_bytes_limit: int = DEFAULT_IMAGE_BYTES_LIMIT,
    ) -> Execution:
        request_id = next(self._ids)
        execution = Execution(request_id, max(output_limit // 2, 2), spill_path, image_limit, image_bytes_limit)
        if not self.alive:
            execution.fail(KernelDied("it had already exited"))
            return execution
        self.current = execution
        spill = spill_path.for_kernel()  # where the kernel saves a cut result, and how much of it
        if self.launched is not None and spill["spill_path"]:
            # The far side cannot write our folder: the text comes back in the reply, and we save it there.
            spill["spill_inline"] = True
            self._inline_spills = {request_id: spill["spill_path"]}
        await self._send(
            {
                "kind": "execute",
                "id": request_id,
                "code": code,
                "max_result_chars": output_limit,
                "image_budget": [IMAGE_MAX_BYTES, IMAGE_MAX_SIDE_PX],
                **spill,
            }
        )
        return execution

    def finish_execution(self, execution: Execution) -> None:
        execution.stdout.close()
        execution.stderr.close()
        execution.displays.close()
        if self.current is execution:
            self.current = None

    def interrupt(self) -> None:
        """SIGINT to the kernel's process group (a `!sleep` child stops too), then the
        ``interrupt`` message for the same cell.

        The message follows the cell's ``execute`` on the ordered pipe, so it also stops
        a cell whose SIGINT arrived before it started; alone, it is how a launched kernel
        (ssh, exec: no signal crosses) is interrupted: the far side signals its own group.
        """
        if not self.alive or self.current is None:
            return
        signalled = self.proc.signal_group(signal.SIGINT)
        message = {"kind": "interrupt", "id": self.current.request_id, "group_signalled": signalled}
        self.jobs.start(self._send, message, name=f"kernel-{self.pid}-interrupt")

    def kill_now(self, stop: StopReason | None = None) -> None:
        """SIGKILL the kernel's process group (for a launched kernel: the launcher's, which
        ends the connection, and the far side ends its own group at end of input), and
        descendants that left it (setsid). Synchronous, so signal handlers and exit paths
        can use it; ``kill`` also reaps.
        """
        if self.stop_reason is None and stop is not None:
            self.stop_reason = stop
        self.proc.kill_now(running=self.alive)
        self._remove_pip_shims()

    async def kill(self, stop: StopReason) -> None:
        """Kill the kernel and its process group, and wait until it is reaped.

        A launched kernel first has its input closed: the far side sees end of file and
        ends its own process group, which no signal from here could reach.
        """
        if self.stop_reason is None:
            self.stop_reason = StopReason(stop)
        if self.process is None:
            return
        if self.launched is not None and self.alive:
            self.proc.close_input()
            with anyio.CancelScope(shield=True), anyio.move_on_after(LAUNCHER_CLOSE_GRACE_S):
                await self.exited.wait()
        self.kill_now()
        with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_REAP_TIMEOUT_S):
            await self.exited.wait()
        for job in self._jobs:
            job.cancel()
        if not self.exited.is_set():  # not reaped in time (a stuck D-state process): do the exit watcher's part
            log.error("kernel %s did not exit within %s s of SIGKILL", self.pid, KILL_REAP_TIMEOUT_S)
            self._mark_exited(KernelDied("signal SIGKILL (not yet reaped)", stop=self.stop_reason))
        self.proc.close_input()


GUARD_SOURCE = """
import os, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the server is not for us
groups, pending = set(), b""
while True:
    try:
        data = os.read(0, 65536)
    except InterruptedError:
        continue
    if not data:
        break
    pending += data
    *lines, pending = pending.split(b"\\n")
    for line in lines:
        (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


class OrphanGuard:
    """A small process that ends every kernel's process group once this server is gone.

    PR_SET_PDEATHSIG kills a kernel when the server dies, but only the kernel: what its
    cells started (``!sleep 100 &``, a Popen) would live on, and a kernel whose cell holds
    the GIL cannot run its own clean-up. This process, in its own session, holds the list
    of kernel process groups (``+pid`` / ``-pid`` lines on its stdin); when its stdin
    reaches end of file, which happens however the server ends (SIGKILL included, on any
    system), it kills every group still listed and exits. One per manager, started with
    the server (so its start-up does not compete with a first kernel's), or else with the
    first kernel.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._broken = False

    def start(self) -> None:
        if self._process is not None or self._broken:
            return
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-S", "-I", "-c", GUARD_SOURCE], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as exc:
            log.warning("the orphan guard could not start: %s", exc)
            self._broken = True

    def _send(self, line: str) -> None:
        self.start()
        if self._broken or self._process is None or self._process.stdin is None:
            return
        try:
            os.write(self._process.stdin.fileno(), line.encode())
        except (OSError, ValueError) as exc:  # killed, or closed: PDEATHSIG still covers the kernels
            log.warning("the orphan guard is not available: %s", exc)
            self._broken = True

    def watch(self, pid: int) -> None:
        self._send(f"+{pid}\n")

    def forget(self, pid: int) -> None:
        if self._process is not None and self._process.stdin is not None and not self._process.stdin.closed:
            self._send(f"-{pid}\n")

    def close_now(self) -> None:
        """End the guard (it kills any group still listed) without waiting for it."""
        if self._process is not None and self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()

    async def close(self) -> None:
        self.close_now()
        if self._process is None:
            return
        with anyio.move_on_after(KILL_REAP_TIMEOUT_S):
            while self._process.poll() is None:
                await anyio.sleep(0.01)


# --- Envs: installing the prerequisite, and finding what is there ----------------------


class Helpers:
    """The server's helper processes (the ipykernel installer, env probes), run like ``subprocess.run``.

    Each runs in its own process group. When its caller is done with it (finished, timed
    out, cancelled), a helper still running is killed with its group and reaped within
    ``KILL_REAP_TIMEOUT_S``, in one place; ``kill_all`` ends every one when the server stops.
    """

    def __init__(self) -> None:
        self.pids: set[int] = set()

    @asynccontextmanager
    async def run(self, argv: Sequence[str], cwd: Path | None = None, merge_stderr: bool = False) -> AsyncIterator[anyio.abc.Process]:
        """The started process (stdin closed, stdout piped, stderr piped or into stdout). OSError: it could not start."""
        process = await anyio.open_process(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, start_new_session=True,
        )
        self.pids.add(process.pid)
        try:
            yield process
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_REAP_TIMEOUT_S):
                    await process.wait()
            self.pids.discard(process.pid)

    def kill_all(self) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    @staticmethod
    async def communicate(process: anyio.abc.Process) -> tuple[bytes, bytes]:
        """Its stdout and stderr to their ends, read together (either could fill its pipe), then its exit."""
        out: list[bytes] = []
        err: list[bytes] = []

        async def drain(stream: anyio.abc.ByteReceiveStream | None, into: list[bytes]) -> None:
            if stream is not None:
                async for chunk in stream:
                    into.append(chunk)

        async with anyio.create_task_group() as group:
            group.start_soon(drain, process.stdout, out)
            group.start_soon(drain, process.stderr, err)
        await process.wait()
        return b"".join(out), b"".join(err)


async def install_ipykernel(error: EnvError, progress: Progress | None, helpers: Helpers, envs_dir: Path | None = None) -> None:
    """Run the env's install command, streaming its lines as progress. Raises EnvError on failure."""
    python = Path(error.python or "")
    plan = error.plan or install_plan(python, error.has_pip, envs_dir)
    if plan.argv is None:
        raise EnvError(error.env, error.python, error.reason + " Automatic install is not possible.", f"Install with: {plan.text}", kind="missing_ipython")
    log.warning("installing ipykernel into env %r: %s", error.env, " ".join(plan.argv))
    started = time.monotonic()
    tail = ""
    returncode: int | None = None
    try:
        async with helpers.run(plan.argv, cwd=plan.cwd, merge_stderr=True) as process:
            assert process.stdout is not None
            lines = LineReader(process.stdout, INSTALL_LINE_LIMIT_BYTES)
            with anyio.move_on_after(INSTALL_TIMEOUT_S):  # returncode stays None
                last_sent = 0.0
                while (line := await lines.receive_line()) != b"":
                    text = clip((line or b"[a line too long to keep]").decode("utf-8", "replace").rstrip(), INSTALL_LOG_TAIL_CHARS)
                    tail = (tail + text + "\n")[-INSTALL_LOG_TAIL_CHARS:]
                    now = time.monotonic()
                    if progress and text and now - last_sent >= PROGRESS_INTERVAL_S:
                        last_sent = now
                        with contextlib.suppress(Exception):
                            await progress(now - started, f"installing ipykernel: {text[:200]}")
                returncode = await process.wait()
    except OSError as exc:
        raise EnvError(
            error.env, error.python, f"Could not run `{plan.text}` to install ipykernel into env {error.env!r}: {exc}.",
            kind="missing_ipython",
        ) from exc
    if returncode != 0:
        how = f"did not finish within {INSTALL_TIMEOUT_S:.0f} s" if returncode is None else f"failed ({describe_exit(returncode)})"
        raise EnvError(
            error.env,
            error.python,
            f"Installing ipykernel into env {error.env!r} (python: {python}) with `{plan.text}` {how}. Its output ended with:\n{tail.strip()}",
            kind="missing_ipython",
        )


ENV_PROBE = (
    "import json, sys\n"
    "try:\n    from importlib.metadata import version; v = version('ipython')\n"
    "except Exception:\n    v = None\n"
    "print(json.dumps({'python_version': '%d.%d.%d' % sys.version_info[:3], 'ipython': v}))"
)


class EnvInfo(BaseModel):
    name: str = Field(description="What to pass as `env` ('default' means: omit env).")
    python: str
    python_version: str | None
    ipython_version: str | None
    usable: bool = Field(description="True when a session can start there now.")
    problem: str | None = Field(description="Why not, and the command that fixes it.")


class EnvList(BaseModel):
    envs_dir: str
    envs: list[EnvInfo]


class EnvCatalog:
    """Probes interpreters (in parallel, cached) for list_envs."""

    def __init__(self, helpers: Helpers) -> None:
        self._cache: dict[Path, tuple[float, dict[str, Any]]] = {}
        self._helpers = helpers  # runs the probes, killed if the server stops mid-probe

    async def probe(self, python: Path | LaunchedPython) -> dict[str, Any]:
        """Python and IPython versions of an interpreter (for a launched one: through its launcher, bounded alike)."""
        cached = self._cache.get(python)
        if cached and time.monotonic() - cached[0] < ENV_PROBE_CACHE_S:
            return cached[1]
        answer: dict[str, Any] = {"python_version": None, "ipython": None, "error": None}
        argv = python.argv("-c", ENV_PROBE) if isinstance(python, LaunchedPython) else [str(python), "-c", ENV_PROBE]
        if isinstance(python, LaunchedPython) and shutil.which(python.program) is None:
            answer["error"] = launcher_missing_error("", python, None).reason
            return answer
        err = b""
        try:
            async with self._helpers.run(argv) as process:
                with anyio.fail_after(ENV_PROBE_TIMEOUT_S):
                    out, err = await self._helpers.communicate(process)
                answer.update(json.loads(out.decode().strip().splitlines()[-1]))
        except OSError as exc:
            answer["error"] = f"cannot run {python}: {exc}"
            return answer
        except TimeoutError:
            answer["error"] = f"{python} did not answer within {ENV_PROBE_TIMEOUT_S:.0f} s"
        except (ValueError, IndexError):
            answer["error"] = f"{python} could not run a probe: {err.decode('utf-8', 'replace').strip()[-300:]}"
        self._cache[python] = (time.monotonic(), answer)
        return answer

    async def list(self, envs_dir: Path, launched: Mapping[str, LaunchedPython] | None = None) -> EnvList:
        candidates: list[tuple[str, Path | LaunchedPython]] = [("default", Path(sys.executable))]
        candidates += sorted((launched or {}).items())
        if envs_dir.is_dir():
            for folder in sorted(envs_dir.iterdir()):
                python = python_in(folder) if folder.is_dir() else None
                if python is not None:
                    candidates.append((folder.name, python))
        answers: list[dict[str, Any]] = [{} for _ in candidates]

        async def probe_one(i: int, python: Path | LaunchedPython) -> None:
            answers[i] = await self.probe(python)

        async with anyio.create_task_group() as group:
            for i, (_, python) in enumerate(candidates):
                group.start_soon(probe_one, i, python)
        envs = []
        for (name, python), answer in zip(candidates, answers, strict=True):
            problem = answer.get("error")
            if problem is None and not answer.get("ipython"):
                problem = "IPython is not installed. " + (
                    f"Install with: {python.command_text('-m', 'pip', 'install', 'ipykernel')}"
                    if isinstance(python, LaunchedPython) else install_hint(python, envs_dir=envs_dir)
                )
            envs.append(
                EnvInfo(
                    name=name, python=str(python), python_version=answer.get("python_version"),
                    ipython_version=answer.get("ipython"), usable=problem is None, problem=problem,
                )
            )
        return EnvList(envs_dir=str(envs_dir), envs=envs)


# --- Sessions: names -> kernels, locks, lifecycle --------------------------------------


@dataclasses.dataclass
class Config:
    envs_dir: Path = dataclasses.field(default_factory=envs_dir_default)
    output_dir: Path = dataclasses.field(default_factory=lambda: Path(tempfile.gettempdir()) / f"ipython-mcp-{os.getuid()}")
    output_limit: int = DEFAULT_OUTPUT_LIMIT_CHARS
    # Images sent inline per call (count, total bytes); later ones are saved to files only.
    image_limit: int = DEFAULT_IMAGE_LIMIT
    image_bytes_limit: int = DEFAULT_IMAGE_BYTES_LIMIT
    # Bytes one saved file may hold, and all files of one server (see OutputFiles).
    spill_file_limit: int = dataclasses.field(
        default_factory=lambda: byte_limit_default("IPYTHON_MCP_SPILL_FILE_LIMIT", DEFAULT_SPILL_FILE_LIMIT_BYTES)
    )
    output_dir_limit: int = dataclasses.field(
        default_factory=lambda: byte_limit_default("IPYTHON_MCP_OUTPUT_DIR_LIMIT", DEFAULT_OUTPUT_DIR_LIMIT_BYTES)
    )
    default_timeout_s: float = dataclasses.field(default_factory=default_timeout_s)
    auto_install: bool = dataclasses.field(default_factory=lambda: os.environ.get("IPYTHON_MCP_AUTO_INSTALL", "") in ("1", "true", "yes"))
    # Kernels of the default env started ahead of need, so a new session starts at once. None: 1
    # without a fork server, 0 with one, which replaces it (a fork takes tens of milliseconds, and
    # a fork server costs the memory of a spare kernel, not more).
    spare_kernels: int = dataclasses.field(default_factory=lambda: spare_kernels_default(os.environ))  # type: ignore[assignment]
    # Local kernels forked from a fork server per interpreter (IPython imported once) rather than spawned.
    fork_server: bool = dataclasses.field(default_factory=lambda: fork_server_default(os.environ))
    # Sessions alive at once; a new one past this is a tool error naming the live ones.
    max_sessions: int = dataclasses.field(default_factory=lambda: max_sessions_default(os.environ))
    # Seconds a session may sit idle before its kernel is stopped (its state lost); None: never.
    idle_timeout_s: float | None = dataclasses.field(default_factory=lambda: idle_timeout_default(os.environ))
    # After an interrupt, how long a cell may take to stop before its kernel is killed.
    interrupt_grace_s: float = INTERRUPT_GRACE_S
    # How long a call that begins a kernel start waits for it at least (a call joining one waits its own timeout_s).
    start_grace_s: float = KERNEL_START_GRACE_S
    # Envs behind launchers (ssh, docker exec, bwrap...), from the config file.
    launchers: LaunchConfig = dataclasses.field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        # Absolute once, here: replies never hold relative paths, and the kernel (whose
        # working directory the user changes) writes where the server means.
        self.output_dir = Path(os.path.abspath(Path(self.output_dir).expanduser()))
        if self.spare_kernels is None:
            self.spare_kernels = 0 if self.fork_server else 1


@dataclasses.dataclass
class Session:
    name: str
    env_label: str
    python: Path | LaunchedPython
    kernel: Kernel | None = None
    created: float = dataclasses.field(default_factory=time.monotonic)
    exec_count: int = 0
    run_lock: anyio.Lock = dataclasses.field(default_factory=anyio.Lock)  # one cell at a time
    # The kernel start under way, if any: it runs on its own, outliving the call that began it,
    # so no call waits past its deadline for a kernel (see SessionManager._ensure_kernel).
    starting: Job | None = None
    start_began: float = 0.0
    start_failure: Exception | None = None  # a restart that failed, for the next call to report
    start_progress: Progress | None = None  # the call now waiting for the start hears the installer
    calls: int = 0  # execute/wait calls in flight
    last_active: float = dataclasses.field(default_factory=time.monotonic)  # end of the last call
    lost_state: str | None = None  # why the next call runs in a fresh kernel
    closed: Exception | None = None  # shut down, or never created: what waiting calls are told
    notices: list[str] = dataclasses.field(default_factory=list)  # for the next call's warning
    # The cell left running by on_timeout="continue", followed by `wait` (its one name: "left running").
    left_running: Execution | None = None
    cancelled: CellOutcome | None = None  # the end of a cell whose call the client cancelled, for the record
    wait_lock: anyio.Lock = dataclasses.field(default_factory=anyio.Lock)  # one `wait` at a time

    def check_open(self) -> None:
        if self.closed is not None:
            raise self.closed

    @property
    def left_running_runs(self) -> bool:
        """A cell left running is still running (so the session can take no other cell)."""
        return self.left_running is not None and not self.left_running.reply.done()

    @property
    def status(self) -> SessionStatus:
        if self.kernel is None or self.starting is not None:
            return "starting"
        if not self.kernel.alive:
            return "stopped" if self.kernel.stop_reason is StopReason.IDLE else "dead"
        return "busy" if self.kernel.busy else "idle"


CellStatus = Literal["ok", "error", "timeout", "env_error", "running", "busy"]
# Statuses of an execute/wait result that are also MCP tool errors (isError: true).
FAILED_STATUSES: frozenset[CellStatus] = frozenset({"error", "timeout", "env_error", "busy"})


class ExecuteImage(BaseModel):
    index: int = Field(description="Position among the images of this call (0-based).")
    mime_type: str
    bytes: int = Field(description="Size of the decoded image.")
    path: str | None = Field(description="File holding the image, for clients that cannot show images.")


class ExecuteResult(BaseModel):
    """What one ``execute`` call returns (also as a readable text block)."""

    status: CellStatus = Field(
        description="ok: ran cleanly. error: the cell raised, was interrupted, or its kernel died "
        "(see `error`). timeout: ran past timeout_s and was interrupted; partial output kept, "
        "session alive. env_error: the env cannot run a kernel (see `error` for the fix). "
        "running: on_timeout='continue' and the cell still runs; call `wait` for more output and "
        "its final result. busy: nothing was executed, because a cell left running earlier still runs, "
        "other calls kept the session busy for all of timeout_s, or its kernel is still starting (call again)."
    )
    session: str
    stdout: str = Field("", description="Everything written to stdout (fd 1), including child processes.")
    stderr: str = Field("", description="Everything written to stderr (fd 2), including child processes.")
    result: str | None = Field(
        None,
        description="Text form of the cell's last expression, as display() would give it (markdown, a meaningful repr, HTML, LaTeX, JSON), or null."
    )
    error: str | None = Field(None, description="Plain-text traceback ending in 'ExceptionName: message', or the env problem.")
    execution_count: int | None = Field(None, description="IPython's prompt number of this cell (In [n]).")
    warning: str | None = Field(None, description="Something the agent should know: env ignored, state lost, output cut, ...")
    duration_s: float = Field(description="Seconds this call took (waiting for the session and starting its kernel included).")
    display: list[str] = Field(default_factory=list, description="Text form of each display() output, in order.")
    images: list[ExecuteImage] = Field(default_factory=list, description="Images shown by the cell, sent as image content.")
    output_files: dict[str, str] = Field(default_factory=dict, description="Stream name -> file with its full text, when cut.")


@dataclasses.dataclass
class CellOutcome:
    """An ExecuteResult plus what only the MCP content needs."""

    result: ExecuteResult
    images: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (mime, base64), inline
    transcript: str = ""  # stdout and display text in the order the cell produced them


@dataclasses.dataclass
class CellCall:
    """One execute or wait call: its session, its clock, and what it says besides the cell's output.

    ``timeout_s`` bounds the whole call, waiting for the session and its kernel included:
    ``deadline`` is when it ends, ``remaining()`` what is left of it. Every reply of the
    call (ok, error, timeout, running, busy, env_error) is built by ``result``.
    """

    session: str
    timeout_s: float
    on_timeout: OnTimeout = "interrupt"
    progress: Progress | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)  # joined into the reply's `warning`
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        return self.started + self.timeout_s

    def remaining(self, at_least: float = 0.0) -> float:
        return max(self.deadline - time.monotonic(), at_least)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def result(self, status: CellStatus, **fields: Any) -> ExecuteResult:
        fields.setdefault("warning", " ".join(self.warnings) or None)
        fields.setdefault("duration_s", round(self.elapsed(), 3))
        return ExecuteResult(status=status, session=self.session, **fields)


class SessionInfo(BaseModel):
    name: str
    env: str = Field(description="The env as given ('default' for the server's own Python).")
    python: str
    python_version: str | None
    ipython_version: str | None
    status: SessionStatus = Field(
        description="stopped: its kernel was stopped after idle_timeout_s; the next execute starts a fresh one."
    )
    pid: int | None
    uptime_s: float
    exec_count: int = Field(description="Cells executed in this session, across kernel restarts.")
    busy_s: float | None = Field(description="How long the running cell has run, when busy.")


class SessionAction(BaseModel):
    """What reset, shutdown and interrupt did."""

    session: str
    outcome: ActionOutcome = Field(
        description="interrupted: a running cell was interrupted; idle: nothing was running; no_kernel: the session's kernel is dead or starting."
    )
    message: str
    pid: int | None = Field(None, description="The session's kernel process, when it has one.")


class SessionList(BaseModel):
    sessions: list[SessionInfo]
    spare_kernels: int = Field(0, description="Default-env kernels started ahead, ready for the next new session.")


class SessionManager:
    """Owns every session and kernel; created and closed by the server lifespan."""

    def __init__(self, config: Config, jobs: Jobs):
        self.config, self.jobs = config, jobs  # every background task runs in ``jobs``, the lifespan's task group
        self.sessions: dict[str, Session] = {}
        self.helpers = Helpers()  # the installer and env probes
        self.envs = EnvCatalog(self.helpers)
        self.guard = OrphanGuard()  # kills every kernel's group if this server dies without cleaning up
        self._closing = False
        self._spares: list[Kernel] = []
        self._refill: Job | None = None
        self._forks: dict[Path, ForkServer] = {}  # local interpreter -> its fork server
        self._fork_starts: dict[Path, Job] = {}
        self._retired_forks: list[ForkServer] = []  # replaced, ending when their last kernel does
        self._starting: set[Kernel] = set()  # spawned but not ready yet: every shutdown path kills these too
        self._start_tasks: set[Job] = set()
        # A new session whose start failed after every call waiting for it had returned: the next call gets the error.
        self._failed_first_starts: dict[str, Session] = {}
        self._idle_watch: Job | None = None
        self.files = OutputFiles(config.output_dir, config.spill_file_limit, config.output_dir_limit)
        self.records = SessionRecords(self.files)  # what ran, for history and export (fed by the MCP tools)

    # -- lifecycle: one place ensures a kernel, and no call waits for one past its deadline
    #
    # A session's kernel is started by a task of its own (``_begin_start``) that calls wait
    # for, each until its own deadline (``_ensure_kernel``): a call whose deadline comes
    # first answers ``busy`` (still starting) while the start goes on, so the next call finds
    # the kernel. A call starts a kernel only when it needs one (first use, after a death or
    # an idle stop) or asked for one (``reset``); a kernel this server killed because a cell
    # ignored its interrupt is restarted in the background, after that call's reply.

    def _open(self, name: str, env: str | None, warnings: list[str]) -> Session:
        """The session called ``name``, created (its kernel not yet started) if new; ``warnings`` hears of an env ignored."""
        session = self.sessions.get(name)
        if session is None:
            if self._closing:
                raise ToolError("The server is shutting down; no new session can start.")
            label, python = interpreter_for(env, self.config.envs_dir, self.config.launchers)  # EnvError: nothing created
            failed = self._failed_first_starts.pop(name, None)
            if failed is not None and failed.python == python and isinstance(failed.closed, EnvError):
                raise failed.closed
            if len(self.sessions) >= self.config.max_sessions:
                raise ToolError(
                    f"Session {name!r} was not created: {len(self.sessions)} sessions are live, the most this server allows "
                    f"(--max-sessions, IPYTHON_MCP_MAX_SESSIONS). Live sessions: {', '.join(sorted(self.sessions))}. "
                    "Call shutdown(session=...) on one you no longer need, or use one of them."
                )
            session = self.sessions[name] = Session(name, label, python)
            return session
        if env is not None and env.strip() and env != session.env_label and not self._same_interpreter(env, session):
            warnings.append(
                f"Session {name!r} already runs in env {session.env_label!r} ({session.python}); "
                f"env {env!r} was ignored. Use a new session name, or shutdown this one first, to change env."
            )
        return session

    def _same_interpreter(self, env: str, session: Session) -> bool:
        try:
            return interpreter_for(env, self.config.envs_dir, self.config.launchers)[1] == session.python
        except EnvError:
            return False

    async def _ensure_kernel(self, session: Session, deadline: float, progress: Progress | None = None) -> Kernel:
        """The session's live kernel; if it has none, its start (begun now, or joined) until ``deadline``.

        A call that begins the start waits at least ``start_grace_s``, so a short timeout_s still
        gets a kernel on a session's first call. Raises KernelStarting at the deadline (the start
        goes on), or what the start raised: EnvError, or the ToolError of a session shut down meanwhile.
        """
        session.check_open()
        kernel = session.kernel
        if kernel is not None and kernel.alive and kernel.stop_reason is None:
            return kernel
        if kernel is not None and kernel.stop_reason is None and session.lost_state is None:  # it died on its own
            how = kernel.ended or "it exited"
            session.lost_state = (
                f"The previous kernel of session {session.name!r} died ({how}); this call ran in a fresh kernel, "
                "so variables and imports from before are gone."
            )
        task = session.starting
        if task is None or task.done():
            task = self._begin_start(session)
            deadline = max(deadline, time.monotonic() + self.config.start_grace_s)
        session.start_progress = progress
        try:
            await task.wait(max(deadline - time.monotonic(), 0))
        finally:
            if session.start_progress is progress:
                session.start_progress = None
        if not task.done():
            raise KernelStarting(session.name, session.env_label, session.python, session.start_began)
        if session.closed is not None:  # shut down meanwhile, or its first start failed
            if self._failed_first_starts.get(session.name) is session:
                del self._failed_first_starts[session.name]  # told now, not again
            raise session.closed
        failure, session.start_failure = session.start_failure, None
        if failure is not None:
            raise failure
        if session.kernel is None:  # a start ends with a kernel, a failure or a closed session; this is a bug
            raise ToolError(f"Session {session.name!r} has no kernel after its start; call execute again.")
        return session.kernel

    def _begin_start(self, session: Session) -> Job:
        def finished(job: Job) -> None:  # also when cancelled before it ever ran
            self._start_tasks.discard(job)
            if session.starting is job:
                session.starting = None

        job = self.jobs.start(self._start_for, session, name=f"start-{session.name}", on_done=finished)
        session.starting, session.start_began, session.start_failure = job, time.monotonic(), None
        self._start_tasks.add(job)
        return job

    async def _start_for(self, session: Session) -> None:
        """Body of a session's start task: the session gets a fresh kernel, or the failure is kept for the calls."""
        first = session.kernel is None
        try:
            kernel = await self._start_kernel(session)
        except BaseException as exc:
            failure = exc if isinstance(exc, (EnvError, ToolError)) else ToolError(
                f"The kernel of session {session.name!r} could not start: {type(exc).__name__}: {exc}"
            )
            if first:  # the session never came to be: every call waiting for it gets this answer
                if session.closed is None:
                    session.closed = failure
                if self.sessions.get(session.name) is session:
                    del self.sessions[session.name]
                    if isinstance(failure, EnvError):
                        self._failed_first_starts[session.name] = session
                        while len(self._failed_first_starts) > self.config.max_sessions:
                            del self._failed_first_starts[next(iter(self._failed_first_starts))]
            else:
                session.start_failure = failure
            if not isinstance(exc, Exception):
                raise  # cancelled: a shutdown, or the server stopping
            return
        if self._closing and session.closed is None:
            session.closed = ToolError("The server is shutting down.")
        if session.closed is not None:  # shut down while the kernel started
            await kernel.kill(StopReason.SHUTDOWN)
            return
        session.kernel = kernel

    async def _start_kernel(self, session: Session) -> Kernel:
        """A ready kernel in the session's env, installing ipykernel first if allowed and needed."""
        spare = self._take_spare(session.python)
        if spare is not None:
            return spare
        try:
            return await self._spawn(session.python, session.env_label)
        except EnvError as missing:
            # Never install into the server's own env, and never unless asked to.
            if missing.kind != "missing_ipython" or not self.config.auto_install or session.python == Path(sys.executable):
                raise

            async def progress(elapsed: float, message: str) -> None:  # heard by whichever call waits now
                if session.start_progress is not None:
                    await session.start_progress(elapsed, message)

            await install_ipykernel(missing, progress, self.helpers, self.config.envs_dir)
        kernel = await self._spawn(session.python, session.env_label)
        session.notices.append(
            f"ipykernel was installed into env {session.env_label!r} ({session.python}) because auto_install_ipykernel is on."
        )
        return kernel

    async def _spawn(self, python: Path, env_label: str) -> Kernel:
        """A started kernel; while it starts, every shutdown path finds it in ``_starting``."""
        forks = await self._fork_server(python) if isinstance(python, Path) else None
        kernel = Kernel(python, env_label, self.jobs, self.guard, self.config.envs_dir, forks)
        self._starting.add(kernel)
        try:
            await kernel.start()
        finally:
            self._starting.discard(kernel)
        return kernel

    # -- fork servers: one per local interpreter, started with its first kernel, kept for the next

    async def _fork_server(self, python: Path) -> ForkServer | None:
        """This interpreter's ready fork server (started now, or joined); None: spawn instead.

        One that could not start (no IPython there) is tried again after FORK_SERVER_RETRY_S;
        one that ended, or whose env's packages changed, is replaced.
        """
        if not self.config.fork_server or self._closing:
            return None
        forks = self._forks.get(python)
        if forks is not None and forks.failed is not None and python not in self._fork_starts:
            if forks.was_ready or time.monotonic() - forks.started > FORK_SERVER_RETRY_S:
                self._retired_forks = [old for old in self._retired_forks if old.alive]
                self._retired_forks.append(self._forks.pop(python))  # its kernels live on
                forks = None
        if forks is None:
            forks = self._forks[python] = ForkServer(python, self.guard, self.jobs)
            self._fork_starts[python] = self.jobs.start(
                self._start_fork_server, forks, name=f"fork-server-{python}", on_done=lambda _: self._fork_starts.pop(python, None)
            )
        starting = self._fork_starts.get(python)
        if starting is not None:
            await starting.wait()  # a cancelled caller leaves the start to the next one
        return forks if forks.usable else None

    async def _start_fork_server(self, forks: ForkServer) -> None:
        try:
            await forks.start(kernel_environment(forks.python))
        except ForkUnavailable as exc:
            log.info("no fork server for %s, kernels are spawned: %s", forks.python, exc)
        except Exception as exc:  # no socket (out of fds), say: tried again later, like a fork server without IPython
            forks.failed = forks.failed or f"could not start: {exc}"
            forks.close()
            log.warning("no fork server for %s, kernels are spawned: %s", forks.python, exc)

    def _close_fork_servers(self) -> None:
        for job in self._fork_starts.values():
            job.cancel()
        for forks in [*self._forks.values(), *self._retired_forks]:
            forks.close()

    def _restart_later(self, session: Session, lost_state: str) -> None:
        """After a kill no caller asked for: the fresh kernel starts now, and the next call (not this one) waits for it."""
        session.left_running = None
        session.lost_state = lost_state
        if not self._closing and session.closed is None and (session.starting is None or session.starting.done()):
            self._begin_start(session)

    async def reset(self, session: Session) -> Kernel | None:
        """Kill the session's kernel and start a fresh one, waited for up to the default timeout.

        Returns None when the fresh kernel is still starting by then; it goes on starting.
        """
        session.check_open()
        session.left_running = None  # a cell left running dies with its kernel
        old, reaped = session.kernel, None
        if old is not None and old.launched is None:
            old.kill_now(StopReason.RESET)  # SIGKILLed now: the fresh kernel starts while the old one is reaped
            reaped = self.jobs.start(old.kill, StopReason.RESET, name=f"reap-{old.pid}")
        elif old is not None:
            await old.kill(StopReason.RESET)  # far side: its input closes first, so it ends its own group
        session.lost_state = None  # asked for: no warning on the next call
        try:
            return await self._ensure_kernel(session, time.monotonic() + self.config.default_timeout_s)
        except KernelStarting:
            return None
        finally:
            session.last_active = time.monotonic()
            if reaped is not None:
                with anyio.CancelScope(shield=True):
                    await reaped.wait()

    def interrupt(self, name: str) -> tuple[str, ActionOutcome, str, int | None]:
        """SIGINT to the session's running cell, if any: (session, outcome, message, kernel pid)."""
        session = self.get(name)
        kernel = session.kernel
        if kernel is None or not kernel.alive:
            return name, "no_kernel", f"Session {name!r} has no running kernel ({session.status}); nothing to interrupt.", None
        if not kernel.busy:
            return name, "idle", f"Session {name!r} was idle; nothing to interrupt.", kernel.pid
        kernel.interrupt()
        message = f"Sent an interrupt to session {name!r}; the running cell stops with KeyboardInterrupt."
        return name, "interrupted", message, kernel.pid

    async def shutdown(self, name: str) -> Session:
        session = self.get(name)
        del self.sessions[name]
        session.closed = ToolError(f"Session {name!r} was shut down while this call waited for it.")
        starting = session.starting
        if starting is not None:
            starting.cancel()  # its kernel, if spawned, is killed and reaped by Kernel.start
        if session.kernel is not None:
            await session.kernel.kill(StopReason.SHUTDOWN)
        if starting is not None:
            with anyio.CancelScope(shield=True):
                await starting.wait(KILL_REAP_TIMEOUT_S)
        self.files.remove_session(name)
        return session

    # -- idle sessions: their kernels stopped after idle_timeout_s, like a death the next call reports

    def start_idle_watch(self) -> None:
        if self.config.idle_timeout_s is not None and not self._closing:
            self._idle_watch = self.jobs.start(self._stop_idle_kernels, name="idle-kernels")

    async def _stop_idle_kernels(self) -> None:
        idle_s = self.config.idle_timeout_s
        assert idle_s is not None
        while True:
            await anyio.sleep(min(idle_s / 4, IDLE_CHECK_MAX_S))
            now = time.monotonic()
            for session in list(self.sessions.values()):
                kernel = session.kernel
                if (
                    kernel is None or not kernel.alive or kernel.stop_reason is not None or kernel.busy
                    or session.calls or session.starting is not None or session.left_running is not None
                    or now - session.last_active < idle_s
                ):
                    continue
                session.lost_state = (
                    f"Session {session.name!r} was idle for {now - session.last_active:.0f} s, so its kernel was stopped "
                    f"(idle timeout {idle_s:g} s); this call ran in a fresh kernel, so variables and imports from before are gone."
                )
                log.info("stopping the idle kernel %s of session %r", kernel.pid, session.name)
                await kernel.kill(StopReason.IDLE)  # its SIGKILL goes out before any other call can take the kernel

    # -- spare kernels: the default env's next kernel, started before anyone asks

    def start_spares(self) -> None:
        """Spare kernels of the default env, or at least its fork server, started ahead of need."""
        if self._closing:
            return
        if self.config.spare_kernels > 0 and memory_to_spare():
            self._refill = self.jobs.start(self._fill_spares, name="spare-kernels")
        elif self.config.fork_server and self._refill is None and memory_to_spare():
            self._refill = self.jobs.start(self._fork_server_ahead, name="fork-server-ahead")

    async def _fork_server_ahead(self) -> None:
        await self._fork_server(Path(sys.executable))

    @property
    def spare_count(self) -> int:
        return sum(kernel.alive for kernel in self._spares)

    def _take_spare(self, python: Path) -> Kernel | None:
        if python != Path(sys.executable):
            return None
        while self._spares:
            kernel = self._spares.pop(0)
            if kernel.alive:
                if self._refill is None or self._refill.done():
                    self.start_spares()
                return kernel
        return None

    async def _fill_spares(self) -> None:
        while len(self._spares) < self.config.spare_kernels:
            try:
                kernel = await self._spawn(Path(sys.executable), "default")
            except (EnvError, OSError) as exc:
                log.warning("no spare kernel: %s", exc)
                return
            self._spares.append(kernel)

    async def close_all(self) -> None:
        self._closing = True
        for session in self.sessions.values():
            session.closed = ToolError("The server is shutting down.")
        self.helpers.kill_all()
        for kernel in self._starting:  # kernels still starting belong to no session yet
            kernel.kill_now()
        jobs = [job for job in (*self._start_tasks, self._refill, self._idle_watch) if job is not None]
        for job in jobs:
            job.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_REAP_TIMEOUT_S):
            for job in jobs:
                await job.finished.wait()
        sessions = list(self.sessions.values())
        self.sessions.clear()
        kernels = [s.kernel for s in sessions if s.kernel is not None] + self._spares + list(self._starting)
        self._spares = []
        for job in self._fork_starts.values():
            job.cancel()
        for kernel in kernels:
            kernel.kill_now()
        async with anyio.create_task_group() as group:
            for kernel in kernels:
                group.start_soon(kernel.kill, "shutdown")
        self._close_fork_servers()  # after the kernels: their exit statuses came from it
        with anyio.CancelScope(shield=True):
            await self.guard.close()
        self.files.remove_all()

    def kill_all_now(self) -> None:
        self.helpers.kill_all()
        for kernel in [*self._spares, *self._starting, *(s.kernel for s in self.sessions.values() if s.kernel is not None)]:
            kernel.kill_now()
        self._close_fork_servers()
        self.guard.close_now()
        self.files.remove_all()

    def get(self, name: str) -> Session:
        check_session_name(name)
        session = self.sessions.get(name)
        if session is None:
            live = ", ".join(sorted(self.sessions)) or "none"
            raise ToolError(f"No session named {name!r}. Live sessions: {live}.")
        return session

    # -- running cells: one CellCall per execute or wait call
    #
    # execute: _open -> _ensure_kernel -> run_lock -> _run (kernel.start_execution) -> _follow
    # wait:    get -> wait_lock -> _follow (the cell left running)
    # _follow ends in one of: the kernel's reply (ok, error), a timeout (interrupt, then kill),
    # the cell left running ("running"), the kernel's death; CellCall.result builds each reply.

    async def execute(
        self,
        name: str,
        code: str,
        env: str | None,
        timeout_s: float | None,
        progress: Progress | None = None,
        on_timeout: OnTimeout = "interrupt",
    ) -> CellOutcome:
        """Run one cell; returns the result and the images to send inline as (mime, base64)."""
        check_session_name(name)
        call = CellCall(name, self._checked_timeout(timeout_s), on_timeout, progress)
        if "\x00" in code:
            raise ToolError("The code contains a NUL character (\\x00), which Python source cannot hold; remove it.")
        try:
            session = self._open(name, env, call.warnings)
            session.calls += 1
            try:
                await self._ensure_kernel(session, call.deadline, progress)  # a first start, or a restart after a death
                if session.left_running_runs:
                    return self._busy(call, session)
                if not await self._take_run_lock(call, session):
                    return self._busy(call, session, queued=True)
                try:
                    return await self._run(call, session, code)
                finally:
                    session.run_lock.release()
            finally:
                session.calls -= 1
                session.last_active = time.monotonic()
        except KernelStarting as starting:
            error = (
                f"The kernel of session {name!r} is still starting in env {starting.env!r} (python: {starting.python}), "
                f"{time.monotonic() - starting.since:.0f} s so far; this code was not run. It goes on starting in the "
                "background: call execute again (each call waits for it up to its own timeout_s)."
            )
            return CellOutcome(call.result("busy", error=error))
        except EnvError as exc:
            return CellOutcome(call.result("env_error", error=exc.message, warning=None))

    @staticmethod
    async def _take_run_lock(call: CellCall, session: Session) -> bool:
        """One cell at a time per session: the lock, if free (even for a call whose kernel start
        used all of its time), else once the calls ahead are done; False at the call's deadline."""
        try:
            session.run_lock.acquire_nowait()
            return True
        except anyio.WouldBlock:
            pass
        with anyio.move_on_after(call.remaining()):
            await session.run_lock.acquire()
            return True
        return False

    async def _run(self, call: CellCall, session: Session, code: str) -> CellOutcome:
        """Run one cell in a session whose run_lock the caller holds."""
        if session.left_running_runs:  # a cell was left running while this call queued
            return self._busy(call, session)
        if session.left_running is not None:  # finished on its own since; nobody fetched the end
            call.warnings.append("The cell left running earlier has finished; its final output was not fetched with wait and is dropped.")
            self._release_left_running(session)
        kernel = await self._ensure_kernel(session, call.deadline, call.progress)  # killed while this call queued: restarted
        if session.lost_state:
            call.warnings.append(session.lost_state)
            session.lost_state = None
        call.warnings.extend(session.notices)
        session.notices.clear()
        try:
            # A cell gets what is left of timeout_s, but never less than a moment to run in.
            with anyio.fail_after(call.remaining(MIN_CELL_S)):  # a kernel that stopped reading its pipe must not hang us
                execution = await kernel.start_execution(
                    code, self.config.output_limit, SpillTarget(self.files, session.name), self.config.image_limit,
                    self.config.image_bytes_limit,
                )
            execution.code = code
        except TimeoutError:
            call.warnings.append(
                "The kernel did not take the code within timeout_s (stopped or stuck), so it was killed; a fresh kernel "
                "is being restarted for the next call: variables and imports from before are gone."
            )
            await kernel.kill(StopReason.KILLED)
            self._restart_later(
                session,
                f"The previous kernel of session {session.name!r} stopped taking code and was killed; this call ran in a fresh "
                "kernel, so variables and imports from before are gone.",
            )
            return CellOutcome(call.result("timeout", error="The kernel did not accept the cell in time; the cell did not run."))
        return await self._follow(call, session, kernel, execution)

    async def wait(self, name: str, timeout_s: float | None, progress: Progress | None = None) -> CellOutcome:
        """Output since the last call of a cell left running, and its end once it ends."""
        session = self.get(name)
        call = CellCall(name, self._checked_timeout(timeout_s), "continue", progress)
        session.calls += 1
        try:
            async with session.wait_lock:
                execution = session.left_running
                if execution is None or session.kernel is None:
                    raise ToolError(f"Session {name!r} has no cell left running (by on_timeout='continue'); nothing to wait for.")
                return await self._follow(call, session, session.kernel, execution)
        finally:
            session.calls -= 1
            session.last_active = time.monotonic()

    def _checked_timeout(self, timeout_s: float | None) -> float:
        # The tool's schema only advertises exclusiveMinimum; pydantic lets 0, nan and inf through.
        if timeout_s is None:
            return self.config.default_timeout_s
        if not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ToolError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}.")
        return float(timeout_s)

    def _busy(self, call: CellCall, session: Session, queued: bool = False) -> CellOutcome:
        """Nothing ran: other calls held the session for all of the call, or a cell left running still runs."""
        if queued:
            error = (
                f"Session {session.name!r} was busy with other calls for all of this call's timeout_s ({call.elapsed():.1f} s); "
                "this code was not run. Wait for them, interrupt, or use another session."
            )
        else:
            running_for = time.monotonic() - session.left_running.started if session.left_running else 0.0
            error = (
                f"Session {session.name!r} is still running a cell left running earlier ({running_for:.0f} s so far); "
                "this code was not run. Call wait to follow that cell, interrupt to stop it, or use another session."
            )
        return CellOutcome(call.result("busy", error=error))

    def _release_left_running(self, session: Session) -> None:
        execution, session.left_running = session.left_running, None
        if execution is not None and session.kernel is not None:
            session.kernel.finish_execution(execution)

    async def _follow(self, call: CellCall, session: Session, kernel: Kernel, execution: Execution) -> CellOutcome:
        """Wait for a cell's end for what is left of the call, then interrupt it or leave it running."""
        ticker = self.jobs.start(self._report_progress, execution, call.progress, name=f"progress-{session.name}") if call.progress else None
        status: CellStatus | None = None
        reply: dict[str, Any] | None = None
        error: str | None = None
        left_running = False
        try:
            try:
                with anyio.fail_after(call.remaining(MIN_CELL_S)):
                    reply = await execution.reply.wait()
            except TimeoutError:
                if call.on_timeout == "continue":
                    left_running = True
                    session.left_running = execution
                    return self._running_result(call, execution)
                status = "timeout"
                reply = await self._interrupt_or_kill(call, session, kernel, execution)
                if reply is None:
                    error = (
                        f"The cell ran past timeout_s={call.timeout_s:g} s and did not stop on interrupt; its kernel was killed "
                        "(a fresh one is starting for the next call)."
                    )
                else:
                    error = f"The cell ran past timeout_s={call.timeout_s:g} s and was interrupted.\n{reply.get('error') or ''}".rstrip()
            except anyio.get_cancelled_exc_class():
                # The client cancelled the call: stop the cell, keep the session. A cell
                # followed by `wait` keeps running: only that wait was cancelled.
                if session.left_running is not execution:
                    with anyio.CancelScope(shield=True), contextlib.suppress(KernelDied):
                        reply = await self._interrupt_or_kill(call, session, kernel, execution)
                    self._keep_cancelled(call, session, execution, reply)
                else:
                    left_running = True
                raise
        except KernelDied as died:
            status, reply = "error", None
            error = self._death_message(session, died)
        finally:
            if ticker is not None:
                ticker.cancel()
            if not left_running:
                if session.left_running is execution:
                    session.left_running = None
                kernel.finish_execution(execution)
        return self._final_result(call, session, execution, reply, status=status, error=error)

    def _keep_cancelled(self, call: CellCall, session: Session, execution: Execution, reply: dict[str, Any] | None) -> None:
        """The end of a cell whose call was cancelled: no client hears it, the session record keeps it."""
        error = "The client cancelled the call, so the cell was interrupted." + (f"\n{reply['error']}" if reply and reply.get("error") else "")
        try:
            session.cancelled = self._final_result(call, session, execution, reply, status="error", error=error)
        except Exception:  # the cancellation must go on whatever happens here
            log.exception("session %r: the end of a cancelled cell could not be kept", session.name)

    def _running_result(self, call: CellCall, execution: Execution) -> CellOutcome:
        """Output so far of a cell left running; the next `wait` starts after it."""
        transcript = execution.transcript
        stdout, stderr, displays, images = execution.take_output()
        # "so far" is this call's duration_s (one clock reading for both); a `wait` also says
        # how long the cell has run in all, since it started before this call.
        now = time.monotonic()
        duration_s = round(now - call.started, 3)
        so_far = f"{duration_s:.0f} s so far"
        if execution.started < call.started:
            so_far += f" in this call; the cell has run {now - execution.started:.0f} s in all"
        call.warnings.append(
            f"The cell is still running ({so_far}). "
            f"Call wait(session={call.session!r}) for its further output and final result, or interrupt to stop it."
        )
        output_files = self._note_cuts((stdout, stderr, displays), call.warnings)
        image_infos, inline_images = self._save_images(call.session, images, call.warnings)
        result = call.result(
            "running", stdout=reply_text(stdout.text), stderr=reply_text(stderr.text), duration_s=duration_s,
            display=[reply_text(text) for text in displays.texts], images=image_infos, output_files=output_files,
        )
        self._keep_named(call.session, result)
        return CellOutcome(result, inline_images, reply_text(transcript.text))

    def _note_cuts(self, buffers: tuple[OutputBuffer | DisplayTexts, ...], warnings: list[str]) -> dict[str, str]:
        output_files: dict[str, str] = {}
        for buffer in buffers:
            buffer.close()
            if buffer.cut:
                where = f"Full text: {buffer.file_path}" if buffer.file_path else "The full text could not be saved (see the server log)."
                where = buffer.saved_problem or where
                if buffer.file_path:
                    output_files[buffer.name] = str(buffer.file_path)
                what = f"display output ({buffer.count} displays)" if isinstance(buffer, DisplayTexts) else buffer.name
                warnings.append(
                    f"{what} was {buffer.total} characters; {buffer.cut} were cut from the middle of this "
                    f"reply (limit {self.config.output_limit} per call). {where}"
                )
        return output_files

    def _final_result(
        self, call: CellCall, session: Session, execution: Execution, reply: dict[str, Any] | None,
        *, status: CellStatus | None = None, error: str | None = None,
    ) -> CellOutcome:
        """The reply to a cell that ended: as the kernel said (``status`` None), or timed out, or died."""
        if reply is not None:
            session.exec_count += 1
            if status is None:
                status = "ok" if reply.get("status") == "ok" else "error"
                error = reply.get("error")
            call.warnings.extend(note for note in dict.fromkeys(reply.get("notes") or []) if note not in call.warnings)
        status = status or "error"
        output_files = self._note_cuts((execution.stdout, execution.stderr, execution.displays), call.warnings)
        result_images = (reply or {}).get("result_images") or {}
        mime = next((m for m in IMAGE_MIME_TYPES if isinstance(result_images.get(m), str)), None)
        if mime is not None:
            execution.images.add(mime, result_images[mime])
        image_infos, inline_images = self._save_images(session.name, execution.images, call.warnings)
        result = call.result(
            status,
            stdout=reply_text(execution.stdout.text),
            stderr=reply_text(execution.stderr.text),
            result=reply.get("result") if reply and status == "ok" else None,
            error=reply_text(cut_middle(error, ERROR_LIMIT_CHARS, "characters of traceback cut")[0]) if error and status != "ok" else None,
            execution_count=reply.get("execution_count") if reply else None,
            display=[reply_text(text) for text in execution.displays.texts],
            images=image_infos,
            output_files=output_files,
        )
        self._keep_named(session.name, result, reply)
        return CellOutcome(result, inline_images, reply_text(execution.transcript.text))

    def _keep_named(self, session: str, result: ExecuteResult, reply: dict[str, Any] | None = None) -> None:
        """The files this reply names stay until the session's next reply, whatever the folder's cap."""
        named = [*result.output_files.values(), *(image.path for image in result.images)]
        saved = (reply or {}).get("result_file")
        if isinstance(saved, dict) and isinstance(saved.get("path"), str) and isinstance(saved.get("bytes"), int):
            self.files.adopt(session, saved["path"], saved["bytes"])
            named.append(saved["path"])
        self.files.keep_named(session, named)

    def _save_images(
        self, session: str, images: ShownImages, warnings: list[str]
    ) -> tuple[list[ExecuteImage], list[tuple[str, str]]]:
        """Save every kept image to a file; the ones within the call's budget are also sent inline."""
        infos: list[ExecuteImage] = []
        inline: list[tuple[str, str]] = []
        note = images.note()
        if note:
            warnings.append(note)
        for mime, encoded, within_budget in images.kept:
            try:
                data = base64.b64decode(encoded)
            except (binascii.Error, ValueError):
                warnings.append(f"An {mime} image was not valid base64 and was dropped.")
                continue
            suffix = ".png" if mime == "image/png" else ".jpg"
            try:
                path: Path | None = self.files.save(session, f"image{len(infos)}{suffix}", data)
            except OSError as exc:
                warnings.append(f"Image {len(infos)} could not be saved to a file ({exc}).")
                path = None
            infos.append(ExecuteImage(index=len(infos), mime_type=mime, bytes=len(data), path=str(path) if path else None))
            if len(data) > IMAGE_INLINE_MAX_BYTES:
                warnings.append(
                    f"Image {len(infos) - 1} is {len(data)} bytes, over the {IMAGE_INLINE_MAX_BYTES} sent inline; "
                    f"it is saved at {path}. Save figures smaller (lower dpi/size) to see them inline."
                )
            elif within_budget:
                inline.append((mime, encoded))
        return infos, inline

    async def _report_progress(self, execution: Execution, progress: Progress) -> None:
        """Progress for long cells only, at a bounded rate: new output, or a heartbeat."""
        await anyio.sleep(PROGRESS_FIRST_S)
        seen, last_sent = -1, 0.0
        while True:
            now = time.monotonic()
            if execution.lines_seen != seen or now - last_sent >= PROGRESS_HEARTBEAT_S:
                seen, last_sent = execution.lines_seen, now
                elapsed = now - execution.started
                line = reply_text(execution.last_line)
                try:
                    await progress(elapsed, f"running {elapsed:.1f} s" + (f": {line}" if line else ""))
                except Exception:  # a client that went away must not break the cell
                    log.debug("progress notification failed", exc_info=True)
                    return
            await anyio.sleep(PROGRESS_INTERVAL_S)

    async def _interrupt_or_kill(
        self, call: CellCall, session: Session, kernel: Kernel, execution: Execution
    ) -> dict[str, Any] | None:
        """SIGINT, then, if the cell ignores it, kill (the restart goes on after this call). Returns the reply, if any."""
        kernel.interrupt()
        grace_s = self.config.interrupt_grace_s
        try:
            with anyio.fail_after(grace_s):
                return await execution.reply.wait()
        except TimeoutError:
            pass
        except KernelDied:
            raise
        call.warnings.append(
            f"The cell did not stop within {grace_s:g} s of an interrupt, so its kernel was killed; a fresh kernel is "
            "being restarted for the next call: variables and imports from before are gone."
        )
        await kernel.kill(StopReason.KILLED)
        self._restart_later(
            session,
            f"The previous cell of session {session.name!r} did not stop on interrupt, so its kernel was killed; this call "
            "ran in a fresh kernel, so variables and imports from before are gone.",
        )
        return None

    def _death_message(self, session: Session, died: KernelDied) -> str:
        if died.stop is StopReason.RESET:
            return "The session was reset while this cell was running; it was stopped and its state is gone."
        if died.stop is StopReason.SHUTDOWN:
            return "The session was shut down while this cell was running; it was stopped."
        message = (
            f"The kernel died while running this cell ({died.how}). Session {session.name!r} is now dead; "
            "the next execute starts a fresh kernel in the same env, without the old state."
        )
        if died.log_tail:
            message += f"\nKernel stderr:\n{died.log_tail}"
        return message

    def describe(self) -> list[SessionInfo]:
        now = time.monotonic()
        infos = []
        for session in sorted(self.sessions.values(), key=lambda s: s.name):
            kernel = session.kernel
            busy_s = None
            if kernel is not None and kernel.alive and kernel.busy and kernel.current is not None:
                busy_s = round(now - kernel.current.started, 3)
            infos.append(
                SessionInfo(
                    name=session.name,
                    env=session.env_label,
                    python=str(session.python),
                    python_version=kernel.hello.get("python_version") if kernel else None,
                    ipython_version=kernel.hello.get("ipython") if kernel else None,
                    status=session.status,
                    pid=kernel.pid if kernel and kernel.alive else None,
                    uptime_s=round(now - session.created, 3),
                    exec_count=session.exec_count,
                    busy_s=busy_s,
                )
            )
        return infos


# --- The session record: every cell, kept for the person (history, notebook, resources) ---
#
# Fed by the MCP tools (a cell's outcome, a reset, a shutdown), kept apart from the
# manager: the last cells in memory, all of them as JSON lines in a 0600 file of the
# session's private folder, which `ipython-mcp export` reads from another process.
# Its sizes are with the other constants, at the top.


def clip(text: str, limit: int) -> str:
    """``text`` if it fits ``limit``, else its head and tail around a note of what is missing."""
    if len(text) <= limit:
        return text
    half = limit // 2  # exactly half each side (not cut_middle's margin): the record's limits are round numbers
    return f"{text[:half]}\n… [{len(text) - 2 * half} characters not kept in the record] …\n{text[-half:]}"


def local_time(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


@dataclasses.dataclass
class CellRecord:
    """One cell as it ran: the code sent, and what came back (as returned, bounded)."""

    index: int  # 1-based position in the session's record, restarts included
    code: str
    status: str  # ok, error, timeout, running (left running; `wait` completes it), ended, cancelled (by the client)
    started: float  # epoch seconds
    duration_s: float
    execution_count: int | None = None
    # In the order the cell produced them: {"type": "stream", "name", "text"},
    # {"type": "display", "text"}, {"type": "image", "mime", "path", "bytes"}
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    result: str | None = None
    error: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    by: str = "agent"  # who ran it: the agent, or "person" (`ipython-mcp attach`, through the person's socket)
    outputs_dropped: int = 0  # past RECORD_OUTPUTS_PER_CELL

    kind = "cell"

    @property
    def chars(self) -> int:
        texts = [self.code, self.result or "", self.error or "", *self.warnings]
        return sum(map(len, texts)) + sum(len(output.get("text") or "") + 100 for output in self.outputs)

    def add_outputs(self, outputs: list[dict[str, Any]]) -> None:
        for output in outputs:
            last = self.outputs[-1] if self.outputs else None
            if output["type"] == "stream" and last and last["type"] == "stream" and last["name"] == output["name"]:
                last["text"] = clip(last["text"] + output["text"], RECORD_TEXT_CHARS)
            elif len(self.outputs) < RECORD_OUTPUTS_PER_CELL:
                self.outputs.append(output)
            else:
                self.outputs_dropped += 1

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CellRecord:
        names = {field.name for field in dataclasses.fields(cls)}
        cell = cls(**{key: value for key, value in data.items() if key in names})
        if not isinstance(cell.index, int) or not isinstance(cell.code, str) or not isinstance(cell.outputs, list):
            raise TypeError("not a cell")
        return cell


@dataclasses.dataclass
class RestartMark:
    """Where the session's kernel restarted: the cells after it ran without the state before."""

    index: int
    at: float  # epoch seconds
    reason: str

    kind = "restart"
    chars = 100

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RestartMark:
        mark = cls(index=data["index"], at=data["at"], reason=data["reason"])
        if not isinstance(mark.index, int) or not isinstance(mark.reason, str):
            raise TypeError("not a restart mark")
        return mark


RecordEntry = CellRecord | RestartMark


def outputs_of(outcome: CellOutcome) -> list[dict[str, Any]]:
    """A reply's outputs as record entries, in the order the cell produced them.

    The reply keeps display texts and images apart from stdout; the transcript (stdout
    and display lines interleaved, images as ``[image i: mime]``) gives their order.
    When it cannot (a cut transcript), stdout comes first, then displays, then images.
    """
    result = outcome.result
    displays = [{"type": "display", "text": clip(text, RECORD_TEXT_CHARS)} for text in result.display]
    images = [{"type": "image", "mime": i.mime_type, "path": i.path, "bytes": i.bytes} for i in result.images]
    ordered = _interleaved(outcome.transcript, result.stdout, displays, images)
    if ordered is None:
        ordered = [{"type": "stream", "name": "stdout", "text": result.stdout}] if result.stdout else []
        ordered += displays + images
    if result.stderr:
        ordered.append({"type": "stream", "name": "stderr", "text": result.stderr})
    for output in ordered:
        if output["type"] == "stream":
            output["text"] = clip(output["text"], RECORD_TEXT_CHARS)
    return ordered


def _interleaved(
    transcript: str, stdout: str, displays: list[dict[str, Any]], images: list[dict[str, Any]]
) -> list[dict[str, Any]] | None:
    ordered: list[dict[str, Any]] = []
    printed: list[str] = []
    position = 0
    pending = [(display, display["text"].rstrip()) for display in displays if display["text"].rstrip()]
    pending_images = [(image, f"[image {i}: {image['mime']}]") for i, image in enumerate(images)]
    while pending or pending_images:
        found = []
        for queue in (pending, pending_images):
            if queue:
                at = transcript.find(queue[0][1], position)
                if at >= 0:
                    found.append((at, queue))
        if not found:
            break  # e.g. a result's image, which is not in the transcript: it goes last
        at, queue = min(found, key=lambda item: item[0])
        item, marker = queue.pop(0)
        if at > position:
            printed.append(transcript[position:at])
            ordered.append({"type": "stream", "name": "stdout", "text": transcript[position:at]})
        ordered.append(item)
        position = at + len(marker)
        if transcript.startswith("\n", position):
            position += 1
    if position < len(transcript):
        printed.append(transcript[position:])
        ordered.append({"type": "stream", "name": "stdout", "text": transcript[position:]})
    ordered += [item for item, _ in pending + pending_images]
    # The transcript adds a line break before a display that follows an unfinished line.
    if "".join(printed).replace("\n", "") != stdout.replace("\n", ""):
        return None
    return ordered


class SessionRecord:
    """One session's record: its last cells and restarts in memory, all of them on disk.

    The file is ``<session folder>/<stamp>-record.jsonl``, made like every saved file
    (new, 0600, at most --spill-file-limit bytes) but never deleted while the session
    lives, so outside the folder's cap: a first line about the session, then one line per
    entry; a cell that changes (a cell left running, completed by `wait`) is written
    again, and the last line of an index wins. When the file cannot grow (its cap, a full
    disk) the record goes on in memory only, and exports say so.
    """

    def __init__(self, name: str, files: OutputFiles, about: dict[str, Any]):
        self.name, self.about, self._files = name, about, files
        self.entries: collections.deque[RecordEntry] = collections.deque()
        self.count = 0  # entries ever recorded
        self._chars = 0
        self.path: Path | None = None
        self._fd = -1
        self._size = 0
        self.disk_problem: str | None = None

    # -- what the tools report

    def add_cell(self, code: str, outcome: CellOutcome, by: str = "agent", status: str | None = None) -> CellRecord:
        result = outcome.result
        last = next((entry for entry in reversed(self.entries) if isinstance(entry, CellRecord)), None)
        if last is not None and last.status == "running":  # it ended on its own; nobody fetched its end
            before = last.chars
            last.status = "ended"
            last.warnings.append("It ended without `wait` fetching its end; its last output was not returned.")
            self._chars += last.chars - before
            self._changed(last)
        latest_count = next(
            (entry.execution_count for entry in reversed(self.entries) if isinstance(entry, CellRecord) and entry.execution_count),
            None,
        )
        if (
            result.execution_count is not None
            and latest_count is not None
            and result.execution_count <= latest_count
            and not isinstance(self.entries[-1], RestartMark)
        ):
            self.add_restart("the kernel restarted (it died, or was killed after a timeout): the state before is gone")
        cell = CellRecord(
            index=self.count + 1,
            code=clip(code, RECORD_CODE_CHARS),
            status=status or result.status,
            started=time.time() - result.duration_s,
            duration_s=result.duration_s,
            execution_count=result.execution_count,
            result=clip(result.result, RECORD_TEXT_CHARS) if result.result is not None else None,
            error=clip(result.error, RECORD_TEXT_CHARS) if result.error else None,
            warnings=[result.warning] if result.warning else [],
            by=by,
        )
        cell.add_outputs(outputs_of(outcome))
        self._append(cell)
        return cell

    def continue_cell(self, outcome: CellOutcome) -> CellRecord | None:
        """A `wait` reply: more of the cell left running, and its end once it ends."""
        cell = next((entry for entry in reversed(self.entries) if isinstance(entry, CellRecord)), None)
        if cell is None or cell.status != "running":
            return None
        before = cell.chars
        result = outcome.result
        cell.add_outputs(outputs_of(outcome))
        cell.status = result.status
        cell.duration_s = round(time.time() - cell.started, 3)
        cell.execution_count = result.execution_count if result.execution_count is not None else cell.execution_count
        cell.result = clip(result.result, RECORD_TEXT_CHARS) if result.result is not None else cell.result
        cell.error = clip(result.error, RECORD_TEXT_CHARS) if result.error else cell.error
        if result.warning and result.status != "running":
            cell.warnings.append(result.warning)
        self._chars += cell.chars - before
        self._changed(cell)
        return cell

    def add_restart(self, reason: str) -> None:
        self._append(RestartMark(index=self.count + 1, at=time.time(), reason=reason))

    def _append(self, entry: RecordEntry) -> None:
        self.count += 1
        self.entries.append(entry)
        self._chars += entry.chars
        while len(self.entries) > 1 and (len(self.entries) > RECORD_MAX_CELLS or self._chars > RECORD_MEMORY_CHARS):
            self._chars -= self.entries.popleft().chars
        self._save(entry)

    def _changed(self, entry: RecordEntry) -> None:
        self._save(entry)

    # -- on disk

    def _save(self, entry: RecordEntry) -> None:
        if self.disk_problem is not None:
            return
        try:
            if self._fd < 0 or os.fstat(self._fd).st_nlink == 0:  # none yet, or its folder was deleted (`rm -rf` in a cell)
                self._new_file()  # holds every entry in memory, this one included
            else:
                self._write(record_line(entry.to_json()))
        except OSError as exc:
            self.disk_problem = f"the record file {self.path} stopped growing after {self._size} bytes ({exc.strerror or exc})"
            log.warning("session %r: %s; the record goes on in memory only", self.name, self.disk_problem)
            self._close_file()

    def _new_file(self) -> None:
        self._close_file()
        self.path, self._fd = self._files.create(self.name, RECORD_FILE_SUFFIX)
        self._size = 0
        self._write(record_line({"kind": "session", "format": RECORD_FORMAT, **self.about}))
        for entry in self.entries:
            self._write(record_line(entry.to_json()))

    def _write(self, data: bytes) -> None:
        # Capped per file, like every saved file, but outside the folder's cap: that cap
        # makes room by deleting old output, and a live session's record is never deleted.
        if self._size + len(data) > self._files.file_limit:
            raise OSError(errno.EFBIG, f"it reached the limit per saved file, --spill-file-limit {self._files.file_limit}")
        written = 0
        while written < len(data):
            written += os.write(self._fd, data[written:] if written else data)
        self._size += len(data)

    def _close_file(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        self._close_file()

    def all_entries(self) -> tuple[list[RecordEntry], str | None]:
        """Every entry (from the file, when it is whole), and what is missing if not."""
        if self.path is not None and self.disk_problem is None and self._fd >= 0:
            try:
                return read_record(self.path)[1], None
            except OSError as exc:
                log.warning("session %r: cannot read its record file: %s", self.name, exc)
        missing = self.count - len(self.entries)
        if not missing:
            return list(self.entries), None
        why = f" ({self.disk_problem})" if self.disk_problem else ""
        return list(self.entries), f"Only the last {len(self.entries)} of {self.count} entries were kept{why}."


def record_line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, separators=(",", ":")) + "\n").encode()


def read_record(path: Path, dir_fd: int | None = None) -> tuple[dict[str, Any], list[RecordEntry]]:
    """A record file's session line and entries (the last line of each index wins; a
    torn last line, from a server that was killed mid-write, is skipped)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as file:
        lines = file.read().splitlines()
    about: dict[str, Any] = {}
    entries: dict[int, RecordEntry] = {}
    for line in lines:
        try:
            data = json.loads(line)
            if data.get("kind") == "session":
                about = data
            elif data.get("kind") in ("cell", "restart"):
                entry = (CellRecord if data["kind"] == "cell" else RestartMark).from_json(data)
                entries[entry.index] = entry
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return about, [entries[index] for index in sorted(entries)]


class SessionRecords:
    """The record of every live session, by name; the manager holds it, the MCP tools feed it."""

    def __init__(self, files: OutputFiles):
        self.files = files
        self.by_name: dict[str, SessionRecord] = {}
        self.announced: frozenset[str] = frozenset()  # the sessions clients were last told of

    def get(self, name: str) -> SessionRecord | None:
        return self.by_name.get(name)

    def cell(
        self, session: Session, code: str | None, outcome: CellOutcome, by: str = "agent", status: str | None = None
    ) -> CellRecord | None:
        """Record an `execute` (``code``) or `wait` (None) reply, as ``status`` if given; never fails the call it records."""
        if outcome.result.status in ("busy", "env_error"):  # nothing ran
            return None
        try:
            record = self.by_name.get(session.name)
            if record is None:
                if code is None:
                    return None
                record = self.by_name[session.name] = SessionRecord(session.name, self.files, self.about(session))
            if code is None:
                return record.continue_cell(outcome)
            return record.add_cell(code, outcome, by, status)
        except Exception:  # the record is an aside: the agent's reply must come back
            log.exception("session %r: the cell could not be recorded", session.name)
            return None

    @staticmethod
    def about(session: Session) -> dict[str, Any]:
        """The record's first line: which session, env and Python."""
        hello = session.kernel.hello if session.kernel is not None else {}
        return {
            "session": session.name,
            "env": session.env_label,
            "python": str(session.python),
            "python_version": hello.get("python_version"),
            "ipython_version": hello.get("ipython"),
            "server_pid": os.getpid(),
            "created": time.time(),
        }

    def restarted(self, name: str, reason: str) -> None:
        record = self.by_name.get(name)
        if record is not None and record.entries and not isinstance(record.entries[-1], RestartMark):
            record.add_restart(reason)

    def end(self, name: str) -> None:
        record = self.by_name.pop(name, None)
        if record is not None:
            record.close()

    def close_all(self) -> None:
        for name in list(self.by_name):
            self.end(name)


# -- what the record becomes: history, a notebook


class HistoryEntry(BaseModel):
    index: int = Field(description="Position in the session's record (cells and restarts, from 1).")
    kind: Literal["cell", "restart"]
    time: str = Field(description="When the cell started, or the kernel restarted (local time, ISO 8601).")
    execution_count: int | None = None
    status: str | None = Field(
        None, description="ok, error, timeout, running (left running), ended (ended without wait), cancelled (its call was cancelled)."
    )
    code: str | None = None
    output: str | None = Field(
        None, description="A short excerpt of what the cell returned: its output, result, or the error's last line."
    )
    duration_s: float | None = None
    by: str | None = Field(None, description="Who ran the cell: 'agent', or 'person' (through `ipython-mcp attach`).")
    reason: str | None = Field(None, description="Why the kernel restarted.")


class HistoryResult(BaseModel):
    """What `history` returns: the last entries of a session's record."""

    session: str
    entries: list[HistoryEntry]
    recorded: int = Field(description="Cells and restarts recorded since the session started.")
    record_file: str | None = Field(description="The file holding the whole record (JSON lines).")


class NotebookExport(BaseModel):
    """What `export_notebook` wrote."""

    session: str
    path: str
    cells: int = Field(description="Notebook cells written (code cells and restart notes).")
    bytes: int
    note: str | None = Field(None, description="What the notebook lacks, if anything (an incomplete record).")


def output_excerpt(cell: CellRecord) -> str | None:
    if cell.error:
        lines = [line for line in cell.error.strip().splitlines() if line.strip()]
        return clip(lines[-1] if lines else "", HISTORY_EXCERPT_CHARS)
    parts = []
    for output in cell.outputs:
        parts.append(f"[image: {output['mime']}]" if output["type"] == "image" else output["text"].strip())
    if cell.result is not None:
        parts.append(cell.result)
    text = "\n".join(part for part in parts if part)
    if len(text) > HISTORY_EXCERPT_CHARS:
        head = HISTORY_EXCERPT_CHARS * 2 // 3
        text = f"{text[:head]} … {text[-(HISTORY_EXCERPT_CHARS - head) :]}"
    return text or None


def history_of(record: SessionRecord | None, session: str, last: int) -> HistoryResult:
    entries = list(record.entries)[-last:] if record is not None and last > 0 else []
    shown = []
    for entry in entries:
        if isinstance(entry, RestartMark):
            shown.append(HistoryEntry(index=entry.index, kind="restart", time=local_time(entry.at), reason=entry.reason))
        else:
            shown.append(
                HistoryEntry(
                    index=entry.index,
                    kind="cell",
                    time=local_time(entry.started),
                    execution_count=entry.execution_count,
                    status=entry.status,
                    code=clip(entry.code, HISTORY_CODE_CHARS),
                    output=output_excerpt(entry),
                    duration_s=entry.duration_s,
                    by=entry.by,
                )
            )
    return HistoryResult(
        session=session,
        entries=shown,
        recorded=record.count if record else 0,
        record_file=str(record.path) if record and record.path else None,
    )


def render_history(history: HistoryResult) -> str:
    if not history.entries:
        return f"Session {history.session!r} has no cells recorded yet."
    head = f"Session {history.session!r}: {history.recorded} entries recorded"
    if len(history.entries) < history.recorded:
        head += f", the last {len(history.entries)} shown"
    lines = [head + (f" (whole record: {history.record_file})" if history.record_file else "") + "."]
    for entry in history.entries:
        clock = entry.time[11:19]
        if entry.kind == "restart":
            lines.append(f"--- [{entry.index}] {clock} kernel restarted: {entry.reason} ---")
            continue
        prompt = f"In [{entry.execution_count}]" if entry.execution_count is not None else "In [ ]"
        lines.append(f"[{entry.index}] {prompt} {entry.status} · {clock} · {entry.duration_s:.3g} s · {entry.by}")
        lines += ["    " + line for line in (entry.code or "").splitlines()]
        if entry.output:
            lines.append("  → " + entry.output.replace("\n", "\n    "))
    return "\n".join(lines)


def render_history_markdown(record: SessionRecord | None, session: str) -> str:
    """The `ipython://sessions/NAME/history` resource: the cells in memory, as a person reads them."""
    entries = list(record.entries) if record else []
    lines = [f"# Session `{session}`", ""]
    if record is not None:
        about = record.about
        lines += [
            f"Env `{about.get('env')}` ({about.get('python')}, Python {about.get('python_version')}); "
            f"{record.count} entries recorded"
            + (f", the last {len(entries)} here" if len(entries) < record.count else "")
            + (f"; whole record: `{record.path}`" if record.path else "")
            + ".",
            "",
        ]
    if not entries:
        lines.append("No cells yet.")
    for entry in entries:
        if isinstance(entry, RestartMark):
            lines += [f"---\n**Kernel restarted** at {local_time(entry.at)}: {entry.reason}.\n", ""]
            continue
        prompt = entry.execution_count if entry.execution_count is not None else " "
        lines += [
            f"### In [{prompt}] · {entry.status} · {local_time(entry.started)} · {entry.duration_s:.3g} s · {entry.by}",
            "",
            "```python",
            entry.code.rstrip(),
            "```",
            "",
        ]
        for output in entry.outputs:
            if output["type"] == "image":
                lines += [f"*image ({output['mime']}, {output['bytes']} bytes): `{output['path']}`*", ""]
            else:
                lines += ["```", output["text"].rstrip("\n"), "```", ""]
        if entry.result is not None:
            lines += ["```", f"Out[{prompt}]: {entry.result}", "```", ""]
        if entry.error:
            lines += ["```", entry.error.rstrip(), "```", ""]
        lines += [f"> {warning}" for warning in entry.warnings] + ([""] if entry.warnings else [])
    return "\n".join(lines)


def _error_output(error: str) -> dict[str, Any]:
    lines = error.rstrip("\n").splitlines() or [""]
    name, _, value = lines[-1].partition(":")
    if not re.fullmatch(r"[A-Za-z_][\w.]*", name.strip()):
        name, value = "Error", lines[-1]
    return {"output_type": "error", "ename": name.strip(), "evalue": value.strip(), "traceback": lines}


def _image_data(path: str | None, folder_fd: int | None) -> str | None:
    """An image file's bytes as base64, read only from the session's own folder."""
    if not path:
        return None
    try:
        fd = os.open(
            Path(path).name if folder_fd is not None else path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd
        )
        with os.fdopen(fd, "rb") as file:
            return base64.b64encode(file.read()).decode("ascii")
    except OSError:
        return None


def notebook_of(
    about: dict[str, Any], entries: list[RecordEntry], note: str | None = None, folder_fd: int | None = None
) -> dict[str, Any]:
    """A record as an nbformat 4.5 notebook (written by hand: the runtime needs no nbformat).

    Code cells in order with their execution counts and outputs (streams, displays with
    their images embedded, the result, the error), a markdown cell where the kernel
    restarted, the cell's status, time and author in its metadata.
    """
    cells: list[dict[str, Any]] = []
    if note:
        cells.append({"cell_type": "markdown", "id": "record-note", "metadata": {}, "source": f"*{note}*"})
    for entry in entries:
        if isinstance(entry, RestartMark):
            text = f"**Kernel restarted** ({local_time(entry.at)}): {entry.reason}. The cells below ran in a fresh kernel."
            cells.append({"cell_type": "markdown", "id": f"restart-{entry.index}", "metadata": {}, "source": text})
            continue
        outputs: list[dict[str, Any]] = []
        for output in entry.outputs:
            if output["type"] == "stream":
                outputs.append({"output_type": "stream", "name": output["name"], "text": output["text"]})
            elif output["type"] == "display":
                outputs.append({"output_type": "display_data", "data": {"text/plain": output["text"]}, "metadata": {}})
            else:
                data = _image_data(output.get("path"), folder_fd)
                if data is None:
                    bundle = {"text/plain": f"[{output['mime']} image, no longer saved: {output.get('path')}]"}
                else:
                    bundle = {output["mime"]: data, "text/plain": f"<{output['mime']} image>"}
                outputs.append({"output_type": "display_data", "data": bundle, "metadata": {}})
        if entry.result is not None:
            outputs.append(
                {
                    "output_type": "execute_result",
                    "execution_count": entry.execution_count,
                    "data": {"text/plain": entry.result},
                    "metadata": {},
                }
            )
        if entry.error:
            outputs.append(_error_output(entry.error))
        meta = {"status": entry.status, "started": local_time(entry.started), "duration_s": entry.duration_s, "by": entry.by}
        if entry.warnings:
            meta["warnings"] = entry.warnings
        cells.append(
            {
                "cell_type": "code",
                "id": f"cell-{entry.index}",
                "metadata": {"ipython_mcp": meta},
                "execution_count": entry.execution_count,
                "source": entry.code,
                "outputs": outputs,
            }
        )
    version = about.get("python_version") or ""
    return {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": f"Python 3 ({about.get('env', 'default')})", "language": "python"},
            "language_info": {
                "name": "python",
                "version": version,
                "mimetype": "text/x-python",
                "file_extension": ".py",
                "pygments_lexer": "ipython3",
                "codemirror_mode": {"name": "ipython", "version": 3},
                "nbconvert_exporter": "python",
            },
            "ipython_mcp": {key: about.get(key) for key in ("session", "env", "python", "python_version", "ipython_version")},
        },
        "cells": cells,
    }


def write_notebook(path: Path, notebook: dict[str, Any], overwrite: bool = False) -> int:
    """Write ``notebook`` to ``path`` (mode by umask, like any file the user makes); returns its size.

    A file or link already there is an error unless ``overwrite``; then it is replaced
    (a link itself, never what it points to) through a new file renamed over it.
    """
    data = (json.dumps(notebook, indent=1, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    target = path if not overwrite else path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(target, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        if overwrite:
            os.replace(target, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise
    return len(data)


@dataclasses.dataclass
class FoundRecord:
    """A live server's record of one session, found on disk by ``ipython-mcp export``."""

    session: str
    server_pid: int
    folder: Path  # the session's folder
    name: str  # the record file in it
    mtime: float  # its last write: the most recently active copy wins


def output_roots(output_dir: Path) -> list[Path]:
    """Where this user's servers save output: the folder given (or the default), and the
    fresh private folders a server makes when that one cannot be used."""
    return [output_dir, *sorted(Path(tempfile.gettempdir()).glob(f"ipython-mcp-{os.getuid()}-*"))]


def find_records(roots: list[Path]) -> list[FoundRecord]:
    """Every session record of this user's live servers, in folders that are safely theirs."""
    found = []
    for root in roots:
        with contextlib.ExitStack() as stack:
            try:
                root_fd = open_private_folder(root, create=False)
            except OSError:
                continue
            stack.callback(os.close, root_fd)
            for server in os.listdir(root_fd):
                match = SERVER_FOLDER.fullmatch(server)
                if match is None or not process_alive(int(match[1])):
                    continue
                with contextlib.suppress(OSError), contextlib.ExitStack() as inner:
                    server_fd = open_private_folder(server, root_fd, create=False)
                    inner.callback(os.close, server_fd)
                    for session in os.listdir(server_fd):
                        if not SESSION_NAME.fullmatch(session):
                            continue
                        with contextlib.suppress(OSError), contextlib.ExitStack() as innermost:
                            session_fd = open_private_folder(session, server_fd, create=False)
                            innermost.callback(os.close, session_fd)
                            for name in os.listdir(session_fd):
                                if not name.endswith("-" + RECORD_FILE_SUFFIX):
                                    continue
                                info = os.stat(name, dir_fd=session_fd, follow_symlinks=False)
                                if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid():
                                    found.append(
                                        FoundRecord(session, int(match[1]), root / server / session, name, info.st_mtime)
                                    )
    return found


def export_session(
    session: str, path: Path | None, output_dir: Path, overwrite: bool = False
) -> tuple[FoundRecord, Path, int, int, str | None]:
    """Write a live session's record (read from disk, in this process) as a notebook.

    Returns what was exported, where, how many cells and bytes, and a note when several
    servers held a session of that name.
    """
    check_session_name(session)
    roots = output_roots(output_dir)
    found = find_records(roots)
    matches = sorted((record for record in found if record.session == session), key=lambda record: record.mtime)
    if not matches:
        others = ", ".join(sorted(f"{record.session} (server pid {record.server_pid})" for record in found)) or "none"
        raise ExportFailed(
            f"No live session named {session!r} with a record in {output_dir} (a session has one once a cell ran; "
            f"a server started with another --output-dir needs the same option here). Sessions found: {others}."
        )
    chosen = matches[-1]
    note = None
    if len(matches) > 1:
        pids = ", ".join(str(record.server_pid) for record in matches)
        note = (
            f"{len(matches)} live servers have a session named {session!r} (pids {pids}); "
            f"exported the most recently active one, pid {chosen.server_pid}."
        )
    target = Path(os.path.abspath(path.expanduser() if path is not None else Path(f"{session}.ipynb")))
    try:
        folder_fd = os.open(chosen.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ExportFailed(f"The session's folder {chosen.folder} cannot be read: {exc.strerror or exc}.") from None
    try:
        about, entries = read_record(Path(chosen.name), dir_fd=folder_fd)
        notebook = notebook_of(about, entries, folder_fd=folder_fd)
    except OSError as exc:
        raise ExportFailed(f"The record {chosen.folder / chosen.name} cannot be read: {exc.strerror or exc}.") from None
    finally:
        os.close(folder_fd)
    try:
        size = write_notebook(target, notebook, overwrite)
    except FileExistsError:
        raise ExportFailed(f"{target} already exists; pass --overwrite to replace it.") from None
    except OSError as exc:
        raise ExportFailed(f"Cannot write {target}: {exc.strerror or exc}.") from None
    return chosen, target, len(notebook["cells"]), size, note


# --- MCP tools: thin translations between the manager and MCP results ---------------


def render_execute(outcome: CellOutcome) -> str:
    """The readable text block: status first, then only the sections that have content."""
    result = outcome.result
    head = f"status: {result.status}"
    if result.execution_count is not None:
        head += f" · In [{result.execution_count}]"
    head += f" · {result.duration_s:.3g} s · session {result.session!r}"
    parts = [head]
    if result.display or result.images:  # one section, in the order the cell produced it
        if outcome.transcript.strip():
            parts.append(f"--- output ---\n{outcome.transcript.rstrip()}")
    elif result.stdout:
        parts.append(f"--- stdout ---\n{result.stdout.rstrip()}")
    if result.stderr:
        parts.append(f"--- stderr ---\n{result.stderr.rstrip()}")
    if result.images:
        parts.append("--- images ---\n" + "\n".join(f"[{i.index}] {i.mime_type}, {i.bytes} bytes, {i.path}" for i in result.images))
    if result.result is not None:
        parts.append(f"--- result ---\n{result.result}")
    if result.error:
        parts.append(f"--- error ---\n{result.error}")
    if result.warning:
        parts.append(f"--- warning ---\n{result.warning}")
    return "\n".join(parts)


def render_sessions(infos: list[SessionInfo]) -> str:
    if not infos:
        return "No live sessions. `execute` with a new session name starts one."
    lines = []
    for i in infos:
        line = f"{i.name}: {i.status}, env {i.env} ({i.python}, Python {i.python_version}, IPython {i.ipython_version}), "
        line += f"pid {i.pid}, up {i.uptime_s:.0f} s, {i.exec_count} cells"
        if i.busy_s is not None:
            line += f", busy for {i.busy_s:.1f} s"
        lines.append(line)
    return "\n".join(lines)


INSTRUCTIONS = """Stateful IPython sessions. `execute(session, code)` runs code in a named session that keeps
variables, imports and the working directory between calls (created on first use; `env` picks the
Python env: a name under ~/envs, a path, or the server's own Python by default; `list_envs` shows
which envs there are). Use one session per task, iterate in small cells, and use `interrupt`,
`reset`, `shutdown`, `list_sessions` to manage them. A long cell can keep running past its call with
`on_timeout="continue"`; follow it with `wait`. A failed cell (status error, timeout, env_error,
busy) is a tool error that still carries the full result. Nobody can type into a session: input()
fails, so pass values in code. `history(session)` shows the cells a session already ran (after your
context was compacted, say); `export_notebook(session, path)` saves them as a Jupyter notebook."""


def plain_optional(json_type: str, description: str, **constraints: Any) -> Any:
    """The Field of an optional argument, advertised as its plain JSON type.

    pydantic advertises ``float | None = None`` as ``anyOf: [number, null]`` with
    ``default: null``, which some clients cannot handle (one sends ``{"anyOf": [2]}``,
    another shows the type as unknown and suggests the string "null"). So the schema says
    ``{"type": "number"}`` and the description says what leaving it out means; an explicit
    null is still accepted, because validation uses the real annotation.
    """

    def advertise(schema: dict[str, Any]) -> None:
        schema.pop("anyOf", None)
        schema.pop("default", None)
        schema.update(type=json_type, **constraints)

    return Field(description=description, json_schema_extra=advertise)


class IPythonMCP(MCPServer):
    """MCPServer whose tool replies can always be sent.

    A reply the SDK cannot serialise (a lone surrogate from a file name that is not UTF-8)
    would end its stdio writer, and with it the server and every kernel. So every tool
    result, and every tool error's text, passes through ``shown`` here, in one place.
    """

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            result = await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if exc.args and isinstance(exc.args[0], str):
                exc.args = (shown(exc.args[0]), *exc.args[1:])
            raise
        if isinstance(result, CallToolResult):
            for block in result.content:
                if isinstance(block, TextContent):
                    block.text = shown(block.text)
            if result.structured_content is not None:
                result.structured_content = printable(result.structured_content)
        return result


def build_server(
    config: Config | None = None, *, bearer: BearerToken | None = None, live: set[SessionManager] | None = None
) -> MCPServer:
    """The MCP server with its tools; ``bearer`` makes its HTTP app require that token.

    Each manager is owned by the server lifespan; while it lives it is also in ``live``, so
    the transport's signal handler (and main's last resort) can kill its kernels at once.

    Long on purpose: the tools are registered by the SDK's decorators on this server, and
    each is a few lines translating between the manager and MCP results; one function keeps
    the whole tool surface (names, schemas, annotations) on one page, in the order of the README.
    """
    config = config or Config()
    live = set() if live is None else live

    @asynccontextmanager
    async def lifespan(_: MCPServer):
        async with Jobs.open() as jobs:  # every background task of the manager, ended with it
            manager = SessionManager(config, jobs)
            live.add(manager)
            manager.guard.start()
            manager.start_spares()
            manager.start_idle_watch()
            try:
                yield manager
            finally:
                live.discard(manager)
                with anyio.CancelScope(shield=True):
                    await manager.close_all()
                manager.records.close_all()

    # The SDK's own bearer check (AuthenticationMiddleware + RequireAuthMiddleware on the MCP
    # route); with no resource_server_url it publishes no OAuth metadata: the token is ours.
    auth: dict[str, Any] = {}
    if bearer is not None:
        auth = {"auth": AuthSettings(issuer_url=bearer.issuer_url, resource_server_url=None), "token_verifier": bearer}
    server = IPythonMCP("ipython-mcp", instructions=INSTRUCTIONS, version=__version__, lifespan=lifespan, **auth)

    def manager_of(ctx: Context) -> SessionManager:
        return ctx.request_context.lifespan_context

    def progress_to(ctx: Context) -> Progress:
        async def progress(elapsed: float, message: str) -> None:
            await ctx.report_progress(round(elapsed, 1), None, shown(message))

        return progress

    def execute_result(outcome: CellOutcome) -> CallToolResult:
        content: list[TextContent | ImageContent] = [TextContent(type="text", text=render_execute(outcome))]
        content += [ImageContent(type="image", data=data, mime_type=mime) for mime, data in outcome.images]
        # A failed cell is a tool error too, so a client can mark it failed; the structured
        # content stays whole (clients skip output-schema validation for error results).
        return CallToolResult(
            content=content,
            structured_content=outcome.result.model_dump(mode="json"),
            is_error=outcome.result.status in FAILED_STATUSES,
        )

    async def recorded(ctx: Context, session: str, code: str | None, outcome: CellOutcome) -> CellOutcome:
        """Add a reply to its session's record (``code`` None: a `wait`), and tell clients what changed."""
        manager = manager_of(ctx)
        live = manager.sessions.get(session)
        by = "person" if through_person_socket(ctx) else "agent"
        if live is not None and manager.records.cell(live, code, outcome, by) is not None:
            for uri in session_resources(session):
                with contextlib.suppress(Exception):  # only `subscriptions/listen` streams (2026-07-28) hear these
                    await ctx.notify_resource_updated(uri)
        await announce_sessions(ctx)
        return outcome

    def record_cancelled(ctx: Context, session: str, code: str) -> None:
        """A cancelled call answers nobody, but its cell ran (interrupted): the session record shows it."""
        manager = manager_of(ctx)
        live = manager.sessions.get(session)
        if live is not None and live.cancelled is not None:
            outcome, live.cancelled = live.cancelled, None
            by = "person" if through_person_socket(ctx) else "agent"
            manager.records.cell(live, code, outcome, by, status="cancelled")

    async def announce_sessions(ctx: Context) -> None:
        """`notifications/resources/list_changed` when sessions came or went since clients were last told."""
        manager = manager_of(ctx)
        names = frozenset(manager.sessions)
        if names == manager.records.announced:
            return
        manager.records.announced = names
        # Advisory: a client that went away must not fail the call.
        try:
            await ctx.request_context.session.send_resource_list_changed()  # handshake-era clients
        except Exception:
            log.debug("notifications/resources/list_changed not sent", exc_info=True)
        try:
            await ctx.notify_resources_changed()  # 2026-07-28 clients, on their `subscriptions/listen` stream
        except Exception:
            log.debug("resources list change not published", exc_info=True)

    # Every tool states all four hints; clients assume the worst of a hint left out.
    @server.tool(
        annotations=ToolAnnotations(
            title="Run code in an IPython session",
            read_only_hint=False,
            destructive_hint=True,  # the code can do anything: delete files, overwrite variables
            idempotent_hint=False,
            open_world_hint=True,  # ... and reach the network
        )
    )
    async def execute(
        session: Annotated[str, Field(description=f"Session name: {SESSION_NAME_RULE}. Created on first use.")],
        code: Annotated[str, Field(description="Python/IPython code (magics and !shell commands work).")],
        ctx: Context,
        env: Annotated[
            str | None,
            plain_optional(
                "string",
                "Python env for a NEW session: omit for the server's own Python, a bare name for ~/envs/<name> or an env of the config file (list_envs shows them), "
                "a path (env folder, project folder with .venv, or interpreter), or ssh://[user@]host[:port]/abs/path/to/env.",
            ),
        ] = None,
        timeout_s: Annotated[
            float | None,
            plain_optional(
                "number",
                "Seconds before the cell is interrupted (partial output is returned, state kept). Default when omitted: "
                "MCP_TOOL_TIMEOUT minus 2 s, or 58 s when it is unset.",
                exclusiveMinimum=0,
            ),
        ] = None,
        on_timeout: Annotated[
            Literal["interrupt", "continue"],
            Field(description="At timeout_s: 'interrupt' the cell (default), or 'continue': leave it running and return status 'running' (follow it with `wait`)."),
        ] = "interrupt",
    ) -> Annotated[CallToolResult, ExecuteResult]:
        """Run code in a stateful IPython session and return its output, result, error and images. \
To add a package, run `%pip install NAME` in the session: it goes into the session's own env and imports right after."""
        call = manager_of(ctx).execute(session, code, env, timeout_s, progress_to(ctx), on_timeout)
        try:
            outcome = await unless_client_leaves(ctx, call)
        except BaseException:
            record_cancelled(ctx, session, code)
            raise
        return execute_result(await recorded(ctx, session, code, outcome))

    @server.tool(
        annotations=ToolAnnotations(
            title="Wait for a cell left running",
            read_only_hint=True,  # it only watches a cell that runs anyway
            destructive_hint=False,
            idempotent_hint=False,  # each wait takes the output since the last one
            open_world_hint=False,
        )
    )
    async def wait(
        session: str,
        ctx: Context,
        timeout_s: Annotated[
            float | None,
            plain_optional("number", "Seconds to wait for the cell to end. Default when omitted: as for execute.", exclusiveMinimum=0),
        ] = None,
    ) -> Annotated[CallToolResult, ExecuteResult]:
        """Follow a cell started with on_timeout='continue': output since the last call, and its final result once it ends."""
        outcome = await unless_client_leaves(ctx, manager_of(ctx).wait(session, timeout_s, progress_to(ctx)))
        return execute_result(await recorded(ctx, session, None, outcome))

    @server.tool(
        annotations=ToolAnnotations(
            title="List IPython sessions", read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
        )
    )
    async def list_sessions(ctx: Context) -> Annotated[CallToolResult, SessionList]:
        """List live sessions: name, env, python, status (starting/idle/busy/dead/stopped), uptime, cells run."""
        infos = manager_of(ctx).describe()
        return CallToolResult(
            content=[TextContent(type="text", text=render_sessions(infos))],
            structured_content=SessionList(sessions=infos, spare_kernels=manager_of(ctx).spare_count).model_dump(mode="json"),
        )

    @server.tool(
        annotations=ToolAnnotations(
            title="List Python envs", read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
        )
    )
    async def list_envs(ctx: Context) -> Annotated[CallToolResult, EnvList]:
        """Python envs a session can use (pass the name as `env`): the server's own, each under the envs folder and each in the config file (probed through its launcher: ssh, docker...), with versions and whether IPython is there."""
        manager = manager_of(ctx)
        listing = await manager.envs.list(manager.config.envs_dir, manager.config.launchers.envs)
        lines = [f"Envs folder: {listing.envs_dir}"]
        for env in listing.envs:
            state = f"IPython {env.ipython_version}" if env.usable else f"not usable: {env.problem}"
            lines.append(f"{env.name}: Python {env.python_version} ({env.python}), {state}")
        return CallToolResult(
            content=[TextContent(type="text", text="\n".join(lines))], structured_content=listing.model_dump(mode="json")
        )

    def action_result(session: str, outcome: ActionOutcome, message: str, pid: int | None = None) -> CallToolResult:
        result = SessionAction(session=session, outcome=outcome, message=message, pid=pid)
        return CallToolResult(content=[TextContent(type="text", text=message)], structured_content=result.model_dump(mode="json"))

    @server.tool(  # idempotent: a second reset wipes an already empty session again
        annotations=ToolAnnotations(
            title="Restart a session's kernel", read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
        )
    )
    async def reset(session: str, ctx: Context) -> Annotated[CallToolResult, SessionAction]:
        """Restart the session's kernel: all state is wiped; the name and env are kept."""
        manager = manager_of(ctx)
        entry = manager.get(session)
        try:
            kernel = await manager.reset(entry)
        except EnvError as exc:
            raise ToolError(f"Session {session!r} could not restart: {exc.message}") from exc
        manager.records.restarted(session, "reset")
        if kernel is None:
            message = (
                f"Session {session!r} was reset: its fresh kernel in env {entry.env_label!r} ({entry.python}) is still "
                "starting, and the next execute waits for it."
            )
            return action_result(session, "reset", message)
        message = f"Session {session!r} was reset: a fresh kernel in env {entry.env_label!r} ({entry.python}) is ready."
        return action_result(session, "reset", message, kernel.pid)

    @server.tool(  # idempotent: shutting down a session that is gone changes nothing (it answers a tool error)
        annotations=ToolAnnotations(
            title="Shut down a session", read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
        )
    )
    async def shutdown(session: str, ctx: Context) -> Annotated[CallToolResult, SessionAction]:
        """Kill the session's kernel (and everything it started) and forget the session (and its record)."""
        await manager_of(ctx).shutdown(session)
        manager_of(ctx).records.end(session)
        await announce_sessions(ctx)
        return action_result(session, "shut_down", f"Session {session!r} was shut down.")

    @server.tool(  # not destructive: the session keeps its state; a second interrupt of an idle session does nothing
        annotations=ToolAnnotations(
            title="Interrupt a running cell", read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
        )
    )
    async def interrupt(session: str, ctx: Context) -> Annotated[CallToolResult, SessionAction]:
        """Interrupt the cell running in a session (like Ctrl-C); the session keeps its state."""
        return action_result(*manager_of(ctx).interrupt(session))

    @server.tool(
        annotations=ToolAnnotations(
            title="Cells a session ran", read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
        )
    )
    async def history(
        session: str,
        ctx: Context,
        last: Annotated[
            int, Field(description=f"How many of the latest cells (and restarts) to show; at most {RECORD_MAX_CELLS}.")
        ] = HISTORY_DEFAULT_CELLS,
    ) -> Annotated[CallToolResult, HistoryResult]:
        """The cells a session ran, oldest first: code, status, a short output excerpt, and where its kernel restarted."""
        manager = manager_of(ctx)
        manager.get(session)
        if not isinstance(last, int) or last < 1:
            raise ToolError(f"last must be a positive number of cells, not {last!r}.")
        result = history_of(manager.records.get(session), session, min(last, RECORD_MAX_CELLS))
        return CallToolResult(
            content=[TextContent(type="text", text=render_history(result))], structured_content=result.model_dump(mode="json")
        )

    @server.tool(  # writes a new file only (or replaces one when asked to overwrite)
        annotations=ToolAnnotations(
            title="Save a session as a notebook", read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
        )
    )
    async def export_notebook(
        session: str,
        path: Annotated[str, Field(description="Absolute path of the .ipynb file to write (~ is expanded).")],
        ctx: Context,
        overwrite: Annotated[bool, Field(description="Replace a file already at path.")] = False,
    ) -> Annotated[CallToolResult, NotebookExport]:
        """Write the session's record as a Jupyter notebook (.ipynb): every cell with its outputs and images,
        and where the kernel restarted."""
        manager = manager_of(ctx)
        manager.get(session)
        target = Path(path).expanduser()
        if not target.is_absolute():
            raise ToolError(f"path must be absolute (the server's working directory is not yours), not {path!r}.")
        record = manager.records.get(session)
        entries, note = record.all_entries() if record else ([], None)
        about = record.about if record else SessionRecords.about(manager.sessions[session])

        def build_and_write() -> tuple[int, int]:
            notebook = notebook_of(about, entries, note)
            return len(notebook["cells"]), write_notebook(target, notebook, overwrite)

        try:  # in a thread: embedded images can make it megabytes, and other sessions' calls go on
            cells, size = await anyio.to_thread.run_sync(build_and_write)
        except FileExistsError:
            raise ToolError(f"{target} already exists; pass overwrite=true to replace it.") from None
        except OSError as exc:
            raise ToolError(f"Cannot write {target}: {exc.strerror or exc}.") from None
        result = NotebookExport(session=session, path=str(target), cells=cells, bytes=size, note=note)
        text = f"Wrote {cells} cells of session {session!r} to {target} ({size} bytes)." + (f" {note}" if note else "")
        return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=result.model_dump(mode="json"))

    # -- resources: each live session's record, as a page and as a notebook

    @server.resource(
        "ipython://sessions/{session}/history", name="session history", mime_type="text/markdown",
        description="The cells a live session ran, with their outputs (Markdown).",
    )
    async def history_resource(session: str, ctx: Context) -> str:
        manager = resource_manager_of(ctx, session)
        return render_history_markdown(manager.records.get(session), session)

    @server.resource(
        "ipython://sessions/{session}/notebook", name="session notebook", mime_type=NOTEBOOK_MIME_TYPE,
        description="A live session's record as a Jupyter notebook (nbformat 4.5, images embedded).",
    )
    async def notebook_resource(session: str, ctx: Context) -> str:
        manager = resource_manager_of(ctx, session)
        record = manager.records.get(session)
        entries, note = record.all_entries() if record else ([], None)
        about = record.about if record else SessionRecords.about(manager.sessions[session])
        return json.dumps(notebook_of(about, entries, note), indent=1)

    @server.resource(
        "ipython://sessions/{session}/live/{after}", name="session live view", mime_type="application/json",
        description="For `ipython-mcp watch`: the record's entries after index AFTER, and the cell running now with its output so far.",
    )
    async def live_resource(session: str, after: str, ctx: Context) -> str:
        manager = resource_manager_of(ctx, session)
        return json.dumps(live_view(manager, session, int(after) if after.isdigit() else 0))

    def resource_manager_of(ctx: Context, session: str) -> SessionManager:
        manager = manager_of(ctx)
        if session not in manager.sessions:
            live = ", ".join(sorted(manager.sessions)) or "none"
            raise ResourceError(f"No live session named {session!r}. Live sessions: {live}.")
        return manager

    async def list_resources(ctx: ServerRequestContext, params: PaginatedRequestParams) -> ListResourcesResult:
        """Two resources per live session of this connection (the templates say how to read any)."""
        resources = []
        for name in sorted(ctx.lifespan_context.sessions):
            history_uri, notebook_uri = session_resources(name)
            resources.append(
                Resource(
                    uri=history_uri, name=f"{name} history", title=f"Session {name}: history", mime_type="text/markdown",
                    description=f"The cells session {name!r} ran, with their outputs.",
                )
            )
            resources.append(
                Resource(
                    uri=notebook_uri, name=f"{name}.ipynb", title=f"Session {name}: notebook", mime_type=NOTEBOOK_MIME_TYPE,
                    description=f"Session {name!r} as a Jupyter notebook.",
                )
            )
        return ListResourcesResult(resources=resources)

    # The SDK has no public way to tailor what it advertises. Sessions come and go, so
    # resources/list changes: say so to handshake-era clients (2026-07-28 ones learn it
    # from `subscriptions/listen`). Prompts: none are served, so they are not offered.
    lowlevel = server._lowlevel_server
    lowlevel.add_request_handler("resources/list", PaginatedRequestParams, list_resources)
    for method in ("prompts/list", "prompts/get"):
        lowlevel._request_handlers.pop(method, None)
    initialization_options = lowlevel.create_initialization_options

    def with_resources_changed(notification_options: NotificationOptions | None = None, *args: Any, **kwargs: Any) -> Any:
        return initialization_options(notification_options or NotificationOptions(resources_changed=True), *args, **kwargs)

    lowlevel.create_initialization_options = with_resources_changed  # type: ignore[method-assign]
    return server


def session_resources(session: str) -> tuple[str, str]:
    """The URIs of a session's history and notebook resources."""
    return f"ipython://sessions/{session}/history", f"ipython://sessions/{session}/notebook"


# --- Over stdio: the SDK's stdio transport, answering lines that are not JSON-RPC ---------


class AnswerParseErrors:
    """The stdio read side, answering lines that are not JSON-RPC with -32700 / -32600.

    The SDK drops such lines silently; a client (or a person typing) deserves to know.
    """

    def __init__(self, inner: Any, write_stream: Any):
        self._inner, self._write = inner, write_stream

    async def receive(self) -> Any:
        while True:
            item = await self._inner.receive()
            if not isinstance(item, Exception):
                return item
            errors = item.errors() if isinstance(item, ValidationError) else []
            if errors and errors[0].get("type") != "json_invalid":
                error = ErrorData(code=INVALID_REQUEST, message="Invalid Request: JSON, but not a JSON-RPC 2.0 message")
            else:
                error = ErrorData(code=PARSE_ERROR, message="Parse error: a line on stdin was not valid JSON")
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await self._write.send(SessionMessage(JSONRPCError(jsonrpc="2.0", id=None, error=error)))

    def __aiter__(self) -> AnswerParseErrors:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> AnswerParseErrors:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> Any:  # last_context and friends
        return getattr(self._inner, name)


async def end_every_kernel_and_leave(live: set[SessionManager]) -> None:
    """Close every manager (its kernels, helpers, files), then exit at once.

    The SDK's stdin reader thread may block in read() for as long as stdin stays open;
    with every kernel gone there is nothing left to wait for.
    """
    with anyio.CancelScope(shield=True):
        for manager in list(live):
            await manager.close_all()
    remove_person_socket()
    logging.shutdown()
    os._exit(0)


async def serve(config: Config, live: set[SessionManager]) -> None:
    """Serve MCP over stdin/stdout until EOF or a signal; ``live`` holds the managers alive."""
    server = build_server(config, live=live)
    person_listener = open_person_socket()  # before any kernel: the umask it sets is process-wide
    async with shared_lifespan(server), anyio.create_task_group() as group:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("received %s; stopping", signal.Signals(signum).name)
                    await end_every_kernel_and_leave(live)

        group.start_soon(stop_on_signal)
        person = PersonSocketServer(server, person_listener) if person_listener is not None else None
        if person is not None:
            group.start_soon(person.serve)
        lowlevel = server._lowlevel_server  # the SDK has no public hook for the read side
        async with stdio_server() as (read_stream, write_stream):
            try:
                await lowlevel.run(AnswerParseErrors(read_stream, write_stream), write_stream, lowlevel.create_initialization_options())
            except anyio.get_cancelled_exc_class():
                # Nothing here cancels this but the SDK's stdio task group, when its writer failed:
                # the client closed its end of our stdout (EPIPE). The stdin reader thread may
                # block in read() for as long as the client keeps stdin open, so end every kernel
                # (the lifespan, shared with the person's socket, is still open) and leave now.
                log.warning("the stdio transport broke (the client closed its end of our stdout, or stdin failed); stopping")
                await end_every_kernel_and_leave(live)
        if person is not None:
            await person.stop()
        group.cancel_scope.cancel()


# --- Over HTTP -------------------------------------------------------------------------------
# The SDK's streamable HTTP app (Starlette, served by uvicorn) with the SDK's bearer check and
# its Host/Origin checks. One SessionManager serves every client of the server: the SDK's HTTP
# session manager enters the server lifespan once for the app, not once per connection.


class BearerToken:
    """The SDK's ``TokenVerifier`` for one shared secret, compared in constant time."""

    def __init__(self, token: str, issuer_url: str):
        self._token = token.encode()
        self.issuer_url = issuer_url  # the SDK's AuthSettings wants one: this server issues its token

    async def verify_token(self, token: str) -> AccessToken | None:
        if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self._token):
            return None
        return AccessToken(token="bearer", client_id="ipython-mcp", scopes=[])  # every holder is one principal


class NoticeDisconnects:
    """ASGI middleware: gives each HTTP request an event set when its client goes away.

    The SDK's 2025-era transport keeps running a request whose response stream the client
    closed; a client that crashed or lost its network means the same as one that cancelled,
    so ``unless_client_leaves`` stops the cell (the 2026 transport already does this itself).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gone = scope[DISCONNECTED] = anyio.Event()

        async def receive_noting_disconnect() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            return message

        await self.app(scope, receive_noting_disconnect, send)


async def unless_client_leaves(ctx: Context, call: Awaitable[CellOutcome]) -> CellOutcome:
    """Await a tool's call, cancelling it (so its cell is interrupted) if its HTTP client disconnects."""
    request = ctx.request_context.request
    gone: anyio.Event | None = getattr(request, "scope", {}).get(DISCONNECTED)
    if gone is None:  # stdio or in-memory: the SDK's cancellation is all there is
        return await call
    outcome: CellOutcome | None = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            await gone.wait()
            log.info("the client of request %s disconnected; cancelling it", ctx.request_id)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        outcome = await call
        group.cancel_scope.cancel()
    if outcome is None:
        raise ToolError("The client disconnected; the call was cancelled and its cell interrupted.")
    return outcome


def loopback_only(host: str) -> bool:
    """True when every address ``host`` names is a loopback one, so only this machine can connect."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def host_header(name: str, port: int | None = None) -> str:
    """``name`` as a Host header spells it: IPv6 addresses in brackets, the port after a colon."""
    ipv6 = False
    with contextlib.suppress(ValueError):
        ipv6 = ipaddress.ip_address(name).version == 6
    spelled = f"[{name}]" if ipv6 else name
    return spelled if port is None else f"{spelled}:{port}"


def unspecified(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_unspecified
    return False


def transport_security(host: str, port: int, allow_hosts: Sequence[str] = ()) -> TransportSecuritySettings:
    """Host and Origin values a request may carry (anything else: 421 / 403), against DNS rebinding
    and pages of other sites. Exact ports: a page on another localhost port is another origin."""
    names = {"127.0.0.1", "localhost", "::1"} if loopback_only(host) or unspecified(host) else set()
    if unspecified(host):  # 0.0.0.0 / ::: clients use this machine's name
        names |= {socket.gethostname(), socket.getfqdn()}
    else:
        names.add(host)
    hosts = [host_header(name, port) for name in sorted(names)]
    hosts += [value for name in allow_hosts for value in (host_header(name), host_header(name, port))]
    origins = [f"{scheme}://{value}" for value in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def token_from(environ: Mapping[str, str]) -> str | None:
    """The bearer token of $IPYTHON_MCP_TOKEN, or None when it is unset (one is then generated)."""
    token = environ.get(TOKEN_ENV)
    if not token:
        return None
    if len(token) < TOKEN_MIN_CHARS or not all("!" <= char <= "~" for char in token):
        raise HttpSetupError(
            f"${TOKEN_ENV} must be at least {TOKEN_MIN_CHARS} characters of visible ASCII (no spaces); "
            f"leave it unset to have one generated."
        )
    return token


def private_runtime_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$XDG_RUNTIME_DIR/ipython-mcp, else $TMPDIR/ipython-mcp-run-<uid>: a folder only this user enters.

    A folder that is a symlink, someone else's, or writable by others is refused: whoever could
    write there could swap the token file for their own.
    """
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        folder = Path(runtime) / "ipython-mcp"
    else:
        folder = Path(tempfile.gettempdir()) / f"ipython-mcp-run-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise HttpSetupError(
            f"Refusing the runtime folder {folder} for the token file: it must be a directory (not a symlink) "
            f"owned by you (uid {os.getuid()}) and writable by nobody else. Remove it, or set XDG_RUNTIME_DIR."
        )
    if info.st_mode & 0o077:
        folder.chmod(0o700)
    return folder


def save_token(folder: Path, port: int, token: str) -> Path:
    """Write the token to ``folder/http-<port>.token``, mode 0600, never through a symlink."""
    path = folder / f"http-{port}.token"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a dead server's file; the folder is ours alone
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return path


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), bound before anything is printed."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
    except OSError as exc:
        raise HttpSetupError(f"Cannot listen on {host_header(host, port)}: {exc}") from exc
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)  # clients that connect at once wait until uvicorn accepts
    except OSError as exc:
        listener.close()
        raise HttpSetupError(f"Cannot listen on {host_header(host, port)}: {exc.strerror or exc}") from exc
    return listener


class QuietUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: ``serve_http`` ends the kernels first, then asks it to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


async def serve_http(
    config: Config, live: set[SessionManager], host: str, port: int, no_auth: bool = False, allow_hosts: Sequence[str] = ()
) -> None:
    """Serve MCP over HTTP until a signal: refuse unsafe flags, bind, print where, serve, clean up.

    One function (~75 lines) because its steps share the listener and the token file, which
    its one ``finally`` removes.
    """
    loopback = loopback_only(host)
    if no_auth and not loopback:
        raise HttpSetupError(
            f"--no-auth is refused with --host {host}: it is not a loopback address, so other machines could "
            "run code here. Leave auth on (the default) to serve other machines."
        )
    token = None if no_auth else token_from(os.environ)
    generated = not no_auth and token is None
    if generated:
        token = secrets.token_urlsafe(32)
    runtime = private_runtime_dir() if generated else None  # before binding: a refusal leaves no socket
    listener = bind_listener(host, port)
    port = listener.getsockname()[1]
    url = f"http://{host_header(socket.gethostname() if unspecified(host) else host, port)}{HTTP_PATH}"
    token_file = save_token(runtime, port, token) if runtime is not None and token is not None else None
    try:
        bearer = BearerToken(token, issuer_url=url.removesuffix(HTTP_PATH)) if token is not None else None
        server = build_server(config, bearer=bearer, live=live)
        app = server.streamable_http_app(
            streamable_http_path=HTTP_PATH,
            max_request_body_size=HTTP_BODY_LIMIT_BYTES,
            transport_security=transport_security(host, port, allow_hosts),
            host=host,
        )
        uv_config = uvicorn.Config(
            NoticeDisconnects(app),
            log_config=None,  # our logging: stderr, --log-level
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=HTTP_SHUTDOWN_GRACE_S,
        )
        http = QuietUvicorn(uv_config)
        lines = [f"ipython-mcp {__version__}: serving MCP over HTTP at {url}"]
        if token is None:
            lines.append(
                f"WARNING: --no-auth: no token is asked. Every program and every user on this machine that can reach "
                f"{host_header(host, port)} can run code as {os.environ.get('USER') or os.getuid()}, read your files and "
                "start processes. Browsers are kept out by the Host/Origin checks only."
            )
        elif generated:
            lines.append(f"Bearer token (shown once; also in {token_file}, mode 0600): {token}")
        else:
            lines.append(f"Bearer token: the value of ${TOKEN_ENV}")
        if not loopback:
            lines.append(
                f"WARNING: listening on {host_header(host, port)}, which other machines can reach. Traffic, the token "
                "included, is unencrypted unless a TLS proxy is in front (README: Over HTTP)."
            )
        lines.append('Clients send the header "Authorization: Bearer <token>" with every request.' if token else "")

        person_listener = open_person_socket()  # before any kernel: the umask it sets is process-wide
        person = PersonSocketServer(server, person_listener) if person_listener is not None else None
        async with shared_lifespan(server), anyio.create_task_group() as group:
            if person is not None:
                group.start_soon(person.serve)

            async def stop_on_signal(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                    task_status.started()
                    async for signum in signals:
                        log.info("received %s; stopping", signal.Signals(signum).name)
                        with anyio.CancelScope(shield=True):
                            for manager in list(live):
                                await manager.close_all()
                        http.handle_exit(signum, None)

            await group.start(stop_on_signal)
            # Printed once SIGTERM is ours: whoever reads the URL may stop the server at once.
            print("\n".join(line for line in lines if line), file=sys.stderr, flush=True)
            await http.serve(sockets=[listener])
            if person is not None:
                await person.stop()
            group.cancel_scope.cancel()
    finally:
        listener.close()
        if token_file is not None:
            with contextlib.suppress(OSError):
                token_file.unlink()


# --- The person's side: attach and watch, over a Unix socket --------------------------------
# Every server also serves MCP (the SDK's streamable HTTP app, under uvicorn) on a Unix socket
# in the private runtime folder, `<runtime folder>/<pid>.sock`: the folder 0700, the socket
# 0600, both the user's, and each connection's peer uid checked (SO_PEERCRED, where the system
# has it), so only the user who runs the server gets in and no token is needed. The socket and
# the stdio (or HTTP) transport share one SessionManager: the server lifespan is entered once
# and handed to both. `ipython-mcp attach` and `watch` are MCP clients of that socket. A cell
# that comes in through it is recorded as the person's: who ran a cell is known from the door
# it came through, so the agent's `execute` has no argument it could use to pass for the person.

PERSON_SOCKET_SUFFIX = ".sock"
PERSON_URL = f"http://localhost{HTTP_PATH}"  # no browser reaches a Unix socket: Host/Origin are not checked
PERSON_DOOR = "ipython_mcp.person"  # key in an ASGI scope: the request came through the person's socket
# `watch` asks what changed this often: it looks live, and each ask is one small JSON read.
WATCH_POLL_S = 0.25
# A person's cell runs until it ends or Ctrl-C stops it; the call still has a bound: a week.
PERSON_CELL_TIMEOUT_S = 7 * 24 * 3600.0
# A live server answers a connect at once; one that is stuck should not hang the terminal.
PERSON_CONNECT_TIMEOUT_S = 10.0
# Unix socket paths are at most 108 bytes on Linux (104 on macOS), the terminating NUL included.
UNIX_PATH_MAX = 104
_person_socket: Path | None = None  # removed on every way out, os._exit included


def through_person_socket(ctx: Context) -> bool:
    """True when the request came through the person's Unix socket (attach), not the agent's transport."""
    return bool(getattr(ctx.request_context.request, "scope", {}).get(PERSON_DOOR))


def live_view(manager: SessionManager, session: str, after: int) -> dict[str, Any]:
    """For `watch`: the record's entries after index ``after``, and the running cell with its output so far."""
    record = manager.records.get(session)
    entries = [entry.to_json() for entry in (record.entries if record else ()) if entry.index > after]
    live = manager.sessions.get(session)
    kernel = live.kernel if live is not None else None
    running = None
    if kernel is not None and kernel.busy and kernel.current is not None:
        execution = kernel.current
        running = {
            "code": execution.code,
            "seconds": round(time.monotonic() - execution.started, 1),
            "output": execution.transcript.text,  # stdout and display lines, as they came
            "output_total": execution.transcript.total,
        }
    counts = [e.execution_count for e in (record.entries if record else ()) if isinstance(e, CellRecord) and e.execution_count]
    return {
        "session": session, "count": record.count if record else 0, "last_execution_count": counts[-1] if counts else None,
        "entries": entries, "running": running,
    }


def peer_uid(sock: Any) -> int | None:
    """The uid of the process at the other end of a Unix socket, or None where the system cannot say."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None  # the folder's and the socket's modes are the guard there
    pid_uid_gid = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", pid_uid_gid)[1]


class SameUserOnly(H11Protocol):
    """uvicorn's HTTP/1.1 protocol that hangs up on a peer who is not this server's user."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        try:
            uid = peer_uid(sock) if sock is not None else None
        except OSError:
            uid = -1
        if uid is not None and uid != os.getuid():
            log.warning("refused a connection to the person's socket from uid %s (not this server's user)", uid)
            transport.abort()


class PersonDoor:
    """ASGI middleware marking each request of the socket app as the person's."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[PERSON_DOOR] = True
        await self.app(scope, receive, send)


def open_person_socket() -> socket.socket | None:
    """Listen on ``<runtime folder>/<pid>.sock`` (0600 in a 0700 folder), or None, logged, when that is unsafe."""
    global _person_socket
    try:
        folder = private_runtime_dir()
    except (HttpSetupError, OSError) as exc:
        log.warning("no person's socket (attach/watch will not find this server): %s", exc)
        return None
    path = folder / f"{os.getpid()}{PERSON_SOCKET_SUFFIX}"
    if len(os.fsencode(path)) >= UNIX_PATH_MAX:
        log.warning("no person's socket: its path %s is too long for a Unix socket; set XDG_RUNTIME_DIR", path)
        return None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead server's, which had our pid; the folder is ours alone
        umask = os.umask(0o177)  # born 0600: never a moment open to others
        try:
            listener.bind(str(path))
        finally:
            os.umask(umask)
        info = path.lstat()
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise OSError(f"{path} is not a socket of ours with mode 0600 (mode {stat.filemode(info.st_mode)})")
        listener.listen(socket.SOMAXCONN)
    except OSError as exc:
        listener.close()
        log.warning("no person's socket (attach/watch will not find this server): %s", exc)
        return None
    _person_socket = path
    return listener


def remove_person_socket() -> None:
    global _person_socket
    if _person_socket is not None:
        with contextlib.suppress(OSError):
            _person_socket.unlink()
        _person_socket = None


@asynccontextmanager
async def shared_lifespan(server: MCPServer) -> Any:
    """Enter the server lifespan once, and hand its SessionManager to every transport that enters it after."""
    lowlevel = server._lowlevel_server  # the SDK has no public way to share a lifespan between transports
    async with lowlevel.lifespan(lowlevel) as manager:

        @asynccontextmanager
        async def entered(_: Any) -> Any:
            yield manager

        lowlevel.lifespan = entered
        yield manager


class PersonSocketServer:
    """The person's door: the SDK's streamable HTTP app on the Unix socket, without a token."""

    def __init__(self, server: MCPServer, listener: socket.socket):
        # The low-level app: in HTTP mode the MCPServer's one would ask for the bearer token too.
        app = server._lowlevel_server.streamable_http_app(
            streamable_http_path=HTTP_PATH,
            max_request_body_size=HTTP_BODY_LIMIT_BYTES,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        uv_config = uvicorn.Config(
            PersonDoor(NoticeDisconnects(app)), http=SameUserOnly, log_config=None, access_log=False,
            server_header=False, timeout_graceful_shutdown=HTTP_SHUTDOWN_GRACE_S,
        )
        self.listener, self.uvicorn = listener, QuietUvicorn(uv_config)
        self.done = anyio.Event()

    async def serve(self) -> None:
        try:
            await self.uvicorn.serve(sockets=[self.listener])
        finally:
            self.listener.close()
            remove_person_socket()
            self.done.set()

    async def stop(self) -> None:
        """Close the door (open attach/watch connections get the HTTP grace), before the kernels end."""
        remove_person_socket()  # no new `attach` finds it
        self.uvicorn.should_exit = True
        with anyio.move_on_after(HTTP_SHUTDOWN_GRACE_S + 1):
            await self.done.wait()


# -- the terminal side: finding servers, attach, watch


def live_person_sockets() -> list[tuple[int, Path]]:
    """(server pid, socket) of each running server of this user; sockets of dead servers are removed."""
    try:
        folder = private_runtime_dir()
    except (HttpSetupError, OSError):
        return []
    found = []
    for path in sorted(folder.glob(f"*{PERSON_SOCKET_SUFFIX}")):
        stem = path.name.removesuffix(PERSON_SOCKET_SUFFIX)
        if not stem.isdigit():
            continue
        if not process_alive(int(stem)):
            with contextlib.suppress(OSError):
                path.unlink()  # a server killed before it could remove it
            continue
        found.append((int(stem), path))
    return found


def where_servers_listen() -> str:
    try:
        return str(private_runtime_dir())
    except (HttpSetupError, OSError) as exc:
        return f"a runtime folder that cannot be used: {exc}"


@asynccontextmanager
async def person_client(path: Path) -> Any:
    """An MCP client (the SDK's streamable HTTP one) of the server listening on ``path``."""
    import httpx2  # noqa: PLC0415 - the server itself never needs the client side
    from mcp import Client  # noqa: PLC0415
    from mcp.client.streamable_http import streamable_http_client  # noqa: PLC0415

    timeout = httpx2.Timeout(PERSON_CONNECT_TIMEOUT_S, read=None)  # a cell may print nothing for hours
    http = httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=str(path)), timeout=timeout)
    async with http, Client(streamable_http_client(PERSON_URL, http_client=http)) as client:
        yield client


class PersonCommandError(Exception):
    """attach/watch cannot go on: no server, no such session, a server gone."""


async def servers_with_sessions() -> list[tuple[int, Path, list[dict[str, Any]]]]:
    """Each running server of this user, with its live sessions (servers that do not answer are left out)."""
    listing = []
    for pid, path in live_person_sockets():
        try:
            with anyio.fail_after(PERSON_CONNECT_TIMEOUT_S):
                async with person_client(path) as client:
                    result = await client.call_tool("list_sessions", {})
        except Exception as exc:  # a server that is stopping, or a socket that is not ours to use
            log.info("server pid %s (%s) did not answer: %s", pid, path, exc)
            continue
        listing.append((pid, path, list((result.structured_content or {}).get("sessions") or [])))
    return listing


async def find_session(name: str, server_pid: int | None) -> tuple[int, Path]:
    listing = await servers_with_sessions()
    if server_pid is not None:
        listing = [entry for entry in listing if entry[0] == server_pid]
    holding = [(pid, path) for pid, path, sessions in listing if any(s.get("name") == name for s in sessions)]
    if len(holding) == 1:
        return holding[0]
    if not listing:
        raise PersonCommandError(
            "No running ipython-mcp server of yours was found" + (f" with pid {server_pid}" if server_pid else "")
            + f" (they listen in {where_servers_listen()})."
        )
    if holding:
        pids = ", ".join(str(pid) for pid, _ in holding)
        raise PersonCommandError(f"Servers {pids} each have a session named {name!r}; choose one with --server PID.")
    live = ", ".join(f"{s.get('name')} (server {pid})" for pid, _, sessions in listing for s in sessions) or "none"
    raise PersonCommandError(f"No live session named {name!r}. Live sessions: {live}.")


def render_sessions_of_servers(listing: list[tuple[int, Path, list[dict[str, Any]]]]) -> str:
    if not listing:
        return f"No running ipython-mcp server of yours was found (they listen in {where_servers_listen()})."
    lines = []
    for pid, path, sessions in listing:
        lines.append(f"server pid {pid} ({path}): {len(sessions)} session{'s' * (len(sessions) != 1)}")
        for s in sessions:
            lines.append(
                f"  {s.get('name')}: env {s.get('env')}, {s.get('status')}, {s.get('exec_count')} cells, up {s.get('uptime_s', 0):.0f} s"
            )
    lines.append("Attach with: ipython-mcp attach SESSION    Follow with: ipython-mcp watch SESSION")
    return "\n".join(lines)


class Terminal:
    """Prints cells as terminal IPython does: ``In [n]: code``, output, ``Out[n]: result``."""

    def __init__(self, colour: bool):
        self.colour = colour

    def paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def header(self, count: int | None, code: str, by: str | None = None) -> str:
        n = count if count is not None else " "
        first, *rest = code.rstrip("\n").split("\n") or [""]
        pad = " " * (len(f"In [{n}]: ") - 5)
        lines = [self.paint(f"In [{n}]: ", "32") + first] + [self.paint(f"{pad}...: ", "32") + line for line in rest]
        if by == "person":
            lines[0] += self.paint("   # run by the person", "2")
        return "\n".join(lines)

    def ending(self, count: int | None, result: str | None, error: str | None, warnings: list[str], images: list[str]) -> str:
        parts = [f"[image: {image}]" for image in images]
        if error:
            parts.append(self.paint(error.rstrip("\n"), "31"))
        if result is not None:
            parts.append(self.paint(f"Out[{count if count is not None else ' '}]: ", "31") + result)
        parts += [self.paint(f"Warning: {warning}", "33") for warning in warnings]
        return "\n".join(parts)

    def execute_result(self, data: dict[str, Any]) -> str:
        """An `execute` reply (its structured content), as the person who ran it sees it."""
        parts = [text.rstrip("\n") for text in (data.get("stdout"), *(data.get("display") or []), data.get("stderr")) if text]
        images = [image.get("path") or image.get("mime_type") or "image" for image in data.get("images") or []]
        warnings = [data["warning"]] if data.get("warning") else []
        ending = self.ending(data.get("execution_count"), data.get("result"), data.get("error"), warnings, images)
        return "\n".join(parts + ([ending] if ending else []))

    @staticmethod
    def shown(outputs: list[dict[str, Any]]) -> str:
        """A recorded cell's stdout and display text, as its running transcript had it."""
        text = ""
        for output in outputs:
            if output.get("type") == "stream" and output.get("name") == "stdout":
                text += output.get("text") or ""
            elif output.get("type") == "display" and (output.get("text") or "").strip():
                text += ("\n" if text and not text.endswith("\n") else "") + output["text"].rstrip() + "\n"
        return text

    def recorded_cell(self, cell: dict[str, Any], already_shown: int | None) -> str:
        """A finished cell of the record; ``already_shown`` characters of its output were printed while it ran."""
        parts = [] if already_shown is not None else [self.header(cell.get("execution_count"), cell.get("code") or "", cell.get("by"))]
        outputs = cell.get("outputs") or []
        rest = self.shown(outputs)[already_shown or 0 :]
        if rest.strip():
            parts.append(rest.rstrip("\n"))
        for output in outputs:
            if output.get("type") == "stream" and output.get("name") == "stderr" and output.get("text"):
                parts.append(self.paint(output["text"].rstrip("\n"), "31"))
        images = [output.get("path") or output.get("mime") for output in outputs if output.get("type") == "image"]
        ending = self.ending(cell.get("execution_count"), cell.get("result"), cell.get("error"), cell.get("warnings") or [], images)
        if ending:
            parts.append(ending)
        return "\n".join(parts)


async def read_live(client: Any, session: str, after: int) -> dict[str, Any]:
    result = await client.read_resource(f"ipython://sessions/{session}/live/{after}")
    return json.loads(result.contents[0].text)


async def watch(session: str, server_pid: int | None, colour: bool) -> None:
    """Follow a session read-only: each cell as it starts, its output as it streams, and how it ended."""
    from mcp.shared.exceptions import MCPError  # noqa: PLC0415

    pid, path = await find_session(session, server_pid)
    terminal = Terminal(colour)
    async with person_client(path) as client:
        view = await read_live(client, session, 1 << 62)
        after = view["count"]
        last_count: int | None = view["last_execution_count"]
        print(f"Watching session {session!r} of server pid {pid} ({after} cells before now; Ctrl-C stops watching).", file=sys.stdout, flush=True)
        if after and view["running"] is not None:
            tail = (await read_live(client, session, after - 1))["entries"]
            if tail and tail[-1].get("status") == "running":
                after -= 1  # a cell left running: shown from its start, then followed to its end
        streaming: dict[str, Any] | None = None  # the running cell printed so far: its code, characters shown
        left_running: int | None = None  # the record index of a cell left running: its entry changes when it ends
        warned = 0  # of that cell's warnings, how many were printed already
        while True:
            try:
                view = await read_live(client, session, min(after, left_running - 1) if left_running else after)
            except MCPError as exc:
                raise PersonCommandError(f"Session {session!r} is gone: {exc}") from None
            for entry in view["entries"]:
                if entry["index"] <= after and (entry["index"] != left_running or entry.get("status") == "running"):
                    continue  # printed already, and no news
                after = max(after, entry["index"])
                if entry.get("kind") == "restart":
                    print(terminal.paint(f"--- the kernel restarted: {entry.get('reason')} ---", "33"), file=sys.stdout, flush=True)
                    streaming = left_running = None
                    continue
                shown = streaming["shown"] if streaming and streaming["code"] == entry.get("code") else None
                if entry["index"] == left_running:
                    entry = {**entry, "warnings": (entry.get("warnings") or [])[warned:]}
                if entry.get("status") == "running":  # its number comes with its end, as in `In [n]` of the agent's next reply
                    entry = {**entry, "execution_count": (last_count or 0) + 1}
                print(terminal.recorded_cell(entry, shown), file=sys.stdout, flush=True)
                if entry.get("status") == "running":  # `wait` follows it: keep streaming it, print its end later
                    left_running, warned = entry["index"], len(entry.get("warnings") or [])
                    streaming = {"code": entry.get("code"), "shown": len(terminal.shown(entry.get("outputs") or [])), "total": 0}
                else:
                    print(file=sys.stdout, flush=True)
                    streaming = None
                    if entry["index"] == left_running:  # its end, fetched by `wait` (or "ended": nobody fetched it)
                        left_running = None
                if entry.get("status") != "running":
                    last_count = entry.get("execution_count") or last_count
            running = view["running"]
            if running is not None:
                if streaming is None or streaming["code"] != running["code"]:
                    print(terminal.header((last_count or 0) + 1, running["code"]), file=sys.stdout, flush=True)
                    streaming = {"code": running["code"], "shown": 0, "total": 0}
                elif running["output_total"] < streaming["total"]:  # cleared by clear_output(), or taken by `wait`
                    streaming["total"] = running["output_total"]
                new = running["output_total"] - streaming["total"]
                if new > 0:
                    text = running["output"][-new:]
                    print(text, end="", file=sys.stdout, flush=True)
                    streaming["shown"] += len(text)
                    streaming["total"] = running["output_total"]
            await anyio.sleep(WATCH_POLL_S)


def input_is_complete(code: str) -> bool:
    """Whether Enter should run ``code`` (as IPython decides: an open block or bracket waits for more)."""
    from IPython.core.inputtransformer2 import TransformerManager  # noqa: PLC0415

    if "\n" in code:
        return not code.rsplit("\n", 1)[1].strip()  # a cell of several lines ends with an empty one, as in Python's REPL
    status, _ = TransformerManager().check_complete(code + "\n")
    return status != "incomplete"


async def attach(session: str, server_pid: int | None, colour: bool) -> None:
    """An IPython-style prompt on the live session: the person's cells run on the agent's kernel."""
    from prompt_toolkit import PromptSession  # noqa: PLC0415 - IPython brings prompt_toolkit
    from prompt_toolkit.formatted_text import ANSI  # noqa: PLC0415
    from prompt_toolkit.history import InMemoryHistory  # noqa: PLC0415
    from prompt_toolkit.key_binding import KeyBindings  # noqa: PLC0415
    from prompt_toolkit.lexers import PygmentsLexer  # noqa: PLC0415
    from pygments.lexers import PythonLexer  # noqa: PLC0415

    pid, path = await find_session(session, server_pid)
    terminal = Terminal(colour)
    keys = KeyBindings()

    @keys.add("enter")
    def _(event: Any) -> None:
        buffer = event.current_buffer
        if buffer.document.is_cursor_at_the_end and input_is_complete(buffer.text):
            buffer.validate_and_handle()
        else:
            buffer.insert_text("\n")

    prompt = PromptSession(
        history=InMemoryHistory(), multiline=True, key_bindings=keys,
        lexer=PygmentsLexer(PythonLexer) if colour else None, prompt_continuation=lambda width, *_: "...: ".rjust(width),
    )
    async with person_client(path) as client:
        print(
            f"Attached to session {session!r} of server pid {pid}: the agent's kernel, variables and all.\n"
            "Your cells queue behind the agent's and are recorded as yours. Ctrl-C stops your running cell; "
            "Ctrl-D detaches (the session goes on).",
            file=sys.stdout, flush=True,
        )
        while True:
            count = await next_count(client, session)
            try:
                code = await prompt.prompt_async(ANSI(terminal.paint(f"In [{count}]: ", "32")))
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            code = code.rstrip()
            if not code:
                continue
            await next_count(client, session)  # still there: `execute` would start a new session of that name
            await run_person_cell(client, session, code, terminal)
            print(file=sys.stdout, flush=True)
    print(f"Detached from session {session!r}; it goes on in server pid {pid}.", file=sys.stdout, flush=True)


async def next_count(client: Any, session: str) -> int:
    """The session's next execution count; PersonCommandError once the agent shut the session down."""
    history = await client.call_tool("history", {"session": session, "last": 1})
    if history.is_error:
        gone = " ".join(getattr(block, "text", "") for block in history.content)
        raise PersonCommandError(f"Session {session!r} is gone ({gone}); detached.")
    entries = (history.structured_content or {}).get("entries") or []
    counts = [entry["execution_count"] for entry in entries if entry.get("execution_count")]
    return (counts[-1] if counts else 0) + 1


async def run_person_cell(client: Any, session: str, code: str, terminal: Terminal) -> None:
    """Run a cell as the person, its output shown as it streams; Ctrl-C cancels the call, which interrupts the cell."""
    arguments = {"session": session, "code": code, "timeout_s": PERSON_CELL_TIMEOUT_S}
    after = (await read_live(client, session, 1 << 62))["count"]
    streamed = {"shown": 0, "total": 0}  # of this cell's stdout and display text, printed while it ran
    result = None
    with anyio.open_signal_receiver(signal.SIGINT) as signals:
        async with anyio.create_task_group() as group:

            async def on_ctrl_c() -> None:
                async for _ in signals:
                    group.cancel_scope.cancel()  # the SDK tells the server, which interrupts the cell
                    return

            async def follow() -> None:  # as `watch` does; the cell may also wait behind the agent's
                while True:
                    await anyio.sleep(WATCH_POLL_S)
                    running = (await read_live(client, session, 1 << 62))["running"]
                    if running is None or running["code"] != code:
                        continue
                    new = running["output_total"] - streamed["total"]
                    if new > 0:
                        text = running["output"][-new:]
                        print(text, end="", file=sys.stdout, flush=True)
                        streamed["shown"] += len(text)
                    streamed["total"] = running["output_total"]

            group.start_soon(on_ctrl_c)
            group.start_soon(follow)
            result = await client.call_tool("execute", arguments)
            group.cancel_scope.cancel()
    if result is None:
        if streamed["shown"]:
            print(file=sys.stdout, flush=True)
        print(terminal.paint("KeyboardInterrupt: your cell was interrupted; the session keeps its state.", "31"), file=sys.stdout, flush=True)
        return
    # The record has the cell whole, outputs in the order it made them: show what was not streamed.
    entries = (await read_live(client, session, after))["entries"]
    cell = next((e for e in reversed(entries) if e.get("kind") == "cell" and e.get("by") == "person" and e.get("code") == code), None)
    if cell is not None:
        text = terminal.recorded_cell(cell, streamed["shown"])
    elif result.structured_content:
        text = terminal.execute_result(dict(result.structured_content))
    else:
        text = "\n".join(getattr(block, "text", "") for block in result.content)
    if text:
        print(text, file=sys.stdout, flush=True)


def person_command(args: argparse.Namespace) -> int:
    """``ipython-mcp attach [SESSION]`` and ``ipython-mcp watch SESSION``."""
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    async def run() -> None:
        if args.command == "attach" and args.session is None:
            print(render_sessions_of_servers(await servers_with_sessions()), file=sys.stdout)
        elif args.command == "attach":
            await attach(args.session, args.server, colour)
        else:
            await watch(args.session, args.server, colour)

    try:
        anyio.run(run)
    except BaseException as exc:  # noqa: BLE001 - said in a line, not a traceback
        # The SDK's task groups wrap what happened in exception groups (a backport before 3.11).
        while isinstance(getattr(exc, "exceptions", None), tuple) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if isinstance(exc, KeyboardInterrupt):
            return 0
        if not isinstance(exc, Exception):
            raise
        if isinstance(exc, PersonCommandError):
            print(f"ipython-mcp {args.command}: {exc}", file=sys.stderr)
        else:  # a server that went away mid-way
            print(f"ipython-mcp {args.command}: the server did not answer ({type(exc).__name__}: {exc}).", file=sys.stderr)
        return 1
    return 0


# --- Command line: the greeting for a person at a terminal, arguments, export, main -------


HUMAN_GREETING = """ipython-mcp {version}: an MCP server speaking JSON-RPC on stdin/stdout.
It is meant to be started by an MCP client, not used by hand. To connect one:
  Claude Code:  claude mcp add ipython -- {command}
  Any client:   {{"mcpServers": {{"ipython": {{"command": {program}, "args": {args}}}}}}}
  Inspector:    npx -y @modelcontextprotocol/inspector --cli {command} --method tools/list
Serving on stdio now; press Ctrl-D or Ctrl-C to stop."""


def greeting() -> str:
    """How to connect a client to this server, started the way it was started now."""
    launcher = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if launcher is not None and launcher.suffix != ".py" and launcher.is_file():
        argv = [str(launcher)]  # an installed `ipython-mcp` script
    else:
        argv = ["uv", "run", str(Path(__file__).resolve())]
    return HUMAN_GREETING.format(
        version=__version__, command=" ".join(argv), program=json.dumps(argv[0]), args=json.dumps(argv[1:])
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # A flat list of options, each with its help: long, and easiest to read as it is.
    parser = argparse.ArgumentParser(prog="ipython-mcp", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands (without one, the server runs)")
    export = commands.add_parser(
        "export", help="write a live session's record as a Jupyter notebook (.ipynb)",
        description="Write the record of SESSION, a live session of a running server, as a Jupyter notebook "
        "(nbformat 4.5): its cells in order with their outputs and images, and where its kernel restarted.",
    )
    export.add_argument("session", metavar="SESSION")
    export.add_argument(
        "path", metavar="PATH", nargs="?", type=Path, default=None, help="the .ipynb to write (default: ./SESSION.ipynb)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace a file already at PATH")
    attach = commands.add_parser(
        "attach", help="an IPython prompt on a live session of a running server (without SESSION: list them)",
        description="Run cells in SESSION, a live session of a running server, on the same kernel as the agent: "
        "your cells see its variables and it sees yours. Ctrl-C interrupts your cell; Ctrl-D detaches. "
        "Without SESSION, list the live sessions of your running servers.",
    )
    attach.add_argument("session", metavar="SESSION", nargs="?")
    watch = commands.add_parser(
        "watch", help="follow a live session read-only: each cell and its output as it runs",
        description="Show each cell SESSION runs, with its output as it streams, as a terminal IPython would. Ctrl-C stops watching.",
    )
    watch.add_argument("session", metavar="SESSION")
    for person in (attach, watch):
        person.add_argument("--server", type=int, metavar="PID", help="the server's pid, when several have a session of that name")
    # SUPPRESS: given before or after `export`, the value is the same one.
    export.add_argument(
        "--output-dir", type=Path, default=argparse.SUPPRESS, help="the server's --output-dir, if it was given one"
    )
    parser.add_argument("--envs-dir", type=Path, default=None, help="folder of named envs (default: $IPYTHON_MCP_ENVS_DIR or ~/envs)")
    parser.add_argument(
        "--config", type=Path, default=None,
        help="TOML file of envs behind launchers: ssh, docker exec, bwrap... (default: $IPYTHON_MCP_CONFIG or "
        "$XDG_CONFIG_HOME/ipython-mcp/config.toml, when it exists)",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where the full text of cut output, and images, are saved (default: $TMPDIR/ipython-mcp-<uid>)"
    )
    parser.add_argument(
        "--spill-file-limit",
        type=byte_count,
        default=None,
        help="bytes one saved file may hold, e.g. 50M (default 50M, or $IPYTHON_MCP_SPILL_FILE_LIMIT)",
    )
    parser.add_argument(
        "--output-dir-limit",
        type=byte_count,
        default=None,
        help="bytes all of this server's saved files may hold; the oldest go first (default 1G, or $IPYTHON_MCP_OUTPUT_DIR_LIMIT)",
    )
    parser.add_argument("--output-limit", type=int, default=DEFAULT_OUTPUT_LIMIT_CHARS, help="characters of output returned per call (default %(default)s)")
    parser.add_argument(
        "--auto-install-ipykernel",
        action="store_true",
        default=None,
        help="install ipykernel into a target env that lacks IPython (or set IPYTHON_MCP_AUTO_INSTALL=1)",
    )
    parser.add_argument(
        "--spare-kernels",
        type=int,
        default=None,
        help="default-env kernels kept started ahead of need, so a new session starts at once (default: 0 where a fork server "
        "starts kernels in tens of milliseconds, else 1; or $IPYTHON_MCP_SPARE_KERNELS; 0 turns it off)",
    )
    parser.add_argument(
        "--no-fork-server",
        dest="fork_server",
        action="store_false",
        default=None,
        help="spawn every kernel as a fresh interpreter rather than fork it from a process of that "
        "interpreter that has imported IPython once (Linux; or set IPYTHON_MCP_FORK_SERVER=0)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        help=f"most sessions alive at once (default {DEFAULT_MAX_SESSIONS}, or $IPYTHON_MCP_MAX_SESSIONS)",
    )
    parser.add_argument(
        "--idle-timeout-s",
        type=float,
        default=None,
        help="stop a session's kernel after this many idle seconds; its next call starts a fresh one (default: never, or $IPYTHON_MCP_IDLE_TIMEOUT_S)",
    )
    parser.add_argument("--log-level", default=os.environ.get("IPYTHON_MCP_LOG_LEVEL", "WARNING"), help="stderr log level (default WARNING)")
    http = parser.add_argument_group("over HTTP", "with --transport http (MCP streamable HTTP at /mcp)")
    http.add_argument("--transport", choices=("stdio", "http"), default="stdio", help="stdio (default) or http")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need a TLS proxy)")
    http.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one, printed on stderr)")
    http.add_argument(
        "--no-auth",
        action="store_true",
        help=f"ask no bearer token (loopback only: any local user or program can then run code); else ${TOKEN_ENV} or generated",
    )
    http.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host name clients (or a proxy) use to reach this server; repeatable",
    )
    parser.add_argument("--version", action="version", version=f"ipython-mcp {__version__}")
    return parser.parse_args(argv)


def export_command(args: argparse.Namespace) -> int:
    """``ipython-mcp export SESSION [PATH]``: runs apart from the server, reading its files."""
    output_dir = Path(os.path.abspath(args.output_dir.expanduser())) if args.output_dir else Config().output_dir
    try:
        found, target, cells, size, note = export_session(args.session, args.path, output_dir, args.overwrite)
    except (ExportFailed, ToolError) as exc:
        print(f"ipython-mcp export: {exc}", file=sys.stderr)
        return 1
    if note:
        print(note, file=sys.stderr)
    print(f"Wrote {cells} cells of session {found.session!r} (server pid {found.server_pid}) to {target} ({size} bytes).", file=sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not BOOTSTRAP.is_file():  # say so now, not as a puzzling env_error at the first call
        sys.exit(
            f"ipython-mcp: {BOOTSTRAP.name} is missing: it must sit beside {Path(__file__).name} "
            f"(looked for {BOOTSTRAP}). The two files go together: copy both, or run from a clone of the repository."
        )
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "export":
        sys.exit(export_command(args))
    if args.command in ("attach", "watch"):
        sys.exit(person_command(args))
    config = Config(**({} if args.fork_server is None else {"fork_server": args.fork_server}))  # before it picks spare_kernels
    try:
        given = args.config or (Path(os.environ["IPYTHON_MCP_CONFIG"]).expanduser() if os.environ.get("IPYTHON_MCP_CONFIG") else None)
        config.launchers = load_launch_config(given or config_path_default(), required=given is not None)
    except ConfigError as exc:
        sys.exit(f"ipython-mcp: {exc}")
    if args.envs_dir is not None:
        config.envs_dir = args.envs_dir.expanduser()
    if args.output_dir is not None:
        config.output_dir = Path(os.path.abspath(args.output_dir.expanduser()))  # as Config does
    if args.spill_file_limit is not None:
        config.spill_file_limit = args.spill_file_limit
    if args.output_dir_limit is not None:
        config.output_dir_limit = args.output_dir_limit
    config.output_limit = max(args.output_limit, 100)
    if args.auto_install_ipykernel:
        config.auto_install = True
    if args.spare_kernels is not None:
        config.spare_kernels = max(args.spare_kernels, 0)
    if args.max_sessions is not None:
        config.max_sessions = max(args.max_sessions, 1)
    if args.idle_timeout_s is not None:
        config.idle_timeout_s = args.idle_timeout_s if math.isfinite(args.idle_timeout_s) and args.idle_timeout_s > 0 else None
    if args.transport == "stdio" and sys.stdin.isatty():
        print(greeting(), file=sys.stderr)
    live: set[SessionManager] = set()  # the server's managers, while their lifespans run
    try:
        if args.transport == "http":
            anyio.run(serve_http, config, live, args.host, args.port, args.no_auth, args.allow_host)
        else:
            anyio.run(serve, config, live)
    except KeyboardInterrupt:
        pass
    except HttpSetupError as exc:
        print(f"ipython-mcp: {exc}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)
    finally:
        remove_person_socket()
        for manager in list(live):  # a last resort: each lifespan has closed its own manager
            manager.kill_all_now()
    # A stdin reader thread may still block in read(); nothing is left to clean up.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
