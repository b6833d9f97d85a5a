"""A Flower grid that streams a round: few messages in flight, replies as they come.

``Grid.send_and_receive`` returns all of a round's replies at once.
:class:`StreamingGrid` wraps any grid and returns an *iterator*: at most
``window`` messages are unanswered at once, taken lazily from the strategy,
and each reply is yielded as it comes, to be folded and dropped. The
``timeout`` covers the whole round.

Example
-------
>>> class Nodes:
...     def get_node_ids(self):
...         return [11, 12]
>>> grid = StreamingGrid(Nodes(), window=2)
>>> grid.get_node_ids(), grid.window
([11, 12], 2)
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator

from flwr.app import Message

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_WINDOW", "StreamingGrid"]

#: Default number of unanswered messages at once.
DEFAULT_WINDOW = 64
# Messages pushed per call: the ServerApp holds at most these at a time.
_PUSH_BATCH = 8


class StreamingGrid:
    """Wrap a Flower grid so that a round streams.

    Arguments
    ---------
    grid : Grid
    window : int
        Most unanswered messages at once; 0 for no limit.
    poll_interval : float
        Seconds between pulls when no reply came.
    """

    def __init__(
        self, grid, window: int = DEFAULT_WINDOW, poll_interval: float = 0.1
    ) -> None:
        if int(window) < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.grid = grid
        self.window = int(window)
        self.poll_interval = float(poll_interval)

    def __getattr__(self, name: str):
        # Everything but send_and_receive is the wrapped grid's.
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterator[Message]:
        """Push the messages a few at a time and yield the replies as they come.

        Arguments
        ---------
        messages : iterable of Message
            Taken lazily: each is built only when it is about to go.
        timeout : float, optional
            Seconds for the whole exchange.

        Returns
        -------
        iterator of Message
        """
        return self._stream(iter(messages), timeout)

    def _stream(self, messages: Iterator[Message], timeout: float | None):
        deadline = None if timeout is None else time.monotonic() + timeout
        inflight: set[str] = set()
        exhausted = False
        while True:
            while not exhausted and (not self.window or len(inflight) < self.window):
                room = _PUSH_BATCH
                if self.window:
                    room = min(room, self.window - len(inflight))
                batch = list(itertools.islice(messages, room))
                if not batch:
                    exhausted = True
                    break
                inflight.update(i for i in self.grid.push_messages(batch) if i)
                del batch
            if not inflight:
                return
            replies = list(self.grid.pull_messages(inflight))
            got = bool(replies)
            for reply in replies:
                inflight.discard(reply.metadata.reply_to_message_id)
            while replies:
                yield replies.pop(0)  # dropped here once the consumer is done
            if deadline is not None and time.monotonic() > deadline:
                # The rest of the iterable is not taken: never built, never sent.
                logger.warning(
                    "round timeout: %d message(s) unanswered%s",
                    len(inflight),
                    "" if exhausted else "; the rest were not sent",
                )
                return
            full = exhausted or (self.window and len(inflight) >= self.window)
            if not got and full:
                time.sleep(self.poll_interval)
