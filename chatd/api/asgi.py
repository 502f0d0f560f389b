"""The ASGI connection of chatd's HTTP apps: quart-trio's, except that a request whose answer is
being sent is not cancelled when the server learns the request is over.

quart-trio cancels the request's handler as soon as hypercorn reports ``http.disconnect``; hypercorn
reports it while it is closing a connection that cannot be reused (an answer with ``Connection:
close`` to a request whose body was not read to its end: 401 or 413 before the body, 408), and that
close runs inside the handler's last ``send``: cancelled there, the socket was never closed and
stayed open until the client gave up. Here a handler that has begun to answer finishes (the sends
themselves are bounded by ``RESPONSE_TIMEOUT`` and hypercorn's shielded writes), then the socket is
closed at once.
"""

from __future__ import annotations

from typing import Optional, cast

import trio
from quart.asgi import ASGIHTTPConnection
from quart.wrappers import Response
from quart_trio.asgi import TrioASGIHTTPConnection


class HTTPConnection(TrioASGIHTTPConnection):
    _answering = False

    async def handle_messages(self, nursery: trio.Nursery, request, receive) -> None:  # type: ignore[override]
        await ASGIHTTPConnection.handle_messages(self, request, receive)
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
