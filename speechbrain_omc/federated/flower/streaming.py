"""A Flower grid that streams a round: few messages in flight, replies as they come.

Flower's ``Grid.send_and_receive`` pushes every message of a round, then
returns every reply at once: the ServerApp holds clients-per-round
broadcasts and as many replies (and Flower's simulation keeps them all in
its in-memory state as well). :class:`StreamingGrid` wraps any grid and
keeps Flower's round loop (``Strategy.start``) unchanged:

* ``send_and_receive`` returns an *iterator*: messages are taken from the
  strategy's (lazy) iterable and pushed a few at a time, at most ``window``
  unanswered at once, and each reply is yielded as soon as it is pulled, so
  that :class:`~speechbrain_omc.federated.flower.strategy.OMCFedAvg` folds it
  into the server's running sums and drops it before the next arrives;
* the round's ``timeout`` covers the whole round: when it passes, messages
  not yet pushed are never sent (their clients are left out, as silent ones).

Everything else is delegated. The window trades memory for parallelism: the
server holds at most ``window`` broadcasts in Flower's state (plus the
replies that wait for their turn in the fold order), and at most ``window``
clients train at once. The Simulation Engine runs as many as its actors;
a deployment of devices wants a window as large as the devices that may
train at once.

Example
-------
Everything but ``send_and_receive`` is the wrapped grid's (the behaviour
of a streamed round is tested in ``tests/test_streaming_aggregation.py``):

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
    """Wrap a Flower grid so that a round streams (see the module docstring).

    Arguments
    ---------
    grid : Grid
        The run's grid (Flower's in-memory or gRPC grid).
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
            Taken lazily: a message is built only when it is about to go.
        timeout : float, optional
            Seconds for the whole exchange (``None``: no limit).

        Returns
        -------
        iterator of Message
            The replies, in arrival order.
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
