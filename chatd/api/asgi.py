"""The ASGI connection of chatd's HTTP apps: quart-trio's, except that a request whose answer is
being sent is not cancelled when the server learns the request is over.

quart-trio cancels the request's handler as soon as hypercorn reports ``http.disconnect``; hypercorn
reports it while it is closing a connection that cannot be reused (an answer with ``Connection:
close`` to a request whose body was not read to its end: 401 or 413 before the body, 408), and that
close runs inside the handler's last ``send``: cancelled there, the socket was never closed and
stayed open until the client gave up. Here a handler that has begun to answer finishes (the sends
themselves are bounded by ``RESPONSE_TIMEOUT`` and hypercorn's shielded writes), then the socket is
closed at once.

Request bodies (:class:`BoundedBody`): the size limit counts every byte received, not what is
buffered, and nothing is buffered past a high-water mark while a route reads the body as a
stream (:meth:`BoundedBody.stream`, the media upload): the connection's reader then waits, the
ASGI queue fills, hypercorn stops reading the socket, and TCP flow control holds the client back.
Until a request's route is known (:meth:`BoundedBody.decide`, the first ``before_request``), at
most ``UNDECIDED_BUFFER_BYTES`` are buffered.
"""

from __future__ import annotations

from typing import Optional, cast

import trio
from quart.wrappers import Response
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import EventWrapper, TrioBody, TrioRequest
from werkzeug.exceptions import RequestEntityTooLarge

UNDECIDED_BUFFER_BYTES = 1024 * 1024
STREAM_BUFFER_BYTES = 256 * 1024


class BoundedBody(TrioBody):
    def __init__(self, expected_content_length: Optional[int], max_content_length: Optional[int]) -> None:
        super().__init__(None, None)
        self._expected = expected_content_length
        self._max_content_length = max_content_length
        self._received = 0
        self._high_water = UNDECIDED_BUFFER_BYTES
        self._room = EventWrapper()

    def decide(self, max_bytes: Optional[int], stream: bool = False) -> None:
        """The route's limit (None: none) and whether it reads the body as a stream."""
        self._max_content_length = max_bytes
        self._high_water = STREAM_BUFFER_BYTES if stream else None
        if max_bytes is not None and max(self._expected or 0, self._received) > max_bytes:
            self._refuse()
        self._room.set()

    def _refuse(self) -> None:
        self._must_raise = RequestEntityTooLarge()
        self._data.clear()
        self.set_complete()

    def append(self, data: bytes) -> None:
        if data == b"" or self._must_raise is not None:
            return
        self._received += len(data)
        if self._max_content_length is not None and self._received > self._max_content_length:
            self._refuse()
            return
        self._data.extend(data)
        self._has_data.set()

    async def __anext__(self) -> bytes:
        # (Body.__anext__ checks the limit only before it waits: a body refused while a reader
        # waited would end as if complete, truncated. Checked again after the wait here.)
        if self._must_raise is not None:
            raise self._must_raise
        if not self._complete.is_set():
            await self._has_data.wait()
        if self._must_raise is not None:
            raise self._must_raise
        if self._complete.is_set() and not self._data:
            raise StopAsyncIteration()
        data = bytes(self._data)
        self._data.clear()
        self._has_data.clear()
        self._room.set()
        return data

    async def wait_room(self) -> None:
        """Until the buffer is below its high-water mark (or the body is over)."""
        while (self._high_water is not None and len(self._data) >= self._high_water
               and self._must_raise is None and not self._complete.is_set()):
            self._room.clear()
            await self._room.wait()


class ChatdRequest(TrioRequest):
    body_class = BoundedBody


class HTTPConnection(TrioASGIHTTPConnection):
    _answering = False

    async def handle_messages(self, nursery: trio.Nursery, request, receive) -> None:  # type: ignore[override]
        body = request.body
        while True:
            await body.wait_room()
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body.set_complete()
            elif message["type"] == "http.disconnect":
                break
        if not self._answering:  # the client left before the answer: stop working for it
            nursery.cancel_scope.cancel()

    async def handle_request(self, nursery: trio.Nursery, request, send) -> None:  # type: ignore[override]
        response = await self.app.handle_request(request)
        if isinstance(response, Response) and response.timeout != Ellipsis:
            timeout = cast(Optional[float], response.timeout)
        else:
            timeout = self.app.config["RESPONSE_TIMEOUT"]
        self._answering = True
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            await self._send_response(send, response)
        nursery.cancel_scope.cancel()
