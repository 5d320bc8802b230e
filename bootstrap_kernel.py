"""Kernel side of ipython-mcp: one IPython shell behind a JSON-lines pipe.

The server runs ``<target python> bootstrap_kernel.py`` with three pipes. This file
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

Messages (one JSON object per line, ``kind`` says which):
    server -> kernel   execute {id, code, max_result_chars, image_budget, spill_path,
                                spill_limit}   (where to save a cut result's full
                                text, new and private, and at most how many bytes)
                       interrupt {id, group_signalled}
                           stops cell ``id`` (now, or when it would start); when the
                           server could not signal the process group itself, the
                           kernel signals it (pipes that carry no signals: ssh, exec)
    kernel -> server   hello {protocol, pid, python, python_version, ipython, error,
                              missing, pip, prefix}   (first line; ``missing`` says
                              what is absent or too old: "python" or "ipython";
                              ``pip`` whether pip is there)
                       stream {name, text}     stdout/stderr of the running cell
                       display {data}          mime bundle shown by the cell
                       clear {wait}            clear_output() was called
                       done {id, status, result, result_images, error,
                             execution_count, notes, result_file {path, bytes}}

When the protocol input reaches end of file the server is gone: the kernel kills
its own process group (itself and anything it started) so no process outlives it.
"""

import codecs
import contextlib
import fcntl
import json
import os
import queue
import re
import select
import signal
import struct
import sys
import termios
import threading
import time

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
# Pause after output wakes the relay, when less than a chunk's worth is waiting, so
# small writes travel together.
RELAY_GATHER_S = 0.002
RELAY_GATHER_BELOW_BYTES = 32 * 1024
# Bounds the end-of-cell drain (rounds of RELAY_CHUNK_BYTES) when a background
# process keeps writing: its later output still flows, just not inside this reply.
DRAIN_MAX_ROUNDS = 64
THIS_FILE = os.path.basename(__file__)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
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


def take_standard_fds():
    """Move the protocol to private fds and give user code fresh fds 0, 1 and 2."""
    proto_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    proto_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    log = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 3)
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
        spares[fd] = write_end
        set_cloexec_nonblocking(write_end, nonblocking=False)
        set_cloexec_nonblocking(read_end, nonblocking=True)
        readers[read_end] = name
    return proto_in, proto_out, log, readers, spares


def restore_standard_fds(spares):
    """After a cell: fds 1 and 2 point at our pipes again, whatever the cell did to them."""
    for fd, spare in spares.items():
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

    def __init__(self, fd, state):
        self.fd = fd
        self.state = state
        self.lock = threading.Lock()

    def send(self, message):
        data = (json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        view = memoryview(data)
        with self.state.no_interrupts(), self.lock:
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
        """
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        # A pump stops after RELAY_CHUNK_BYTES per fd; repeat until the pipes are
        # empty, but give up on a background writer that never stops.
        for _ in range(DRAIN_MAX_ROUNDS):
            with self.wire.state.no_interrupts(), self.lock:
                ready, _, _ = select.select(list(self.readers), [], [], 0)
                if not ready:
                    return
                self._pump(ready)

    def run(self):
        fds = list(self.readers)
        while True:
            ready, _, _ = select.select(fds, [], [])
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
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
    finally:
        os._exit(0)


def read_requests(proto_in, inbox, state):
    stream = os.fdopen(proto_in, "rb", buffering=0, closefd=False)
    buffered = b""
    while True:
        try:
            data = stream.read(1 << 20)
        except InterruptedError:
            continue
        if not data:
            die_with_group()
        buffered += data
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            message = json.loads(line)
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
    if "MPLBACKEND" not in os.environ:
        import importlib.util

        if importlib.util.find_spec("matplotlib_inline") is not None:
            os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    import builtins
    import getpass

    builtins.input = refuse_stdin("input()")
    getpass.getpass = refuse_stdin("getpass()")
    sys.breakpointhook = refuse_stdin("breakpoint() (the debugger)")


def make_shell(wire, relay, state, capture):
    import IPython
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type
    from traitlets.config import Config

    def encode_bundle(data, text_limit=MAX_TEXT_CHARS):
        """JSON-ready mime bundle; bounded, so no protocol line can grow without limit."""
        bundle = {}
        for mime, value in data.items():
            if isinstance(value, bytes):
                import base64

                value = base64.b64encode(value).decode("ascii")
            if mime.startswith("image/"):
                if len(value) > MAX_IMAGE_B64_CHARS:
                    capture.setdefault("notes", []).append(
                        "An %s image of about %d MB was dropped: over the %d MB a kernel sends."
                        % (mime, len(value) * 3 // 4 >> 20, MAX_IMAGE_B64_CHARS * 3 // 4 >> 20)
                    )
                    continue
            elif isinstance(value, str):
                value, _ = truncate_middle(value, text_limit)
            if isinstance(value, str) or mime == "application/json":
                bundle[mime] = value
        return bundle

    class WireDisplayPublisher(DisplayPublisher):
        def publish(self, data, metadata=None, *args, **kwargs):
            relay.drain()  # what was printed before the display comes first
            bundle = encode_bundle(data)
            shrink_images(bundle, capture.get("image_budget"), capture.setdefault("notes", []))
            wire.send({"kind": "display", "data": bundle})

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
            bundle = encode_bundle(format_dict, text_limit=None)  # execute() cuts and saves the repr
            shrink_images(bundle, capture.get("image_budget"), capture.setdefault("notes", []))
            capture["result"] = bundle

        def finish_displayhook(self):
            self._is_active = False

    class HeadlessShell(InteractiveShell):
        displayhook_class = Type(ResultDisplayHook)
        display_pub_class = Type(WireDisplayPublisher)

        def showtraceback(self, exc_tuple=None, *args, **kwargs):
            # An interrupt's place is all the agent needs, and the context formatter's first
            # use costs 20-40 ms of imports: stop fast, show the plain Python traceback.
            etype = (exc_tuple or sys.exc_info())[0]
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
            return {"ename": type(exception).__name__, "evalue": str(exception), "traceback": capture.get("stb", [])}

        def _showtraceback(self, etype, evalue, stb):
            # Frames of this file (the SIGINT handler, the input() refusal) are ours, not the user's.
            stb = [entry for entry in stb if THIS_FILE not in ANSI_ESCAPE.sub("", entry)] or stb
            capture["stb"] = stb
            capture["error"] = ANSI_ESCAPE.sub("", self.InteractiveTB.stb2text(stb))
            capture["error_name"] = getattr(etype, "__name__", str(etype))

        def system(self, cmd):
            # system_raw lets the command write straight to fds 1 and 2 (our pipes);
            # the default goes through a pty, which mangles newlines.
            self.system_raw(cmd)
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
    # Remember what a cell showed, so the end-of-cell flush of open figures (matplotlib's
    # inline backend has one in post_execute, and we have one) does not show it again.
    format_for_display = shell.display_formatter.format

    def format_once_after_cell(obj, *args, **kwargs):
        shown = capture.setdefault("shown", set())
        if capture.get("cell_done") and id(obj) in shown and type(obj).__module__.startswith("matplotlib"):
            return {}, {}  # display() publishes nothing for an empty bundle
        shown.add(id(obj))
        return format_for_display(obj, *args, **kwargs)

    shell.display_formatter.format = format_once_after_cell
    # Registered first, so it runs before post_execute hooks that flush figures.
    shell.events.register("post_execute", lambda: capture.__setitem__("cell_done", True))
    return shell


def shrink_images(bundle, budget, notes):
    """Downscale (with Pillow, when the env has it) images over the byte/pixel budget."""
    if not budget:
        return
    max_bytes, max_side = budget
    for mime in ("image/png", "image/jpeg"):
        if mime not in bundle:
            continue
        import base64

        raw = base64.b64decode(bundle[mime])
        try:
            import io

            from PIL import Image

            image = Image.open(io.BytesIO(raw))
            width, height = image.size
        except Exception:
            return  # no Pillow or not decodable: the server reports the size
        if len(raw) <= max_bytes and max(width, height) <= max_side:
            continue
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


def execute(shell, relay, state, capture, request):
    capture.clear()
    notes = capture["notes"] = []
    if request.get("image_budget"):
        capture["image_budget"] = tuple(request["image_budget"])
    interrupted_outside_cell = False
    sigint_handler = signal.getsignal(signal.SIGINT)
    result = None
    try:
        if state.begin(request["id"]):
            result = shell.run_cell(request["code"], store_history=True)
            if result.success:
                flush_matplotlib_figures()
    except KeyboardInterrupt:
        interrupted_outside_cell = True
    finally:
        state.end(request["id"])
        # User code may have replaced the handler (SIG_IGN, its own): restore ours.
        signal.signal(signal.SIGINT, sigint_handler)
    try:  # the kernel must never die of its own bookkeeping, whatever the cell did
        restore_standard_fds(relay.spares)
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
        plain = (capture.get("result") or {}).get("text/plain")
        if plain is not None:
            full = plain
            plain, cut = truncate_middle(plain, request.get("max_result_chars"))
            if cut:
                note = "The result's repr was %d characters long; %d were cut from its middle." % (len(full), cut)
                saved, size = save_text(full, request.get("spill_path"), request.get("spill_limit"))
                if size is not None:
                    reply["result_file"] = {"path": request["spill_path"], "bytes": size}
                notes.append(note + saved)
            reply["result"] = plain
        bundle = capture.get("result") or {}
        images = {k: v for k, v in bundle.items() if k in ("image/png", "image/jpeg")}
        if images:
            reply["result_images"] = images
    else:
        reply["status"] = "error"
        error = capture.get("error")
        if not error:
            exc = result.error_in_exec or result.error_before_exec
            error = "%s: %s" % (type(exc).__name__, exc)
        # "KeyboardInterrupt:" (no message) reads better as the bare name.
        error, _ = truncate_middle(error.rstrip(), MAX_TEXT_CHARS)  # the server cuts further
        reply["error"] = re.sub(r"(\n|^)([\w.]+):$", r"\1\2", error)
    return reply


def main():
    proto_in, proto_out, log, readers, spares = take_standard_fds()
    state = KernelState()
    wire = Wire(proto_out, state)
    hello = {
        "kind": "hello",
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "python": sys.executable,
        "python_version": "%d.%d.%d" % sys.version_info[:3],
        "ipython": None,
        "error": None,
    }
    try:
        import faulthandler

        faulthandler.enable(file=os.fdopen(log, "w", closefd=False))
    except Exception:
        pass
    if sys.version_info[:2] < MIN_PYTHON:
        hello["error"] = "Python %s is older than the %d.%d this kernel needs" % ((hello["python_version"],) + MIN_PYTHON)
        hello["missing"] = "python"
        wire.send(hello)
        return 3
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
        hello["prefix"] = sys.prefix
        wire.send(hello)
        return 3
    finally:
        sys.dont_write_bytecode = dont_write_bytecode
    hello["ipython"] = IPython.__version__
    if tuple(IPython.version_info[:2]) < MIN_IPYTHON:
        hello["error"] = "IPython %s is older than the %d.%d this kernel needs" % ((IPython.__version__,) + MIN_IPYTHON)
        hello["missing"] = "ipython"
        wire.send(hello)
        return 3
    sys.dont_write_bytecode = False
    try:
        from IPython.core import interactiveshell  # noqa: F401 (the bulk of the import cost)
    except Exception:
        pass  # make_shell reports it
    finally:
        sys.dont_write_bytecode = dont_write_bytecode

    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    sys.stdin = open(os.devnull)
    headless_environment()
    relay = Relay(wire, readers)
    relay.spares = spares
    signal.signal(signal.SIGINT, state.on_sigint)
    capture = {}
    try:
        shell = make_shell(wire, relay, state, capture)
    except Exception as exc:
        hello["error"] = "IPython could not start: %s: %s" % (type(exc).__name__, exc)
        wire.send(hello)
        return 3
    threading.Thread(target=relay.run, name="relay", daemon=True).start()
    flush_before_exit(relay)
    inbox = queue.Queue()
    threading.Thread(target=read_requests, args=(proto_in, inbox, state), name="requests", daemon=True).start()
    wire.send(hello)

    while True:
        try:
            request = inbox.get()
        except KeyboardInterrupt:  # only if user code left its own SIGINT handler behind
            continue
        kind = request.get("kind")
        if kind == "execute":
            try:
                reply = execute(shell, relay, state, capture, request)
            except KeyboardInterrupt:
                state.end(request["id"])
                relay.drain()
                reply = {"kind": "done", "id": request["id"], "status": "error", "error": "KeyboardInterrupt",
                         "result": None, "execution_count": None, "notes": []}
            wire.send(reply)


if __name__ == "__main__":
    sys.exit(main())
