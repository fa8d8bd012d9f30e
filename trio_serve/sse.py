"""Server-Sent Events decoding, without IO: lines in, event data out.

Used on the upstream side, where providers stream their answers as SSE.
"""

from __future__ import annotations


class SseDecoder:
    """Collects `data:` lines into events; a blank line ends an event."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str) -> str | None:
        """Feed one line without its ending; returns an event's data when one ends."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment, such as a keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def close(self) -> str | None:
        """The event left when the stream ended without its blank line, if any."""
        return self._dispatch()

    def _dispatch(self) -> str | None:
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data.clear()
        return data
