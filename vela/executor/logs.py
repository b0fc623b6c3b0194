"""Turn a step's output stream into masked lines, delivered in batches."""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Awaitable, Callable

from vela.executor.masking import Masker

READ_CHUNK = 64 * 1024
# Longer lines are split: output without newlines must not grow memory.
MAX_LINE_CHARS = 16 * 1024

Deliver = Callable[[list[str]], Awaitable[None]]


class LinePump:
    """Reads a stream to EOF and calls ``deliver`` with batches of masked lines.

    A batch is delivered when it holds ``batch_lines`` lines, when its first
    line is ``flush_s`` old, and at EOF. Nothing unmasked is ever delivered.
    ``eof`` is set when the stream has ended (delivery may still be going on);
    ``idle_since`` is the loop time since which the pump has been waiting for
    data, or None while it is busy — so a caller can tell a slow reporter from
    a pipe that some stray process keeps open.
    """

    def __init__(
        self,
        stream: asyncio.StreamReader,
        deliver: Deliver,
        *,
        masker: Masker,
        batch_lines: int,
        flush_s: float,
        max_line_chars: int = MAX_LINE_CHARS,
    ) -> None:
        self.stream = stream
        self.deliver = deliver
        self.masker = masker
        self.batch_lines = batch_lines
        self.flush_s = flush_s
        self.max_line_chars = max_line_chars
        self.eof = asyncio.Event()
        self.idle_since: float | None = None
        self._batch: list[str] = []
        self._deadline = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        partial = ""
        while not self.eof.is_set():
            timeout = max(0.0, self._deadline - loop.time()) if self._batch else None
            self.idle_since = loop.time()
            try:
                async with asyncio.timeout(timeout):
                    data = await self.stream.read(READ_CHUNK)
            except TimeoutError:
                self.idle_since = None
                await self._flush()
                continue
            self.idle_since = None
            if not data:
                self.eof.set()
            partial += decoder.decode(data, final=self.eof.is_set())
            *lines, partial = partial.split("\n")
            for line in lines:
                self._add(line.removesuffix("\r"))
            partial = self._split_long(partial)
            if self.eof.is_set() and partial:
                self._add(partial.removesuffix("\r"))
            if len(self._batch) >= self.batch_lines or (
                self._batch and loop.time() >= self._deadline
            ):
                await self._flush()
        await self._flush()

    def _add(self, line: str) -> None:
        if not self._batch:
            self._deadline = asyncio.get_running_loop().time() + self.flush_s
        self._batch.append(self.masker.mask(line))

    def _split_long(self, partial: str) -> str:
        while len(partial) > self.max_line_chars:
            cut = self.masker.safe_cut(partial, self.max_line_chars)
            if cut <= 0:
                if len(partial) <= 4 * self.max_line_chars:
                    break
                cut = self.max_line_chars  # a secret longer than a line: best effort
            self._add(partial[:cut])
            partial = partial[cut:]
        return partial

    async def _flush(self) -> None:
        while self._batch:
            chunk, self._batch = self._batch[: self.batch_lines], self._batch[self.batch_lines :]
            await self.deliver(chunk)
