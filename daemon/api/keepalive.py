"""A response sent before its request's body arrived in full says `Connection: close`.

Hypercorn reuses a keep-alive connection only when the request it answered was received to its
end; otherwise it closes the connection after the response, without saying so. A route that
answers without reading the body (a refusal, Ollama's pull/delete/copy, an auth failure, a 404)
then raced the client: a client that reused the connection for its next request got "Server
disconnected without sending a response" (CI saw it from the `ollama` library's delete right
after a refused pull). Saying `Connection: close` makes the client open a fresh connection. A
request whose body was received in full keeps its connection.
"""

from __future__ import annotations


def _has_body(scope: dict) -> bool:
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


def with_unread_bodies_closing(asgi_app):
    """`asgi_app`, adding `Connection: close` to a response that starts before the request's body
    was received to its last byte."""

    async def app(scope, receive, send):
        if scope["type"] != "http" or not _has_body(scope):
            return await asgi_app(scope, receive, send)
        received = False

        async def tracked():
            nonlocal received
            message = await receive()
            if message["type"] == "http.disconnect" or (
                    message["type"] == "http.request" and not message.get("more_body", False)):
                received = True
            return message

        async def closing(message):
            if message["type"] == "http.response.start" and not received:
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await asgi_app(scope, tracked, closing)

    return app
