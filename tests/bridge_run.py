"""Run a bridge's stream writer over upstream reads in-process, through the runner's own loop (``pump.events``)
and the one chat-stream reader, minus HTTP and threads: what a bridged stream request writes for those reads."""
from __future__ import annotations

from proxy import pump
from proxy.errors import ProxyError
from proxy.translate.anthropic.bridge import MESSAGES
from proxy.translate.anthropic.stream import MessageStream
from proxy.translate.bridge import EventWriter, Exchange, MachineWriter, Protocol
from proxy.translate.chat_reads import read_batches
from proxy.translate.responses.bridge import RESPONSES, ResponsesWriter
from proxy.translate.responses.stream import ResponsesStream


class Unmapped(Protocol):
    """A protocol whose errors reach its writer as they are (a writer tested before its bridge exists)."""

    name = "unmapped"

    def client_error(self, error: ProxyError) -> ProxyError:
        return error


def written(protocol: Protocol, writer: EventWriter, reads: list[bytes], fast: bool = True,
            max_bytes: int = 1 << 20) -> bytes:
    """Every byte the client gets for ``reads`` (the 200 already committed)."""
    source = pump.Direct(read_batches(reads, max_bytes, fast, every_read=True), max_bytes)
    return b"".join(pump.events(protocol, Exchange(), writer, source, [], lambda *args: None))


def machine_written(stream, reads: list[bytes], fast: bool = True) -> bytes:
    """For a state machine shaped like ``MessageStream`` (``MachineWriter``), its errors unmapped."""
    return written(Unmapped(), MachineWriter(stream), reads, fast)


def anthropic_written(stream: MessageStream, reads: list[bytes], fast: bool = True) -> bytes:
    return written(MESSAGES, MachineWriter(stream), reads, fast)


def responses_written(stream: ResponsesStream, reads: list[bytes], fast: bool = True) -> bytes:
    return written(RESPONSES, ResponsesWriter(stream), reads, fast)
