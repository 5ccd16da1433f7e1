"""Commands in the guest: a shell on its serial console, driven with pexpect.

Each command runs in a fresh ``sh -c`` (like ``ssh HOST COMMAND``) with its
standard input on /dev/null, in /root. It travels base64-encoded, so no quote,
newline or syntax error in it can desynchronize the console; its output is
framed by two marker lines that carry a random token and, at the end, the exit
status. The markers are printed by ``printf`` from pieces, so the command line
itself never contains them. Kernel messages are kept off the console (``dmesg
-n 1``): read them with :meth:`GuestShell.kernel_log`.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
from dataclasses import dataclass

from ..machine.console import Console, GuestFailed, GuestTimeout

SHELL_READY = "pviommu-guest: a shell on the console"
"""What the guest's init prints right before it starts the shell."""
CHUNK = 768
"""Characters of encoded command per console line: a tty takes at most 4095 per line."""
INTERRUPT_GRACE = 5.0
"""Seconds a timed-out command gets to die of its Ctrl-C before the shell is lost."""
SETUP = "stty -echo; dmesg -n 1; PS1='lab# '"


class CommandFailed(Exception):
    """A guest command ``check``-ed by the caller exited with a non-zero status."""

    def __init__(self, result: CommandResult) -> None:
        tail = "\n".join(result.output.splitlines()[-10:])
        super().__init__(f"guest command {result.command!r} exited with status {result.status}"
                         + (f"; its output ends with:\n{tail}" if tail else "; no output"))
        self.result = result


class CommandTimeout(GuestTimeout):
    """A guest command did not finish in time; ``output`` is what it printed until then."""

    def __init__(self, message: str, command: str, output: str) -> None:
        super().__init__(message)
        self.command = command
        self.output = output


@dataclass(frozen=True)
class CommandResult:
    """What one guest command did: its exit status, output (stdout and stderr
    interleaved, as the console showed them) and duration in seconds."""

    command: str
    status: int
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether it exited with status 0."""
        return self.status == 0

    def lines(self) -> list[str]:
        """The output's lines."""
        return self.output.splitlines()


class GuestShell:
    """Runs commands one at a time in the guest's console shell."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._lock = asyncio.Lock()
        self._lost: str | None = None

    async def ready(self, timeout: float) -> None:
        """Waits for the guest's shell and quiets the console for command output."""
        await self.console.wait_match(0, re.compile(re.escape(SHELL_READY)),
                                      "its shell", timeout)
        # The first command also proves the shell reads the console.
        await self._run(SETUP, timeout, raw=True)

    async def run(self, command: str, timeout: float = 60, check: bool = False
                  ) -> CommandResult:
        """Runs ``command`` (a shell command line) and returns its status and output.

        After ``timeout`` seconds the command gets a Ctrl-C and
        :class:`CommandTimeout` is raised with what it printed so far; with
        ``check`` a non-zero status raises :class:`CommandFailed`.
        :class:`~pviommu.machine.console.GuestFailed` means the guest is gone.
        """
        result = await self._run(command, timeout)
        if check and not result.ok:
            raise CommandFailed(result)
        return result

    async def spawn(self, command: str, timeout: float = 30) -> None:
        """Starts ``command`` in the background and returns at once; its output goes
        to the console (watch it with :class:`~pviommu.machine.console.Console`), its
        standard input is /dev/null. It runs until it ends, or the guest does."""
        encoded = base64.b64encode(command.encode()).decode()
        await self.run(f"echo {encoded} | base64 -d > /tmp/.lab-spawn.$$ && "
                       f"(sh /tmp/.lab-spawn.$$; rm -f /tmp/.lab-spawn.$$) "
                       ">/dev/console 2>&1 </dev/null &", timeout, check=True)

    async def raw(self, command: str, timeout: float = 30) -> CommandResult:
        """Runs ``command`` in the console's shell itself, not in a child ``sh -c``, so
        that it can change the shell (``cd``, variables, ``stty``). It is typed as it
        is: it must be one line of complete shell syntax."""
        return await self._run(command, timeout, raw=True)

    async def _run(self, command: str, timeout: float, raw: bool = False) -> CommandResult:
        async with self._lock:
            if self._lost is not None:
                raise GuestFailed(f"the guest's shell is lost: {self._lost}")
            token = secrets.token_hex(6)
            begin = re.compile(rf"@@PVB {token}$")
            end = re.compile(rf"@@PVE {token} (\d+)$")
            start = len(self.console.lines)
            t0 = time.monotonic()
            for line in self._lines(command, token, raw):
                self.console.send(line + "\n")
            what = f"the end of {command!r}"
            try:
                first, _ = await self.console.wait_match(start, begin, what, timeout)
                left = max(0.1, timeout - (time.monotonic() - t0))
                last, m = await self.console.wait_match(first + 1, end, what, left)
            except GuestTimeout:
                output = self._output(start, None, begin)
                raise await self._interrupted(command, timeout, output) from None
            return CommandResult(command, int(m.group(1)), self._output(first + 1, last, end),
                                 round(time.monotonic() - t0, 3))

    @staticmethod
    def _lines(command: str, token: str, raw: bool) -> list[str]:
        """What is typed: the framed command, its encoded text in chunks if long."""
        mark_begin = f"printf '@@%s %s\\n' PVB {token}"
        mark_end = f"printf '@@%s %s %d\\n' PVE {token} \"$?\""
        if raw:  # the shell's own setup: runs in the shell itself, not in sh -c
            return [f"{mark_begin}; {command}; {mark_end}"]
        encoded = base64.b64encode(command.encode()).decode()
        if len(encoded) <= CHUNK:
            body = f"sh -c \"$(echo {encoded} | base64 -d)\" </dev/null"
            return [f"{mark_begin}; {body}; {mark_end}"]
        script = f"/tmp/.lab-{token}"
        lines = [f"rm -f {script}"]
        lines += [f"echo {encoded[i:i + CHUNK]} >> {script}"
                  for i in range(0, len(encoded), CHUNK)]
        body = f"sh -c \"$(base64 -d {script})\" </dev/null"
        return lines + [f"{mark_begin}; {body}; {mark_end}; rm -f {script}"]

    def _output(self, start: int, stop: int | None, marker: re.Pattern[str]) -> str:
        """The console text from line ``start`` up to line ``stop`` (None: all so
        far); on line ``stop`` only what precedes ``marker`` (the command's last
        line if it did not end with a newline)."""
        lines = self.console.lines
        if stop is None:
            found = next((i for i in range(start, len(lines)) if marker.search(lines[i])), None)
            body = lines[found + 1:] if found is not None else []
            return "\n".join(body)
        text = "\n".join(lines[start:stop])
        if stop > start:
            text += "\n"
        m = marker.search(lines[stop])
        return text + (lines[stop][:m.start()] if m else "")

    async def _interrupted(self, command: str, timeout: float, output: str
                           ) -> CommandTimeout:
        """Interrupts a command that ran out of time (Ctrl-C; the shell then drops the
        rest of the line, the end marker too) and checks that the shell answers
        again; returns the error that says what the command did."""
        self.console.send("\x03")
        token = secrets.token_hex(6)
        start = len(self.console.lines)
        self.console.send(f"printf '@@%s %s\\n' PVS {token}\n")
        try:
            await self.console.wait_match(start, re.compile(rf"@@PVS {token}$"),
                                          "the shell after a Ctrl-C", INTERRUPT_GRACE)
            after = "it was interrupted with Ctrl-C"
        except (GuestTimeout, GuestFailed) as exc:
            self._lost = f"{command!r} timed out and did not stop on Ctrl-C ({exc})"
            after = "it did not stop on Ctrl-C: the shell is lost"
        tail = "\n".join(output.splitlines()[-15:])
        said = f"its last output:\n{tail}" if tail else "it printed nothing"
        return CommandTimeout(f"guest command {command!r} did not finish within {timeout:g}s; "
                              f"{after}; {said}", command, output)

    async def kernel_log(self, timeout: float = 30) -> list[str]:
        """The guest kernel's log (``dmesg``), one line per message."""
        return (await self.run("dmesg", timeout, check=True)).lines()
