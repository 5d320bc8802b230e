"""Kernel side of ipython-mcp: one IPython shell behind a JSON-lines pipe.

The server runs ``<target python> bootstrap_kernel.py`` with three pipes, or, behind a
launcher (ssh, docker exec), ``<python> -u -c <loader>`` that reads this source from
stdin and runs it; the server's own output pipes then stay local, and this kernel makes
its own (no IPYTHON_MCP_OUTPUT_FDS). This file
must stay importable by any Python >= 3.9 that has IPython, and must not import the
server: it is the only code that runs inside the user's environment.

File descriptors, after start-up:
    0        /dev/null, so ``input()``-like reads and ``!cat`` see end of file
    1, 2     pipes read by a relay thread in this process; every byte user code,
             C extensions or child processes write there reaches the server as
             ``stream`` messages
    proto_in / proto_out
             private duplicates of the original stdin/stdout (close-on-exec): the
             protocol channel, which user code cannot reach by printing
    log      duplicate of the original stderr: faulthandler dumps, start-up errors
These private fds (and the relay's pipe ends) sit just under min(RLIMIT_NOFILE, 1024),
far from the low numbers open() hands out. A cell can still close them
(``os.closerange(3, 65536)``) or put its own file on their numbers (``os.dup2``):
each is checked (device and inode) before use, and a kernel that lost one exits
with PROTOCOL_LOST_EXIT rather than write a protocol line into the user's file.
Only the kernel process speaks the protocol: a child forked by a cell sends
nothing, and ends (``os._exit``) when it comes back from the cell.

Messages (one JSON object per line, ``kind`` says which):
    server -> kernel   execute {id, code, max_result_chars, image_budget, spill_path,
                                spill_limit, spill_inline}   (where to save a cut
                                result's full text, new and private, and at most how
                                many bytes; with spill_inline, the server is on another
                                machine: the text goes in the reply, result_file_text)
                       interrupt {id, group_signalled}
                           stops cell ``id`` (now, or when it would start); when the
                           server could not signal the process group itself, the
                           kernel signals it (pipes that carry no signals: ssh, exec)
    kernel -> server   hello {protocol, python_version, ipython, error,
                              missing, pip, min_python, min_ipython}
                              (first line; ``missing`` says what is absent or
                              too old: "python" or "ipython"; ``pip`` whether
                              pip is there; ``min_*`` the versions this kernel
                              needs, "3.9", so the server's hints name them)
                       stream {name, text}     stdout/stderr of the running cell
                       display {data}          mime bundle shown by the cell
                       clear {wait}            clear_output() was called
                       done {id, status, result, result_images, error,
                             execution_count, notes, result_file {path, bytes}}

When the protocol input reaches end of file the server is gone: the kernel kills
its own process group (itself and anything it started) so no process outlives it.
The hello is preceded by a newline, so start-up output of the env (a sitecustomize
banner without a newline) stays on a line of its own.
On Linux the kernel also asks to be SIGKILLed when the server ends (PR_SET_PDEATHSIG),
for when no thread of it can run (a cell holding the GIL in C code).
"""

import codecs
import contextlib
import fcntl
import json
import os
import queue
import re
import resource
import select
import signal
import struct
import sys
import termios
import threading
import time
import warnings

PROTOCOL_VERSION = 1
MIN_PYTHON = (3, 9)
MIN_IPYTHON = (7, 0)
# Largest chunk the relay reads from a cell's stdout/stderr pipe at once: big
# enough that a 10 MB print costs a few hundred messages, small enough that one
# message stays far below the server's line limit.
RELAY_CHUNK_BYTES = 256 * 1024
# Largest text (traceback, display text) and image one message carries: far below
# the server's line limit, whatever a cell produces.
MAX_TEXT_CHARS = 2_000_000
MAX_IMAGE_B64_CHARS = 48 * 1024 * 1024
# Notes (image downscaled, output cut...) one reply carries, so its warning stays short.
MAX_NOTES = 20
# Pause after output wakes the relay, when less than a chunk's worth is waiting, so
# small writes travel together.
RELAY_GATHER_S = 0.002
RELAY_GATHER_BELOW_BYTES = 32 * 1024
# Bounds the end-of-cell drain (rounds of RELAY_CHUNK_BYTES) when a background
# process keeps writing: its later output still flows, just not inside this reply.
DRAIN_MAX_ROUNDS = 64
# Private fds go just under this ceiling (or RLIMIT_NOFILE, when lower): above what
# open() hands out, and below select()'s FD_SETSIZE, which the relay relies on.
PRIVATE_FD_CEILING = 1024
PRIVATE_FD_ROOM = 16  # 7 are used: protocol in/out, log, 2 relay read ends, 2 spares
# Exit status of a kernel whose protocol fd a cell closed or replaced (sysexits EX_PROTOCOL).
PROTOCOL_LOST_EXIT = 76
# The process that speaks the protocol; a child forked by a cell has another pid.
KERNEL_PID = os.getpid()
# Installer output kept for the error of a failed `%pip` (its last lines say why).
PIP_ERROR_TAIL_LINES = 25
# After an interrupt, time a running installer gets to stop by itself before it is
# killed; below the server's grace, so the cell still ends on its own.
PIP_INTERRUPT_GRACE_S = 1.0
THIS_FILE = os.path.basename(__file__)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# A plain text form that is only Python's default repr says nothing (the server's
# display_text has the same rule).
DEFAULT_REPR = re.compile(r"<[\w.<>]+ object( at 0x[0-9a-fA-F]+)?>|<[\w.<>]+ at 0x[0-9a-fA-F]+>")
NO_STDIN_MESSAGE = (
    "This session has no standard input: {what} cannot be answered, because no person "
    "is typing at this kernel. Pass the value in code instead (for example `name = 'value'`)."
)


class StdinNotAvailable(RuntimeError):
    """Raised by input(), getpass() and breakpoint(): nobody can answer them."""


def set_cloexec_nonblocking(fd, nonblocking):
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    if nonblocking:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def in_forked_child():
    return os.getpid() != KERNEL_PID


class PrivateFds:
    """The kernel's own fds, moved high and remembered by (device, inode).

    ``check(fd)`` before each use: a fd that a cell closed, or on whose number it put a
    file of its own, stops the kernel (``lost``) instead of being written to or read.
    """

    def __init__(self):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        top = PRIVATE_FD_CEILING if soft == resource.RLIM_INFINITY else min(soft, PRIVATE_FD_CEILING)
        self.base = max(3, top - PRIVATE_FD_ROOM)
        self.identities = {}
        self.names = {}
        self.log_fd = None
        self.stderr_pipe = None  # identity of the pipe behind fd 2, for a last word when the log is gone

    def take(self, fd, name, close_original=False):
        """A close-on-exec duplicate of ``fd`` high up, remembered as ours."""
        try:
            new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, self.base)
        except OSError:  # a tiny RLIMIT_NOFILE: the lowest free fd, still checked before use
            new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        if close_original:
            os.close(fd)
        self.identities[new] = identity(new)
        self.names[new] = name
        return new

    def is_ours(self, fd):
        try:
            return identity(fd) == self.identities[fd]
        except OSError:
            return False

    def check(self, fd):
        if not self.is_ours(fd):
            self.lost(fd)

    def check_all(self):
        for fd in self.identities:
            self.check(fd)

    def log(self, text):
        """A line for the server's log (the kernel's stderr), if that fd is still ours."""
        if self.log_fd is not None and self.is_ours(self.log_fd):
            with contextlib.suppress(OSError):
                os.write(self.log_fd, ("ipython-mcp kernel: %s\n" % text).encode("utf-8", "backslashreplace"))

    def lost(self, fd):
        """A cell closed or replaced one of our fds: say so where it is safe, and exit."""
        how = "closed" if not fd_open(fd) else "put a file of its own on"
        text = (
            "a cell %s the kernel's %s (fd %d); the kernel stopped rather than write its protocol to, or read "
            "it from, a file that is not its own. Close only the fds your code opened (not os.closerange(3, ...))."
            % (how, self.names.get(fd, "private pipe"), fd)
        )
        if in_forked_child():
            EXIT(PROTOCOL_LOST_EXIT)  # a fork's copy: the kernel itself is still fine
        if self.log_fd is not None and self.is_ours(self.log_fd):
            self.log(text)
        else:  # closed with the rest: the stderr pipe still reaches the server, which keeps what is left in it
            with contextlib.suppress(OSError):
                if identity(2) == self.stderr_pipe:
                    os.write(2, ("\nipython-mcp kernel: %s\n" % text).encode("utf-8", "backslashreplace"))
        EXIT(PROTOCOL_LOST_EXIT)  # the real one: the patched os._exit would use the relay


def identity(fd):
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


def fd_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def take_standard_fds():
    """Move the protocol to private fds and give user code fresh fds 0, 1 and 2."""
    private = PrivateFds()
    proto_in = private.take(0, "protocol input pipe")
    proto_out = private.take(1, "protocol output pipe")
    log = private.log_fd = private.take(2, "log pipe")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    readers = {}
    spares = {}
    # The server may hand us the output pipes (it keeps their read ends, to collect
    # what we never forwarded if we die by a signal); otherwise make our own.
    given = os.environ.pop("IPYTHON_MCP_OUTPUT_FDS", "")
    pipes = [int(fd) for fd in given.split(",")] if given else []
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if len(pipes) >= 2:
            read_end, write_end = pipes.pop(0), pipes.pop(0)
        else:
            read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        # Kept (close-on-exec) so a cell that closes fd 1 neither ends the pipe nor
        # loses printing for good: restore_standard_fds() puts it back.
        write_end = private.take(write_end, "spare write end of the %s pipe" % name, close_original=True)
        read_end = private.take(read_end, "read end of the %s pipe" % name, close_original=True)
        spares[fd] = write_end
        set_cloexec_nonblocking(write_end, nonblocking=False)
        set_cloexec_nonblocking(read_end, nonblocking=True)
        readers[read_end] = name
    private.stderr_pipe = identity(2)
    return private, proto_in, proto_out, log, readers, spares


def restore_standard_fds(spares, private):
    """After a cell: fds 1 and 2 point at our pipes again, whatever the cell did to them."""
    for fd, spare in spares.items():
        private.check(spare)  # never dup2 a user's file onto fd 1
        try:
            same = os.path.sameopenfile(fd, spare)
        except OSError:  # closed by the cell
            same = False
        if not same:
            os.dup2(spare, fd)


def pending_bytes(fds):
    """Bytes waiting in these pipes (FIONREAD); 0 where the platform cannot tell."""
    total = 0
    for fd in fds:
        try:
            total += struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            pass
    return total


class Wire:
    """Writes protocol messages; several threads send, so writes are serialised, and an
    interrupt never lands halfway through a line (the rest of the line would be lost)."""

    def __init__(self, fd, state, private):
        self.fd = fd
        self.state = state
        self.private = private
        self.lock = threading.Lock()

    def send(self, message, newline_first=False):
        if in_forked_child():  # a fork of the kernel (its locks may be held forever): silent
            return
        data = (("\n" if newline_first else "") + json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        view = memoryview(data)
        with self.state.no_interrupts(), self.lock:
            self.private.check(self.fd)
            while view:
                view = view[os.write(self.fd, view):]


class Relay:
    """Forwards what lands on fds 1 and 2 to the server as ``stream`` messages."""

    def __init__(self, wire, readers):
        self.wire = wire
        self.readers = readers
        self.decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in readers}
        self.lock = threading.Lock()

    def _pump(self, fds):
        """Read what is in the pipes now and send it (caller holds the lock)."""
        for fd in fds:
            self.wire.private.check(fd)  # never read (and forward) a user's file
            chunks = []
            size = 0
            while size < RELAY_CHUNK_BYTES:
                try:
                    chunk = os.read(fd, RELAY_CHUNK_BYTES - size)
                except BlockingIOError:
                    break
                if not chunk:  # cannot happen while we hold a spare write end
                    break
                chunks.append(chunk)
                size += len(chunk)
            if chunks:
                text = self.decoders[fd].decode(b"".join(chunks))
                if text:
                    self.wire.send({"kind": "stream", "name": self.readers[fd], "text": text})

    def end_of_cell(self):
        """Drain, then flush a character cut in half by the cell's end (as U+FFFD)."""
        self.drain()
        with self.lock:
            for fd, decoder in self.decoders.items():
                text = decoder.decode(b"", final=True)
                decoder.reset()
                if text:
                    self.wire.send({"kind": "stream", "name": self.readers[fd], "text": text})

    def drain(self):
        """Flush Python's buffers, then forward everything already written.

        Taking the lock first matters: the relay thread may have read a chunk and
        not yet sent it, and that chunk must go out before the caller's next message.
        In a forked child only Python's buffers are flushed: the kernel forwards the rest.
        """
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if in_forked_child():
            return
        # A pump stops after RELAY_CHUNK_BYTES per fd; repeat until the pipes are
        # empty, but give up on a background writer that never stops.
        for _ in range(DRAIN_MAX_ROUNDS):
            with self.wire.state.no_interrupts(), self.lock:
                ready, _, _ = self._select(0)
                if not ready:
                    return
                self._pump(ready)

    def _select(self, timeout=None):
        try:
            return select.select(list(self.readers), [], [], timeout)
        except (OSError, ValueError):  # a cell closed a read end: stop loudly, never read a reused fd
            for fd in self.readers:
                self.wire.private.check(fd)
            raise

    def run(self):
        while True:
            ready, _, _ = self._select()
            # Let a burst of small prints gather into one message (100k prints: ~30x
            # fewer messages); a big write is read at once. The end-of-cell drain does
            # not wait for this pause.
            if pending_bytes(ready) < RELAY_GATHER_BELOW_BYTES:
                time.sleep(RELAY_GATHER_S)
            with self.lock:
                self._pump(ready)  # non-blocking: drain() may have emptied them meanwhile


class KernelState:
    """What the SIGINT handler, the request reader and the main loop agree on.

    A SIGINT can arrive before the cell it was meant for has started (the request is
    still in the pipe). The server therefore also sends ``interrupt {id}`` after the
    ``execute {id}`` on the same ordered pipe: the reader either interrupts the cell
    now running, or marks the id so the cell is refused when its turn comes.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.critical = 0  # > 0 while the main thread writes to the wire
        self.deferred = False  # a SIGINT arrived meanwhile: raise it when the write is done
        self.executing = False
        self.current_id = None
        self.interrupted = False  # the current cell already got its KeyboardInterrupt
        self.last_finished_id = 0
        self.cancelled_ids = set()

    def on_sigint(self, signum, frame):
        # Only user code is interrupted; a stray SIGINT while idle must not kill the loop.
        __tracebackhide__ = True  # IPython leaves this frame out of the traceback
        if self.executing:
            if self.critical:
                self.deferred = True
                return
            self.interrupted = True
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def no_interrupts(self):
        """Hold a SIGINT of the main thread until the block is done (other threads pass)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.critical += 1
        try:
            yield
        except BaseException:
            self.critical -= 1
            if not self.critical:
                self.deferred = False  # the block failed anyway; a stale interrupt must not hit the next cell
            raise
        self.critical -= 1
        if not self.critical and self.deferred:
            self.deferred = False
            if self.executing:
                self.interrupted = True
                raise KeyboardInterrupt

    def begin(self, request_id):
        """Start a cell; False when it was interrupted before it began."""
        with self.lock:
            if request_id in self.cancelled_ids:
                self.cancelled_ids.discard(request_id)
                return False
            self.current_id, self.interrupted, self.executing, self.deferred = request_id, False, True, False
            return True

    def end(self, request_id):
        with self.lock:
            self.executing, self.current_id = False, None
            self.last_finished_id = max(self.last_finished_id, request_id)

    def interrupt(self, request_id, group_signalled):
        with self.lock:
            if request_id is None:
                request_id = self.current_id
            if request_id is None or request_id <= self.last_finished_id:
                return  # stale: that cell is over
            if request_id != self.current_id:
                self.cancelled_ids.add(request_id)  # not started yet
                return
            if self.interrupted:
                return  # the signal got there first
            # Signal while holding the lock: the cell cannot end (and the next begin)
            # between the check above and the signal.
            if group_signalled or os.getpgid(0) != os.getpid():
                os.kill(os.getpid(), signal.SIGINT)
            else:  # no signal came with the message (ssh, container exec): reach children too
                os.killpg(os.getpid(), signal.SIGINT)


def die_with_group():
    """The server is gone: take down this kernel and everything it started."""
    try:
        if os.path.basename(PIP_SHIMS).startswith("ipython-mcp-pip-"):  # nobody else will remove it
            import shutil

            shutil.rmtree(PIP_SHIMS, ignore_errors=True)
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
    finally:
        os._exit(0)


def die_with_server():
    """Linux: have this kernel SIGKILLed the moment the server that spawned it ends.

    The watch of the protocol pipe (read_requests) needs a thread that can run: a cell
    holding the GIL in C code (a catastrophic regex) would keep the kernel alive for
    hours after its server was killed. PR_SET_PDEATHSIG needs nothing of us. Set here,
    first thing, rather than in the server's preexec_fn, which would make every spawn a
    full fork() of the server (~30 ms with its event loop blocked). The server names
    itself in IPYTHON_MCP_SERVER_PID (local children only); a parent other than it means
    either a wrapper script that did not exec (its own death then kills us, which is
    right too) or a server that died before the prctl: then leave now.
    """
    server = os.environ.pop("IPYTHON_MCP_SERVER_PID", "")
    if not server.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except Exception:
        return  # no prctl: the pipe watch still covers a responsive kernel
    if os.getppid() != int(server):
        try:
            os.kill(int(server), 0)
        except ProcessLookupError:
            die_with_group()
        except OSError:
            pass


def read_requests(proto_in, inbox, state, private):
    buffered = b""
    while True:
        # Checked before and after the (blocking) read: a cell may have closed the fd or
        # put its own file there meanwhile, and what was read then is not ours to obey.
        private.check(proto_in)
        try:
            data = os.read(proto_in, 1 << 20)
        except OSError:
            private.check(proto_in)
            raise
        private.check(proto_in)
        if not data:
            die_with_group()
        buffered += data
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if not isinstance(message, dict):  # one bad line must not end the reader (every later call would hang)
                private.log("request line skipped, not a JSON object: %.200r" % line)
                continue
            if message.get("kind") == "interrupt":
                state.interrupt(message.get("id"), message.get("group_signalled", False))
            else:
                inbox.put(message)


def refuse_stdin(what):
    def refuse(*args, **kwargs):
        __tracebackhide__ = True
        raise StdinNotAvailable(NO_STDIN_MESSAGE.format(what=what))

    return refuse


def headless_environment():
    """Settings that keep a kernel nobody watches from waiting on a terminal."""
    os.environ["PAGER"] = "cat"
    os.environ["GIT_PAGER"] = "cat"
    os.environ["TERM"] = "dumb"
    os.environ.setdefault("NO_COLOR", "1")
    os.environ.setdefault("CLICOLOR", "0")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # A home the kernel may not write (a bwrap sandbox, a container's user): IPython uses a
    # temp folder instead, and its warning would land in the first cell's stderr.
    warnings.filterwarnings("ignore", message="IPython dir .* is not a writable location")
    if "MPLBACKEND" not in os.environ:
        import importlib.util

        if importlib.util.find_spec("matplotlib_inline") is not None:
            os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    import builtins
    import getpass

    builtins.input = refuse_stdin("input()")
    getpass.getpass = refuse_stdin("getpass()")
    sys.breakpointhook = refuse_stdin("breakpoint() (the debugger)")


# --- Packages: `%pip` and `!pip` act on this interpreter, whatever the env --------------

# What uv's pip interface can do for an env that has no pip of its own.
UV_PIP_COMMANDS = ("install", "uninstall", "list", "freeze", "show", "check", "tree", "sync", "compile")
# pip options uv refuses although they change nothing that matters here (name -> values taken).
PIP_ONLY_OPTIONS = {"--no-warn-script-location": 0, "--disable-pip-version-check": 0, "--no-input": 0,
                    "--progress-bar": 1, "--root-user-action": 1}
# The folder of `pip` scripts first on PATH (see the server's Kernel._pip_shims); removed
# by the kernel itself when the server is gone.
PIP_SHIMS = os.environ.pop("IPYTHON_MCP_PIP_SHIMS", "")


class PipFailed(Exception):
    """A pip command ended with an error; its error text is the installer's last lines."""

    def __init__(self, message, tail):
        super().__init__(message)
        self.tail = tail

    def _render_traceback_(self):  # IPython shows this instead of a Python traceback
        return [self.tail.rstrip("\n"), "PipFailed: %s" % self] if self.tail.strip() else ["PipFailed: %s" % self]


def find_uv():
    """The uv command the server told us of, or uv on PATH, or the env's `uv` package."""
    import importlib.util
    import shutil

    for candidate in (os.environ.get("IPYTHON_MCP_UV"), os.environ.get("UV"), shutil.which("uv")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return [candidate]
    if importlib.util.find_spec("uv") is not None:
        return [sys.executable, "-m", "uv"]
    return None


def pip_commands(args):
    """The commands that run `pip ARGS` for this interpreter.

    The env's own pip when it has one; else uv's pip interface (uv-made envs, pixi envs)
    aimed at this interpreter; else pip after `ensurepip`. Nothing can prompt (no stdin).
    Raises PipFailed for what only pip does (`download`, `wheel`, ...) when uv stands in.
    """
    import importlib
    import importlib.util

    python = sys.executable
    position = next((i for i, arg in enumerate(args) if not arg.startswith("-")), None)
    command = args[position] if position is not None else None
    if command == "uninstall" and not {"-y", "--yes"} & set(args):
        args = args + ["-y"]
    importlib.invalidate_caches()  # ensurepip may have run since the last look
    if importlib.util.find_spec("pip") is not None:
        return [[python, "-m", "pip"] + args]
    uv = find_uv()
    if uv and command in UV_PIP_COMMANDS:
        rest, skip = [], 0
        for arg in args[:position] + args[position + 1:]:
            name = arg.split("=", 1)[0]
            if skip:
                skip -= 1
            elif arg in ("-y", "--yes"):
                pass  # uv never asks
            elif name in PIP_ONLY_OPTIONS:
                skip = PIP_ONLY_OPTIONS[name] if "=" not in arg else 0
            else:
                rest.append(arg)
        return [uv + ["pip", command, "--python", python] + rest]
    if uv:  # rather than put pip into the env unasked
        raise PipFailed(
            "`pip %s` needs pip, which this env (python: %s) does not have. %%pip uses uv here, which does %s; "
            "for pip itself: %%pip install pip" % (" ".join(args), python, ", ".join(UV_PIP_COMMANDS)), "")
    return [[python, "-m", "ensurepip", "--default-pip"], [python, "-m", "pip"] + args]


def installer_environment():
    return dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")


def pip_main(args):
    """`pip ARGS` run by the PATH scripts (`!pip` inside a shell line, subprocess.run(["pip", ...]))."""
    import subprocess

    try:
        commands = pip_commands(args)
    except PipFailed as exc:
        sys.stderr.write("ERROR: %s\n" % exc)
        return 1
    for argv in commands:
        code = subprocess.call(argv, env=installer_environment())
        if code:
            return code
    return 0


def site_pth_files():
    """The .pth files of the site folders on sys.path: an install may add one (editable installs)."""
    import site

    try:
        folders = site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # an old virtualenv's site module
        folders = []
    found = set()
    for folder in folders:
        if folder in sys.path and os.path.isdir(folder):
            found.update((folder, name) for name in os.listdir(folder) if name.endswith(".pth"))
    return found


def refresh_imports(pth_before):
    """What was just installed imports in this session now: no stale finder caches, new .pth files read."""
    import importlib
    import site

    for folder, name in sorted(site_pth_files() - pth_before):
        try:
            site.addpackage(folder, name, None)
        except Exception:
            pass
    importlib.invalidate_caches()


def imported_versions(args):
    """Versions of the packages named in ``args`` that this session has already imported."""
    from importlib import metadata

    versions = {}
    for arg in args:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", arg)
        module = re.sub(r"[-.]+", "_", match.group(0)).lower() if match and not arg.startswith("-") else None
        if module and module in sys.modules:
            try:
                versions[module] = metadata.version(match.group(0))
            except Exception:
                versions[module] = None
    return versions


def run_pip(args):
    """`%pip ARGS` in a cell: the installer's output streams as the cell's; a failure raises PipFailed."""
    import subprocess

    if not args:
        print("Usage: %pip install PACKAGE ... (also uninstall, list, show, freeze); installs into " + sys.executable)
        return
    commands = pip_commands(args)
    pth_before, versions_before = site_pth_files(), imported_versions(args) if "install" in args else {}
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for argv in commands:
        tail = b""
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=installer_environment())
        try:
            streams = {process.stdout.fileno(): 1, process.stderr.fileno(): 2}
            while streams:
                ready, _, _ = select.select(list(streams), [], [])
                for fd in ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        del streams[fd]
                        continue
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(streams[fd], view):]
                    tail = (tail + chunk)[-65536:]
            code = process.wait()
        finally:  # interrupted: the installer got the SIGINT too; give it a moment, then kill it
            if process.poll() is None:
                try:
                    process.wait(PIP_INTERRUPT_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            process.stdout.close()
            process.stderr.close()
        if code:
            lines = tail.decode("utf-8", "replace").splitlines()[-PIP_ERROR_TAIL_LINES:]
            how = "exit code %d" % code if code > 0 else "signal %d" % -code
            message = "`pip %s` failed with %s (ran: %s)" % (" ".join(args), how, " ".join(argv))
            if "ensurepip" in argv:
                message += "; this env has no pip and no uv was found: install uv, or pip into the env"
            raise PipFailed(message, ANSI_ESCAPE.sub("", "\n".join(lines)))
    refresh_imports(pth_before)
    for module, version in imported_versions(args).items():
        if module in versions_before and versions_before[module] != version:
            print("Note: %s %s was imported before this install (now %s): `reset` the session to use the new version."
                  % (module, versions_before[module], version))


def shell_pip_args(cmd):
    """The pip arguments of a `!pip ...` / `!python -m pip ...` line that is only that, else None.

    Such a line runs like `%pip` (a failure fails the cell); anything with shell syntax runs
    in the shell, where the PATH scripts still point `pip` at this interpreter.
    """
    import shlex
    import shutil

    unquoted = re.sub(r"'[^']*'|\"[^\"\\$`]*\"", "", cmd)
    if re.search(r"[;&|<>()`$*?~\\\n#]", unquoted):
        return None
    try:
        words = shlex.split(cmd)
    except ValueError:
        return None
    if not words:
        return None
    here = os.path.dirname(sys.executable)
    program = shutil.which(words[0])
    if program is None:
        return None
    if re.fullmatch(r"pip(3(\.\d+)?)?", words[0]) and os.path.dirname(program) in (PIP_SHIMS, here):
        return words[1:]
    if words[1:3] == ["-m", "pip"] and os.path.dirname(os.path.abspath(program)) == here:
        try:
            if os.path.samefile(program, sys.executable):
                return words[3:]
        except OSError:
            pass
    return None


class Cell:
    """What the running cell produced besides its output streams; reset before each cell.

    Written by the shell's hooks (display, result, traceback) and read by ``build_reply``.
    """

    def __init__(self):
        self.reset()

    def reset(self, image_budget=None):
        self.notes = []  # sentences for the reply's notes
        self.image_budget = image_budget  # (count, bytes) of images the server shows, or None
        self.kernel_cuts = {}  # mime -> (displays cut before sending, the largest one's size)
        self.result = None  # the last expression's mime bundle, as prepared for sending
        self.stb = []  # the traceback as IPython showed it (for IPython's own history)
        self.error = None  # that traceback as plain text
        self.shown = set()  # ids of objects displayed, so the end-of-cell flush does not show a figure twice
        self.done = False  # post_execute ran: displays now come from the end-of-cell flush


class Displays:
    """What a cell displays, made a JSON-ready, bounded mime bundle and sent.

    Our own processing must never raise into the user's cell: what fails becomes a note
    of the cell (``Cell.notes``), and the cell runs on.
    """

    def __init__(self, wire, cell):
        self.wire, self.cell = wire, cell

    def encode_bundle(self, data, text_limit=MAX_TEXT_CHARS):
        """JSON-ready mime bundle; bounded, so no protocol line can grow without limit."""
        bundle = {}
        for mime, value in data.items():
            if isinstance(value, bytes):
                import base64

                value = base64.b64encode(value).decode("ascii")
            if mime.startswith("image/"):
                if len(value) > MAX_IMAGE_B64_CHARS:
                    self.cell.notes.append(
                        "An %s image of about %d MB was dropped: over the %d MB a kernel sends."
                        % (mime, len(value) * 3 // 4 >> 20, MAX_IMAGE_B64_CHARS * 3 // 4 >> 20)
                    )
                    continue
            elif mime == "application/json" and not isinstance(value, str) and text_limit is not None:
                try:
                    text = json.dumps(value)
                except (TypeError, ValueError):  # not JSON after all: send what it looks like
                    text = value = json.dumps(value, default=repr)
                if len(text) > text_limit:  # sent as its (cut) JSON text instead of the object
                    value = text
            if isinstance(value, str) and not mime.startswith("image/"):
                size = len(value)
                value, cut = truncate_middle(value, text_limit)
                if cut:  # said once per kind in the reply's notes (see execute)
                    count, largest = self.cell.kernel_cuts.get(mime, (0, 0))
                    self.cell.kernel_cuts[mime] = (count + 1, max(largest, size))
            if isinstance(value, str) or mime == "application/json":
                bundle[mime] = value
        return bundle

    def prepare(self, data, text_limit=MAX_TEXT_CHARS):
        """The bundle to send, or None. Our own processing must never raise into the user's
        cell: what fails here becomes a note, and the cell runs on."""
        notes = self.cell.notes
        try:
            bundle = self.encode_bundle(data, text_limit)
        except Exception as exc:
            notes.append("A display output could not be encoded (%s: %s) and was dropped." % (type(exc).__name__, exc))
            return None
        try:
            shrink_images(bundle, self.cell.image_budget, notes)
        except Exception as exc:  # shrink_images guards each image; this is the last resort
            notes.append("Images of a display output could not be checked (%s: %s); they are sent as they were." % (type(exc).__name__, exc))
        return bundle

    def send(self, bundle):
        try:
            self.wire.send({"kind": "display", "data": bundle})
        except (TypeError, ValueError) as exc:  # not JSON-serialisable: nothing was written
            self.cell.notes.append(
                "A display output could not be sent (%s: %s) and was dropped." % (type(exc).__name__, exc)
            )


def make_shell(wire, relay, state, cell):
    """The session's InteractiveShell: headless, its displays and result sent over the wire.

    Its classes derive from IPython's, so they are defined here rather than at module level:
    this file imports IPython only after ``check_prerequisites`` (and never for ``--pip``).
    """
    displays = Displays(wire, cell)
    import IPython
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type
    from traitlets.config import Config

    class WireDisplayPublisher(DisplayPublisher):
        def publish(self, data, metadata=None, *args, **kwargs):
            relay.drain()  # what was printed before the display comes first
            bundle = displays.prepare(data)
            if bundle is not None:
                displays.send(bundle)

        def clear_output(self, wait=False):
            relay.drain()
            wire.send({"kind": "clear", "wait": bool(wait)})

    class ResultDisplayHook(DisplayHook):
        """Keeps the last expression's value for the reply instead of printing Out[n]."""

        def start_displayhook(self):
            pass

        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            cell.result = displays.prepare(format_dict, text_limit=None)  # execute() cuts and saves the text

        def finish_displayhook(self):
            self._is_active = False

    class HeadlessShell(InteractiveShell):
        displayhook_class = Type(ResultDisplayHook)
        display_pub_class = Type(WireDisplayPublisher)

        def showtraceback(self, exc_tuple=None, *args, **kwargs):
            etype, value = (exc_tuple or sys.exc_info())[:2]
            if in_forked_child() and isinstance(value, SystemExit):
                # sys.exit() in a child forked by the cell ends that child, as in a script.
                code = value.code
                if code is not None and not isinstance(code, int):
                    sys.stderr.write("%s\n" % (code,))
                end_forked_child(0 if code is None else code if isinstance(code, int) else 1)
            # An interrupt's place is all the agent needs, and the context formatter's first
            # use costs 20-40 ms of imports: stop fast, show the plain Python traceback.
            if etype is None or not issubclass(etype, KeyboardInterrupt):
                return super().showtraceback(exc_tuple, *args, **kwargs)
            mode = self.InteractiveTB.mode
            self.InteractiveTB.set_mode("Plain")
            try:
                return super().showtraceback(exc_tuple, *args, **kwargs)
            finally:
                self.InteractiveTB.set_mode(mode)

        def _format_exception_for_storage(self, exception, *args, **kwargs):
            # IPython 9 formats every error a second time for its history; the text we just
            # showed is that same traceback (and the second pass would cost 5-40 ms).
            return {"ename": type(exception).__name__, "evalue": str(exception), "traceback": cell.stb}

        def _showtraceback(self, etype, evalue, stb):
            # Frames of this file (the SIGINT handler, the input() refusal) are ours, not the user's.
            stb = [entry for entry in stb if THIS_FILE not in ANSI_ESCAPE.sub("", entry)] or stb
            cell.stb = stb
            cell.error = ANSI_ESCAPE.sub("", self.InteractiveTB.stb2text(stb))

        def system(self, cmd):
            # `!pip install x` is `%pip install x` (expanded here as system_raw would: `{var}`, `$var`).
            pip_args = shell_pip_args(self.var_expand(cmd, depth=1))
            if pip_args is not None:
                try:
                    run_pip(pip_args)
                except PipFailed:
                    self.user_ns["_exit_code"] = 1
                    raise
                self.user_ns["_exit_code"] = 0
                return
            pth_before = site_pth_files()
            # system_raw lets the command write straight to fds 1 and 2 (our pipes);
            # the default goes through a pty, which mangles newlines.
            with warnings.catch_warnings():  # `pip` in a shell line is the session's pip: no advice to use %pip
                warnings.filterwarnings("ignore", "You executed the system command !pip ")
                self.system_raw(cmd)
            refresh_imports(pth_before)  # the command may have installed something
            if self.user_ns.get("_exit_code") == -signal.SIGINT and state.interrupted:
                # system_raw swallows the KeyboardInterrupt; the cell must stop here.
                raise KeyboardInterrupt

        def enable_gui(self, gui=None):
            # `%matplotlib inline` lands here with gui None/"inline"; there is no screen for others.
            if gui not in (None, "inline"):
                from IPython.core.error import UsageError

                raise UsageError("This kernel has no screen: GUI event loop %r is not available; use `%%matplotlib inline`." % gui)

        def ask_exit(self):
            self.exit_now = True  # reported as ignored in the reply's notes

        def ask_yes_no(self, *args, **kwargs):
            raise StdinNotAvailable(NO_STDIN_MESSAGE.format(what="a yes/no question"))

    config = Config()
    config.HistoryManager.enabled = False  # no sqlite file shared (and locked) across sessions
    config.InteractiveShell.colors = "nocolor" if IPython.version_info[0] >= 9 else "NoColor"
    config.InteractiveShell.autoindent = False
    config.InteractiveShell.autocall = 0
    shell = HeadlessShell.instance(config=config)

    shell.register_magic_function(pip_magic, "line", "pip")
    show_figures_once(shell, cell)
    return shell


def pip_magic(line):
    """Run pip for this session's own interpreter (its pip, else uv, else pip after ensurepip).

    Usage: %pip install PACKAGE ...  (also uninstall, list, show, freeze). The package
    imports right after; a failed command fails the cell with the installer's last lines.
    """
    import shlex

    from IPython.core.error import UsageError

    try:
        args = shlex.split(line)
    except ValueError as exc:
        raise UsageError("%%pip: %s" % exc) from None
    run_pip(args)


def show_figures_once(shell, cell):
    """Remember what a cell showed, so the end-of-cell flush of open figures (matplotlib's
    inline backend has one in post_execute, and we have one) does not show it again."""
    format_for_display = shell.display_formatter.format

    def format_once_after_cell(obj, *args, **kwargs):
        if cell.done and id(obj) in cell.shown and type(obj).__module__.startswith("matplotlib"):
            return {}, {}  # display() publishes nothing for an empty bundle
        cell.shown.add(id(obj))
        return format_for_display(obj, *args, **kwargs)

    shell.display_formatter.format = format_once_after_cell
    # Registered first, so it runs before post_execute hooks that flush figures.
    shell.events.register("post_execute", lambda: setattr(cell, "done", True))


def shrink_images(bundle, budget, notes):
    """Downscale (with Pillow, when the env has it) images over the byte/pixel budget.

    Never raises: an image that cannot be downscaled is sent as it was, with a note.
    """
    if not budget:
        return
    for mime in ("image/png", "image/jpeg"):
        if mime not in bundle:
            continue
        try:
            shrink_image(bundle, mime, budget, notes)
        except Exception as exc:  # e.g. a truncated file Pillow can open but not decode
            notes.append("An %s image could not be downscaled (%s: %s); it is sent as it was." % (mime, type(exc).__name__, exc))


def shrink_image(bundle, mime, budget, notes):
    """Downscale the bundle's ``mime`` image in place when it is over the budget (may raise)."""
    max_bytes, max_side = budget
    import base64

    raw = base64.b64decode(bundle[mime])
    try:
        import io

        from PIL import Image

        image = Image.open(io.BytesIO(raw))
        width, height = image.size
    except Exception:
        return  # no Pillow or not an image: the server reports the size
    if len(raw) <= max_bytes and max(width, height) <= max_side:
        return
    scale = min(1.0, max_side / max(width, height), (max_bytes / len(raw)) ** 0.5)
    for _ in range(6):
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        out = io.BytesIO()
        small = image.resize(size)
        if mime == "image/png":
            small.save(out, "PNG", optimize=True)
        else:
            small.convert("RGB").save(out, "JPEG", quality=85)
        if out.tell() <= max_bytes:
            break
        scale *= 0.7
    bundle[mime] = base64.b64encode(out.getvalue()).decode("ascii")
    notes.append(
        "An image of %dx%d (%d bytes) was downscaled to %dx%d (%d bytes) to fit the image budget."
        % (width, height, len(raw), size[0], size[1], out.tell())
    )


EXIT = os._exit  # the real one: flush_before_exit replaces os._exit for cells


def flush_before_exit(relay):
    """Make ``os._exit()`` in a cell forward what the cell printed before the process goes."""
    real_exit = os._exit
    kernel_pid = os.getpid()

    def exit_after_drain(code):
        if os.getpid() == kernel_pid:  # not in a forked child: the relay is not there
            try:
                relay.drain()
            except Exception:
                pass
        real_exit(code)

    os._exit = exit_after_drain


def end_forked_child(code, error=None):
    """A child forked by a cell came back from it: flush what it printed (the kernel
    forwards it), then end quietly; only the kernel itself answers the server."""
    try:
        if error:
            sys.stderr.write(error.rstrip() + "\n")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except Exception:
        pass
    EXIT(code)


def flush_matplotlib_figures():
    """Show figures still open at the end of a cell (unless the cell showed them), then close them."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None or not pyplot.get_fignums():
        return
    from IPython.display import display

    try:
        for number in pyplot.get_fignums():
            display(pyplot.figure(number))  # skipped when the cell showed it already
    finally:
        pyplot.close("all")


def truncate_middle(text, limit):
    if limit is None or len(text) <= limit:
        return text, 0
    half = limit // 2
    cut = len(text) - 2 * half
    return text[:half] + "\n... [%d characters cut] ...\n" % cut + text[-half:], cut


def best_text(bundle):
    """The text a reply shows for a mime bundle, by the server's display_text rule: markdown,
    then a plain repr that says something, then HTML, LaTeX, JSON; else the plain repr."""
    plain = bundle.get("text/plain")
    if isinstance(plain, str) and DEFAULT_REPR.fullmatch(plain.strip()):
        plain = None
    for text in (bundle.get("text/markdown"), plain, bundle.get("text/html"), bundle.get("text/latex")):
        if isinstance(text, str) and text:
            return text
    if "application/json" in bundle:
        value = bundle["application/json"]
        return value if isinstance(value, str) else json.dumps(value, default=repr)
    return bundle.get("text/plain")


def result_text(bundle, notes):
    """The cell result's text (see best_text); its plain repr if that fails."""
    try:
        return best_text(bundle)
    except Exception as exc:
        notes.append("The result's rich text form could not be made (%s: %s); its plain repr is shown." % (type(exc).__name__, exc))
        return bundle.get("text/plain")


def cut_notes(cell, notes):
    """Say what the kernel cut before sending (once per kind), and keep the notes few."""
    for mime, (count, largest) in sorted(cell.kernel_cuts.items()):
        notes.append(
            "%d display output(s) of %s were longer than the %d characters a kernel sends (the largest: %d); "
            "the middle of each was cut before sending and is not kept anywhere." % (count, mime, MAX_TEXT_CHARS, largest)
        )
    if len(notes) > MAX_NOTES:
        notes[MAX_NOTES - 1:] = ["... and %d more notes." % (len(notes) - MAX_NOTES + 1)]
def create_private_file(path):
    """A new file only this user can read or write (0600); never an existing file, nor
    through a symlink planted under that name (O_EXCL and O_NOFOLLOW)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def save_text(text, path, limit):
    """Save ``text`` (at most ``limit`` bytes of it) in a new private file at ``path``.

    Returns (a sentence for the note, bytes written or None). A full disk or a cap cuts
    the file, and the sentence says so: it never claims more than the file holds.
    """
    if not path:
        return " The full text could not be saved (no output folder).", None
    data = text.encode("utf-8", "replace")
    if limit is not None and len(data) > limit:
        data, cut_at = data[:limit], limit
    else:
        cut_at = None
    if not data and cut_at is not None:
        return " The full text was not saved: no room is left under the limits for saved output.", None
    try:
        fd = create_private_file(path)
    except OSError as exc:
        return " The full text could not be saved (%s)." % (exc.strerror or exc), None
    written = 0
    try:
        while written < len(data):
            written += os.write(fd, data[written:] if written else data)
    except OSError as exc:
        return " The saved text in %s is incomplete: writing it failed after %d bytes (%s)." % (path, written, exc.strerror or exc), written
    finally:
        os.close(fd)
    if cut_at is not None:
        return " The saved text in %s was cut at %d bytes (the limit for saved output)." % (path, cut_at), written
    return " Full text: %s" % path, written


def inline_text(text, path, limit):
    """For a server on another machine (ssh, exec): the text it saves at ``path``, at most
    ``limit`` bytes of it, and the sentence for the note. Returns (sentence, text or None)."""
    data = text.encode("utf-8", "replace")
    if limit is not None and len(data) > limit:
        if limit <= 0:
            return " The full text was not saved: no room is left under the limits for saved output.", None
        return (" The saved text in %s was cut at %d bytes (the limit for saved output)." % (path, limit),
                data[:limit].decode("utf-8", "ignore"))
    return " Full text: %s" % path, text


def execute(shell, relay, state, cell, request):
    """One execute request: the cell, our stdio put back, then the reply that ends it."""
    cell.reset(tuple(request["image_budget"]) if request.get("image_budget") else None)
    result, interrupted_outside_cell = run_cell(shell, state, cell, request)
    restore_after_cell(shell, relay, cell.notes)
    return build_reply(shell, cell, request, result, interrupted_outside_cell)


def run_cell(shell, state, cell, request):
    """Run the code (unless interrupted before it starts) with our SIGINT handler put back after.

    Returns (IPython's ExecutionResult or None, whether an interrupt landed outside the cell).
    """
    interrupted_outside_cell = False
    sigint_handler = signal.getsignal(signal.SIGINT)
    result = None
    try:
        if state.begin(request["id"]):
            result = shell.run_cell(request["code"], store_history=True)
            if in_forked_child():
                end_forked_child(0 if result.success else 1, cell.error)
            if result.success:
                flush_matplotlib_figures()
    except KeyboardInterrupt:
        interrupted_outside_cell = True
    finally:
        if in_forked_child():  # whatever way it came back from the cell
            end_forked_child(1)
        state.end(request["id"])
        # User code may have replaced the handler (SIG_IGN, its own): restore ours.
        signal.signal(signal.SIGINT, sigint_handler)
    return result, interrupted_outside_cell


def restore_after_cell(shell, relay, notes):
    """Our fds 1 and 2, working sys.stdout/stderr, the cell's output relayed; exit() undone."""
    try:  # the kernel must never die of its own bookkeeping, whatever the cell did
        restore_standard_fds(relay.spares, relay.wire.private)
        for name, fd in (("stdout", 1), ("stderr", 2)):  # a cell that closed sys.stdout still leaves a working one
            stream = getattr(sys, name)
            if stream is None or getattr(stream, "closed", False) is True:
                setattr(sys, name, open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1))
        relay.end_of_cell()
    except Exception as exc:
        notes.append("After the cell, restoring stdout/stderr failed (%s: %s)." % (type(exc).__name__, exc))
    if shell.exit_now:
        shell.exit_now = False
        notes.append("exit() was ignored: use the shutdown tool to end a session.")


def build_reply(shell, cell, request, result, interrupted_outside_cell):
    """The ``done`` message: status, result (cut, its full text saved), error, notes."""
    notes = cell.notes
    cut_notes(cell, notes)

    reply = {
        "kind": "done",
        "id": request["id"],
        "execution_count": None if result is None else (result.execution_count or shell.execution_count - 1),
        "result": None,
        "error": None,
        "notes": notes,
    }
    if result is None or interrupted_outside_cell:
        reply["status"] = "error"
        reply["error"] = "KeyboardInterrupt"
    elif result.success:
        reply["status"] = "ok"
        plain = result_text(cell.result or {}, notes)
        if plain is not None:
            full = plain
            plain, cut = truncate_middle(plain, request.get("max_result_chars"))
            if cut:
                note = "The result's repr was %d characters long; %d were cut from its middle." % (len(full), cut)
                if request.get("spill_inline"):  # we are far from the server's folder: it saves the text
                    saved, text = inline_text(full, request.get("spill_path"), request.get("spill_limit"))
                    if text is not None:
                        reply["result_file_text"] = text
                else:
                    saved, size = save_text(full, request.get("spill_path"), request.get("spill_limit"))
                    if size is not None:
                        reply["result_file"] = {"path": request["spill_path"], "bytes": size}
                notes.append(note + saved)
            reply["result"] = plain
        bundle = cell.result or {}
        images = {k: v for k, v in bundle.items() if k in ("image/png", "image/jpeg")}
        if images:
            reply["result_images"] = images
    else:
        reply["status"] = "error"
        error = cell.error
        if not error:
            exc = result.error_in_exec or result.error_before_exec
            error = "%s: %s" % (type(exc).__name__, exc)
        # "KeyboardInterrupt:" (no message) reads better as the bare name.
        error, _ = truncate_middle(error.rstrip(), MAX_TEXT_CHARS)  # the server cuts further
        reply["error"] = re.sub(r"(\n|^)([\w.]+):$", r"\1\2", error)
    return reply


def check_prerequisites(hello):
    """Python and IPython recent enough (importing IPython's bulk now, bytecode cached)?

    Fills in the hello: ``ipython``, and when not, ``error``, ``missing`` and ``pip``.
    """
    if sys.version_info[:2] < MIN_PYTHON:
        hello["error"] = "Python %s is older than the %d.%d this kernel needs" % ((hello["python_version"],) + MIN_PYTHON)
        hello["missing"] = "python"
        return False
    # With PYTHONDONTWRITEBYTECODE set (and installers such as uv write no .pyc), every
    # kernel would compile IPython from source again: ~150 ms of CPU per start. Cache the
    # bytecode of what we import here; the cell's own imports keep the user's setting.
    dont_write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, False
    try:
        import IPython
    except Exception as exc:  # ImportError, or a broken install raising anything
        import importlib.util

        hello["error"] = "%s: %s" % (type(exc).__name__, exc)
        hello["missing"] = "ipython"
        hello["pip"] = importlib.util.find_spec("pip") is not None
        return False
    finally:
        sys.dont_write_bytecode = dont_write_bytecode
    hello["ipython"] = IPython.__version__
    if tuple(IPython.version_info[:2]) < MIN_IPYTHON:
        hello["error"] = "IPython %s is older than the %d.%d this kernel needs" % ((IPython.__version__,) + MIN_IPYTHON)
        hello["missing"] = "ipython"
        return False
    sys.dont_write_bytecode = False
    try:
        from IPython.core import interactiveshell  # noqa: F401 (the bulk of the import cost)
    except Exception:
        pass  # make_shell reports it
    finally:
        sys.dont_write_bytecode = dont_write_bytecode
    return True


def headless_stdio(wire, readers, spares):
    """sys.stdout/stderr on fds 1 and 2 (the relay's pipes), no stdin, no screen; the relay."""
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    sys.stdin = open(os.devnull)
    headless_environment()
    relay = Relay(wire, readers)
    relay.spares = spares
    return relay


def serve_requests(inbox, shell, relay, state, cell, wire, private):
    """The main thread's loop: one execute request at a time, each answered by its ``done``."""
    while True:
        try:
            request = inbox.get()
        except KeyboardInterrupt:  # only if user code left its own SIGINT handler behind
            continue
        if request.get("kind") != "execute":
            continue
        try:
            reply = execute(shell, relay, state, cell, request)
        except KeyboardInterrupt:
            state.end(request["id"])
            relay.drain()
            reply = {"kind": "done", "id": request["id"], "status": "error", "error": "KeyboardInterrupt",
                     "result": None, "execution_count": None, "notes": []}
        private.check_all()  # the cell that closed or replaced one of our fds gets the news
        wire.send(reply)


def main():
    die_with_server()
    private, proto_in, proto_out, log, readers, spares = take_standard_fds()
    state = KernelState()
    wire = Wire(proto_out, state, private)
    hello = {
        "kind": "hello",
        "protocol": PROTOCOL_VERSION,
        "python_version": "%d.%d.%d" % sys.version_info[:3],
        "ipython": None,
        "error": None,
        "min_python": "%d.%d" % MIN_PYTHON,
        "min_ipython": "%d.%d" % MIN_IPYTHON,
    }
    try:
        import faulthandler

        faulthandler.enable(file=os.fdopen(log, "w", closefd=False))
    except Exception:
        pass
    if not check_prerequisites(hello):
        wire.send(hello, newline_first=True)
        return 3
    relay = headless_stdio(wire, readers, spares)
    signal.signal(signal.SIGINT, state.on_sigint)
    cell = Cell()
    try:
        shell = make_shell(wire, relay, state, cell)
    except Exception as exc:
        hello["error"] = "IPython could not start: %s: %s" % (type(exc).__name__, exc)
        wire.send(hello, newline_first=True)
        return 3
    threading.Thread(target=relay.run, name="relay", daemon=True).start()
    flush_before_exit(relay)
    inbox = queue.Queue()
    threading.Thread(target=read_requests, args=(proto_in, inbox, state, private), name="requests", daemon=True).start()
    # After a newline: start-up output of the env without one (a banner) must not hide the hello.
    wire.send(hello, newline_first=True)
    serve_requests(inbox, shell, relay, state, cell, wire, private)


# --- The fork server: IPython imported once, a kernel forked per request (Linux) ---------
#
# ``bootstrap_kernel.py --fork-server FD``: FD is a SOCK_SEQPACKET socket to the server.
#     fork server -> server   ready {ok, error, pid}        (once, after the imports)
#                             forked {id, pid} | refused {id, error, stale}
#                             exited {pid, returncode}      (returncode < 0: killed by that signal)
#     server -> fork server   fork {id, environ, cwd} with 7 fds attached: the kernel's
#                             stdin, stdout, stderr, then the stdout and stderr output
#                             pipes (read end, write end each, as IPYTHON_MCP_OUTPUT_FDS)
# One thread only (asserted before each fork): a fork copies only the forking thread, and a
# lock another thread held would stay locked in the kernel forever. Nothing that starts
# threads is imported here (no numpy, no BLAS). Each kernel leaves the fork server's state
# behind: its own session and process group, environment, cwd, argv and signal handlers
# (SIGCHLD above all: subprocess and !cmd need the default), fresh random state (the random
# module reseeds itself after fork). Kernels are not the server's children: it learns their
# exits from ``exited``. When the server's end of the socket closes (the server died, however),
# the fork server SIGKILLs every kernel's group before it exits: this covers a kernel whose cell
# holds the GIL, which cannot see its own pipe close (a spawned kernel has PR_SET_PDEATHSIG for
# that; a forked one's parent is the fork server, so it has none). A fork server killed by
# itself takes no kernel with it: they live on, and end when their protocol pipe closes. An env whose site folders changed since the
# fork server imported (a package installed or upgraded) gets ``refused`` and a fresh
# fork server: kernels must see what a new process would.

FORK_FDS = 7
FORK_SERVER_NAME = "ipymcp-forksrv"
KERNELS = set()  # in the fork server: the live kernels it forked
# Modules that make_shell and InteractiveShell() import (none starts a thread), imported by
# the fork server so its kernels share them; ~30 ms less per kernel.
FORK_PRELOAD = (
    "IPython.core.application", "IPython.core.completer", "IPython.core.completerlib", "IPython.core.displayhook",
    "IPython.core.displaypub", "IPython.core.magics", "IPython.core.oinspect", "IPython.display",
    "IPython.utils.generics", "IPython.utils.wildcard", "traitlets.config", "glob", "random", "shutil", "tempfile",
    "unicodedata", "codeop", "shlex", "base64", "faulthandler", "ctypes",
)


class StaleImports(Exception):
    """What this fork server imported may differ from what the env has now."""


def site_folders_state():
    """(folder, mtime) of the site folders on sys.path: an install or upgrade changes one."""
    state = []
    for folder in sys.path:
        if folder.endswith("-packages"):
            try:
                state.append((folder, os.stat(folder).st_mtime_ns))
            except OSError:
                state.append((folder, None))
    return state


def set_process_name(name):
    """What ps and /proc/PID/comm show (Linux; 15 bytes): the fork server and its kernels
    share a command line, so the name tells them apart."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME


def fork_server(control_fd):
    import gc
    import socket

    set_process_name(FORK_SERVER_NAME)
    control = socket.socket(fileno=control_fd)
    hello = {"python_version": "%d.%d.%d" % sys.version_info[:3]}
    ready = check_prerequisites(hello)
    if ready:
        import importlib

        for name in FORK_PRELOAD:  # what building a shell imports: a kernel only builds it
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    if ready and thread_count() != 1:
        ready, hello["error"] = False, "a thread was started while importing IPython (a sitecustomize or .pth?)"
    send_quietly(control, {"kind": "ready", "ok": ready, "error": hello.get("error"), "pid": os.getpid()})
    if not ready:
        return 3
    site_state = site_folders_state()
    gc.collect()
    gc.freeze()  # what is here now is shared with every kernel; the collector must not copy it
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the server's terminal is not for us
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    try:
        while True:
            try:
                events = dict(poller.poll())
            except InterruptedError:
                continue
            if wake_read in events:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_read, 4096)
                report_exits(control)
            if control.fileno() in events:
                try:
                    data, fds, _, _ = socket.recv_fds(control, 1 << 20, FORK_FDS)
                except InterruptedError:
                    continue
                except OSError:  # ECONNRESET: the server died with reports of ours unread
                    data, fds = b"", []
                if not data:
                    return 0
                serve_fork(control, data, fds, site_state, (wake_read, wake_write))
    finally:  # the server is gone (or this loop failed): so are its kernels, even one whose cell holds the GIL
        for pid in KERNELS:
            for kill in (os.killpg, os.kill):  # os.kill: a kernel that has not reached setsid() yet
                with contextlib.suppress(OSError):
                    kill(pid, signal.SIGKILL)


def thread_count():
    """Threads of this process, C ones included (an OpenBLAS pool is invisible to threading)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def send_quietly(control, message):
    """A report to the server; one that is gone (EPIPE, ECONNRESET) is noticed by the loop."""
    with contextlib.suppress(OSError):
        control.send(json.dumps(message).encode())


def report_exits(control):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        KERNELS.discard(pid)
        send_quietly(control, {"kind": "exited", "pid": pid, "returncode": os.waitstatus_to_exitcode(status)})


def serve_fork(control, data, fds, site_state, wake):
    """One request: fork a kernel, which never returns from here."""
    request_id = None
    try:
        request = json.loads(data)
        request_id = request.get("id")
        if len(fds) != FORK_FDS or not isinstance(request.get("environ"), dict):
            raise ValueError("a fork request needs %d fds and an environ" % FORK_FDS)
        if site_folders_state() != site_state:
            raise StaleImports("the env's packages changed since this fork server started")
        if thread_count() != 1:
            raise RuntimeError("the fork server has %d threads" % thread_count())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
    except Exception as exc:
        for fd in fds:
            os.close(fd)
        send_quietly(control, {"kind": "refused", "id": request_id, "error": "%s: %s" % (type(exc).__name__, exc),
                               "stale": isinstance(exc, StaleImports)})
        return
    if pid == 0:
        code = 1
        try:
            control.close()
            code = become_kernel(request, fds, wake) or 0
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # on the kernel's stderr: the server's death message quotes it
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    KERNELS.add(pid)
    for fd in fds:
        os.close(fd)
    send_quietly(control, {"kind": "forked", "id": request_id, "pid": pid})


def become_kernel(request, fds, wake):
    """In the forked child: leave the fork server's state behind, then run as a kernel."""
    global KERNEL_PID, PIP_SHIMS
    signal.set_wakeup_fd(-1)
    for fd in wake:
        os.close(fd)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setsid()  # own session and process group: interrupt and kill reach what the kernel starts
    set_process_name(os.path.basename(sys.executable))
    for target, fd in zip((0, 1, 2), fds[:3]):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["environ"])
    os.environ["IPYTHON_MCP_OUTPUT_FDS"] = ",".join(map(str, fds[3:]))
    os.environ.pop("IPYTHON_MCP_SERVER_PID", None)  # our parent is the fork server, whose death must not kill us
    PIP_SHIMS = os.environ.pop("IPYTHON_MCP_PIP_SHIMS", "")
    KERNEL_PID = os.getpid()
    if request.get("cwd"):  # None: the server's was deleted; stay where the fork server is
        with contextlib.suppress(OSError):
            os.chdir(request["cwd"])
    sys.argv = [sys.argv[0]]
    import importlib

    importlib.invalidate_caches()
    return main()  # the objects gc.freeze() kept stay frozen: shared pages stay shared


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pip"]:  # run by the `pip` scripts on a session's PATH
        sys.exit(pip_main(sys.argv[2:]))
    if sys.argv[1:2] == ["--fork-server"] and len(sys.argv) == 3:
        sys.exit(fork_server(int(sys.argv[2])))
    sys.exit(main())
