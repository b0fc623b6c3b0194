"""Where a step's process runs: in a bubblewrap sandbox, or (if allowed) bare.

A runtime starts ``sh -e -c <script>`` for one step in its own session (so
the whole process group can be killed) with exactly the environment it is
given: nothing of the worker's own environment leaks in.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vela.errors import VelaError

logger = logging.getLogger("vela.executor")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Paths a step must never see even if some bind would expose them. bwrap binds
# only what it is told to, so these are hidden anyway; listing them keeps
# them hidden if they ever sit under a bound directory.
DEFAULT_HIDDEN_PATHS: tuple[Path, ...] = (
    Path("/tmp/ray"),  # noqa: S108 - Ray's session dir, listed to be hidden
    Path.home() / ".ray",
)

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install -y bubblewrap`, "
    "Fedora: `dnf install bubblewrap`)"
)
UNSANDBOXED_HINT = (
    "to run build steps without a sandbox (trusted hosts only) set "
    "`worker.allow_unsandboxed = true` (env VELA_WORKER_ALLOW_UNSANDBOXED=true)"
)


class SandboxUnavailable(VelaError):
    """bubblewrap is missing or cannot create namespaces, and unsandboxed runs are off."""


@dataclass(frozen=True)
class BuildDirs:
    """Host directories of one build, all under ``root`` (removed afterwards)."""

    root: Path
    workspace: Path
    home: Path
    tmp: Path
    empty: Path  # an empty read-only file to bind over hidden files, made when needed

    @classmethod
    def create(cls, root: Path) -> BuildDirs:
        dirs = cls(root, root / "workspace", root / "home", root / "tmp", root / "empty")
        for d in (dirs.workspace, dirs.home, dirs.tmp):
            d.mkdir(mode=0o700)
        return dirs

    def empty_file(self) -> Path:
        """:attr:`empty`, created on first use: most hosts hide no file under a bound
        directory, and a build's file system calls are a share of a short build's cost."""
        self.empty.touch(mode=0o400)
        return self.empty


@dataclass(frozen=True)
class StepPaths:
    """Paths as the step sees them."""

    workspace: str
    home: str
    tmp: str


class Runtime(abc.ABC):
    """Starts one step's process; the executor does the rest."""

    name: str
    sandboxed: bool

    @abc.abstractmethod
    def paths(self, dirs: BuildDirs) -> StepPaths:
        """Where the step sees its workspace, home and temp directory."""

    @abc.abstractmethod
    async def spawn(
        self, script: str, *, env: Mapping[str, str], dirs: BuildDirs
    ) -> StepProcess:
        """Start ``sh -e -c script`` with exactly ``env``; stdout+stderr piped.

        The process must lead a new session so :meth:`kill` reaches all of it.
        """

    def kill(self, proc: StepProcess) -> None:
        """SIGKILL the step's whole process group (the leader may be gone)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# asyncio's own limit for a subprocess's output stream.
_STREAM_LIMIT = 2**16


class _PipeReader:
    """The read end of a step's output pipe, read on the event loop into a
    :class:`asyncio.StreamReader` (which pauses and resumes it, as it would a
    transport). Its one owner: the descriptor is closed once, here. A transport from
    ``connect_read_pipe`` is not: on uvloop (Ray's loop in async actors) libuv closes
    the descriptor and then the pipe's file object closes the same number again,
    which by then another thread may have been given — seen as steps failing to
    start with EBADF when one WorkerActor ran several builds at once."""

    def __init__(self, fd: int, reader: asyncio.StreamReader,
                 loop: asyncio.AbstractEventLoop) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._reader = reader
        self._loop = loop
        self._reading = False
        reader.set_transport(self)  # type: ignore[arg-type] # pause/resume_reading only
        self.resume_reading()

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, _STREAM_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._reader.set_exception(e)
            self.close()
            return
        if not data:
            self._reader.feed_eof()
            self.close()
            return
        self._reader.feed_data(data)

    def pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and self._fd >= 0:
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True

    def close(self) -> None:
        if self._fd >= 0:
            self.pause_reading()
            fd, self._fd = self._fd, -1
            os.close(fd)


class StepProcess:
    """A step's process: its output as a stream, its exit awaited on the event loop.

    Started by :mod:`subprocess` (``vfork`` + ``exec``), not by the event loop's
    ``subprocess_exec``: Ray runs async actors on uvloop, whose spawn is a full
    ``fork()`` of the worker process, measured at 4-5 ms of CPU and 11-13 ms of wall
    time per step inside a WorkerActor against ~0.15 ms this way. ``Popen`` blocks
    the loop only until the child has called ``exec``, as asyncio's own spawn does.
    """

    def __init__(self, popen: subprocess.Popen[bytes], stdout: asyncio.StreamReader,
                 pipe: _PipeReader) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdout = stdout
        self._pipe = pipe

    def __repr__(self) -> str:
        return f"StepProcess(pid={self.pid}, returncode={self._popen.returncode})"

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited (reaping it), else None."""
        return self._popen.poll()

    async def exited(self) -> None:
        """Return once the process has exited, whether or not its output has ended (a
        background job of the step can hold the pipe open indefinitely)."""
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return  # already exited and reaped
        except (AttributeError, OSError):  # no pidfd (old kernel, not Linux)
            while self.returncode is None:  # noqa: ASYNC110 - no event to wait on here
                await asyncio.sleep(0.05)
            return
        gone: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await gone
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def wait(self) -> int:
        """The exit status, once the process has exited."""
        await self.exited()
        return self._popen.wait()  # it has exited: reaps at once

    def close_output(self) -> None:
        """Stop reading the output (a stray process may keep the pipe open)."""
        self._pipe.close()


def _args_file(args: Sequence[str]) -> int:
    """A file descriptor of an in-memory file holding ``args`` NUL-separated (for bwrap's
    ``--args``), read from its start; the caller closes it."""
    data = b"".join(os.fsencode(a) + b"\0" for a in args)
    if data.count(b"\0") != len(args):
        raise ValueError("embedded null byte")  # as subprocess says of such a variable
    fd = os.memfd_create("vela-step-args", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _start(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path,
                 pass_fds: Sequence[int] = ()) -> StepProcess:
    read_fd, write_fd = os.pipe()  # both close-on-exec; the child gets its end as stdout
    try:
        # Blocks only until the child has exec'd (vfork), as asyncio's own spawn does.
        popen = subprocess.Popen(  # noqa: ASYNC220
            list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=write_fd, stderr=subprocess.STDOUT, start_new_session=True,
            close_fds=True, pass_fds=tuple(pass_fds))
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    reader = asyncio.StreamReader(limit=_STREAM_LIMIT)
    try:
        pipe = _PipeReader(read_fd, reader, asyncio.get_running_loop())
    except BaseException:
        os.close(read_fd)
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        raise
    return StepProcess(popen, reader, pipe)


class LocalRuntime(Runtime):
    """Runs steps directly on the host. No isolation: trusted hosts only.

    The step still gets only the environment the executor builds, and its
    own HOME and TMPDIR inside the build directory, but it can read anything
    the worker's user can read, and use the network.
    """

    name = "local"
    sandboxed = False

    def paths(self, dirs: BuildDirs) -> StepPaths:
        return StepPaths(str(dirs.workspace), str(dirs.home), str(dirs.tmp))

    async def spawn(
        self, script: str, *, env: Mapping[str, str], dirs: BuildDirs
    ) -> StepProcess:
        return await _start(["/bin/sh", "-e", "-c", script], env=env, cwd=dirs.workspace)


# /etc entries a step may need (users, DNS, TLS roots, Debian's alternatives
# symlinks, the dynamic linker cache); everything else in /etc stays out.
_ETC_ENTRIES = (
    "passwd", "group", "nsswitch.conf", "hosts", "host.conf", "resolv.conf", "gai.conf",
    "services", "protocols", "networks", "ssl", "ca-certificates", "ca-certificates.conf",
    "pki", "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime",
    "os-release", "debian_version", "mime.types", "inputrc", "profile",
)
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class BwrapRuntime(Runtime):
    """Runs each step in its own bubblewrap sandbox.

    New user/pid/net/ipc/uts/cgroup namespaces (``--unshare-all``; the host
    network only when ``network``), no capabilities, a read-only root made of
    the system directories, fresh ``/proc``, ``/dev``, ``/tmp`` and HOME, and
    the build workspace read-write at ``/vela/workspace``. Nothing else of
    the host is mounted, so the worker's key directory, ``/tmp/ray`` and
    ``~/.ray/auth_token`` do not exist inside. ``hidden_paths`` that lie under
    a bound directory are covered by an empty tmpfs (directories) or an
    empty file.
    """

    name = "bwrap"
    sandboxed = True
    WORKSPACE = "/vela/workspace"
    HOME = "/vela/home"

    def __init__(
        self,
        *,
        network: bool = False,
        hidden_paths: Sequence[Path] = DEFAULT_HIDDEN_PATHS,
        ro_binds: Sequence[Path] = (),
        bwrap: str | None = None,
    ) -> None:
        path = bwrap or shutil.which("bwrap")
        if path is None or not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise SandboxUnavailable(
                f"bubblewrap (`bwrap`) is not installed: {INSTALL_HINT}, or {UNSANDBOXED_HINT}"
            )
        self.bwrap = path
        self.network = network
        self.hidden_paths = tuple(hidden_paths)
        self.ro_binds = tuple(Path(p) for p in ro_binds)

    def __repr__(self) -> str:
        return f"BwrapRuntime(network={self.network}, bwrap={self.bwrap!r})"

    def paths(self, dirs: BuildDirs) -> StepPaths:
        return StepPaths(self.WORKSPACE, self.HOME, "/tmp")  # noqa: S108 - the sandbox's own tmpfs

    def argv(self, script: str, dirs: BuildDirs) -> list[str]:
        """The full bwrap command line (no secrets: those travel in the env)."""
        args = [
            self.bwrap,
            "--unshare-all",
            *(["--share-net"] if self.network else []),
            "--die-with-parent",
            # No --new-session: bwrap would setsid() its init (pid 1 of the
            # sandbox), taking it out of the process group that kill() reaches
            # and leaving the step's end to --die-with-parent alone, which CI
            # once saw miss (a cancelled step's processes lived on). The step
            # already leads a session of its own with no controlling terminal
            # (_start's start_new_session), which is what --new-session guards:
            # nothing inside can reach the worker's terminal (TIOCSTI).
            "--cap-drop", "ALL",
            "--hostname", "vela-step",
        ]
        binds: list[tuple[Path, str]] = []  # (host source, sandbox destination)

        def ro(src: Path, dest: str) -> None:
            args.extend(["--ro-bind", str(src), dest])
            binds.append((src.resolve(), dest))

        ro(Path("/usr"), "/usr")
        for name in _ROOT_LINKS:
            host = Path("/") / name
            if host.is_symlink():
                args.extend(["--symlink", os.readlink(host), f"/{name}"])
            elif host.is_dir():
                ro(host, f"/{name}")
        for name in _ETC_ENTRIES:
            host = Path("/etc") / name
            if host.exists():
                ro(host, f"/etc/{name}")
        args += [
            "--proc", "/proc",
            "--dev", "/dev",
            "--tmpfs", "/tmp",  # noqa: S108 - a fresh tmpfs inside the sandbox
            "--tmpfs", self.HOME,
        ]
        for extra in self.ro_binds:  # after /tmp, so a tool dir under /tmp stays visible
            ro(extra, str(extra))
        args += ["--bind", str(dirs.workspace), self.WORKSPACE]
        binds.append((dirs.workspace.resolve(), self.WORKSPACE))
        args += self._cover_hidden(binds, dirs)
        args += ["--remount-ro", "/", "--chdir", self.WORKSPACE, "--"]
        # The step's environment is not here: on the command line its secrets would be
        # readable by any host user and inside the sandbox as /proc/1/cmdline. spawn
        # hands it over as --setenv options read from a file descriptor (--args).
        args += ["/bin/sh", "-e", "-c", script]
        return args

    def _cover_hidden(self, binds: list[tuple[Path, str]], dirs: BuildDirs) -> list[str]:
        out: list[str] = []
        for hidden in self.hidden_paths:
            try:
                real = Path(hidden).resolve()
            except OSError:
                continue
            if not real.exists():
                continue
            for src, dest in binds:
                if real != src and src not in real.parents:
                    continue
                inside = str(Path(dest) / real.relative_to(src))
                if real.is_dir():
                    out += ["--tmpfs", inside, "--remount-ro", inside]
                else:
                    out += ["--ro-bind", str(dirs.empty_file()), inside]
        return out

    async def spawn(
        self, script: str, *, env: Mapping[str, str], dirs: BuildDirs
    ) -> StepProcess:
        """bwrap itself runs with an empty environment: the host's dynamic linker loads
        it, so a step's ``LD_PRELOAD`` (or any loader or libc variable) would run code
        on the host, outside the sandbox. The step's environment reaches the sandbox
        through ``--clearenv``/``--setenv`` options bwrap reads from a memory file."""
        fd = _args_file(["--clearenv", *(x for k, v in env.items() for x in ("--setenv", k, v))])
        try:
            argv = self.argv(script, dirs)
            return await _start([argv[0], "--args", str(fd), *argv[1:]], env={},
                                cwd=dirs.workspace, pass_fds=(fd,))
        finally:
            os.close(fd)

    def probe(self, timeout_s: float = 10.0) -> None:
        """Run ``true`` in a sandbox; raise :class:`SandboxUnavailable` if it fails."""
        with tempfile.TemporaryDirectory(prefix="vela-probe-") as tmp:
            argv = self.argv("true", BuildDirs.create(Path(tmp)))
            try:
                res = subprocess.run(
                    argv, env={"PATH": DEFAULT_PATH}, capture_output=True,
                    timeout=timeout_s, check=False, cwd=tmp, start_new_session=True,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise SandboxUnavailable(f"bubblewrap at {self.bwrap} cannot run: {e}") from None
        if res.returncode != 0:
            why = res.stderr.decode(errors="replace").strip() or f"exit code {res.returncode}"
            raise SandboxUnavailable(
                f"bubblewrap at {self.bwrap} cannot create a sandbox here ({why}); "
                "enable unprivileged user namespaces (e.g. sysctl "
                f"kernel.unprivileged_userns_clone=1), or {UNSANDBOXED_HINT}"
            )


def choose_runtime(
    *,
    allow_unsandboxed: bool,
    network: bool,
    hidden_paths: Sequence[Path] = DEFAULT_HIDDEN_PATHS,
    ro_binds: Sequence[Path] = (),
    bwrap: str | None = None,
    probe: bool = True,
) -> Runtime:
    """The bubblewrap sandbox if it works here; else the bare runtime if allowed.

    Raises :class:`SandboxUnavailable` (saying how to fix it) when there is no
    working bubblewrap and ``allow_unsandboxed`` is false.
    """
    try:
        runtime = BwrapRuntime(
            network=network, hidden_paths=hidden_paths, ro_binds=ro_binds, bwrap=bwrap
        )
        if probe:
            runtime.probe()
        return runtime
    except SandboxUnavailable as e:
        if not allow_unsandboxed:
            raise
        reason = str(e)
    logger.warning(
        "!!! RUNNING BUILD STEPS WITHOUT A SANDBOX !!! %s. Steps can read this host's "
        "files (worker keys, Ray session and auth token) and use its network%s. "
        "Only acceptable on a trusted, single-purpose host.",
        reason,
        "" if network else " (worker.network = false cannot be enforced)",
    )
    return LocalRuntime()
