"""Server-Sent Events decoding, without IO: bytes in, event data out.

Used on the upstream side, where providers stream their answers as SSE.
"""

from __future__ import annotations

MAX_EVENT_BYTES = 1024 * 1024  # a model's delta is a few bytes; a bigger event is a broken provider


class EventTooLarge(ValueError):
    """An event (or a line of one) passed MAX_EVENT_BYTES: buffering on would be unbounded."""


class SseDecoder:
    """Collects `data:` lines into events; a blank line ends an event."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._partial = b""  # an unfinished line from the previous read
        self._data: list[str] = []
        self._size = 0  # characters in self._data
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event that `chunk` completes, in order; EventTooLarge
        when one grows past the limit (a line without end counts as it arrives)."""
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self._max:
            raise EventTooLarge(f"an event is larger than {self._max} bytes")
        events = []
        for line in lines:
            event = self.feed_line(line.removesuffix(b"\r").decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
        return events

    def feed_line(self, line: str) -> str | None:
        """Feed one line without its ending; returns an event's data when one ends."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment, such as a keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            data = value[1:] if value.startswith(" ") else value
            self._size += len(data)
            if self._size > self._max:
                raise EventTooLarge(f"an event is larger than {self._max} bytes")
            self._data.append(data)
        return None

    def close(self) -> str | None:
        """The event left when the stream ended without its blank line, if any."""
        if self._partial:
            self.feed_line(self._partial.removesuffix(b"\r").decode("utf-8", "replace"))
            self._partial = b""
        return self._dispatch()

    def _dispatch(self) -> str | None:
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data.clear()
        self._size = 0
        return data
