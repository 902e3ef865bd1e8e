"""The page's HTTP + websocket server (aiohttp), on its own event loop in a background thread.

    server = PageServer(workspace, "127.0.0.1", 8765)     # binds now: a port in use is an error before training
    server.start()                                         # serves; prints nothing (the caller prints server.url)
    ...
    server.stop()

Security: every request and the websocket need the token (`?token=`, `X-Caption-Train-Token` or
`Authorization: Bearer`): 401 without one, 403 with a wrong one. On a loopback bind the Host header must name
the loopback address (stops DNS rebinding); a browser's Origin must be this server's. Images are served only
by the opaque ids of the scanned dataset (and only if they still resolve inside it); bodies over 64 KiB are
refused with 413; messages are validated by `schema.py` and answered with a structured error when invalid.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import mimetypes
import secrets
import socket
import threading
from importlib import resources
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import ValidationError

from caption_train.errors import UserError
from caption_train.address import is_loopback, page_url, url_host
from caption_train.iterative.schema import (
    MAX_CAPTION_CHARS, MAX_GENERATE_IMAGES, Ack, Hello, ModelCaptions, error_details, error_message, parse_client_message,
    server_message,
)
from caption_train.iterative.store import Workspace, WorkspaceError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_CLIENTS = 32
MAX_QUERY_CHARS = 200
MAX_PAGE = 100
STATUS_INTERVAL_S = 0.25
TOKEN_HEADER = "X-Caption-Train-Token"
VIEWS = ("all", "probe", "modified", "rated", "excluded", "gold", "captioned", "suspects", "not_down")
HTTP_STATUS = {"invalid_json": 400, "invalid_message": 422, "unknown_image": 404, "conflict": 409, "not_writable": 409,
               "unavailable": 409, "busy": 429, "unauthorized": 401, "forbidden": 403, "too_large": 413, "not_found": 404,
               "internal": 500}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATIC = {"main.js": "text/javascript", "main.css": "text/css"}


def bind_socket(host: str, port: int, flag: str = "--interactive") -> socket.socket:
    """A listening socket, opened now so that a busy port stops the run before anything heavy happens."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise UserError(f"{flag} {url_host(host)}:{port}: cannot resolve or open it ({error}); use an address of this machine") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise UserError(f"{flag} {url_host(host)}:{port}: cannot listen there ({error.strerror}); pick another port or host") from None
    return sock


def _json(status: int, text: str) -> Any:
    return web.Response(status=status, text=text, content_type="application/json")


def _error(code: str, message: str, details: list[dict[str, str]] | None = None, request_id: str | None = None) -> Any:
    return _json(HTTP_STATUS[code], error_message(code, message, details=details, request_id=request_id))


class PageServer:
    """Serves one Workspace. Thread-safe `publish`; `start`/`stop` from any thread."""

    def __init__(self, workspace: Workspace, host: str, port: int, *, token: str | None = None, sock: socket.socket | None = None,
                 flag: str = "--interactive"):
        self.workspace = workspace
        self.host = host
        self.sock = sock or bind_socket(host, port, flag)
        self.port = self.sock.getsockname()[1]
        self.token = token or secrets.token_urlsafe(24)
        self.loopback = is_loopback(host)
        names = {host, "127.0.0.1", "localhost", "::1"} if self.loopback else {host}
        self.allowed_hosts = {f"{url_host(name)}:{self.port}" for name in names}
        self.allowed_origins = {f"http://{netloc}" for netloc in self.allowed_hosts}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: set[Any] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._stop_event: asyncio.Event | None = None
        self._last_status = ""
        workspace.listeners.append(self.publish)

    @property
    def url(self) -> str:
        return page_url(self.host, self.port, self.token)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="caption-train-page", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._failure is not None:
            raise UserError(f"interactive page: the server did not start ({self._failure})")

    def stop(self) -> None:
        if self.loop is not None and self._stop_event is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(10)
        try:
            self.workspace.listeners.remove(self.publish)
        except ValueError:
            pass

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        try:
            runner = loop.run_until_complete(self._serve())
        except BaseException as error:  # reported by start()
            self._failure = error
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_until_complete(self._until_stopped(runner))
        finally:
            loop.close()

    async def _serve(self) -> Any:
        self._stop_event = asyncio.Event()

        @web.middleware
        async def guard(request: Any, handler: Any) -> Any:
            return await self._guard(request, handler)

        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[guard])
        app.on_response_prepare.append(self._headers)
        app.router.add_get("/", self._index)
        app.router.add_get("/index.html", self._index)
        app.router.add_get("/{name:main\\.(js|css)}", self._static)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/images", self._images)
        app.router.add_get("/api/images/{id:[0-9a-f]{16}}", self._image_info)
        app.router.add_get("/api/image/{id:[0-9a-f]{16}}", self._image_file)
        app.router.add_post("/api/message", self._message)
        app.router.add_get("/ws", self._websocket)
        static = resources.files("caption_train.iterative") / "static"
        self._files = {name: (static / name).read_bytes() for name in ("index.html", *STATIC)}
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, self.sock).start()
        self._ticker = asyncio.ensure_future(self._tick())
        return runner

    async def _until_stopped(self, runner: Any) -> None:
        assert self._stop_event is not None
        await self._stop_event.wait()
        self._ticker.cancel()
        last = server_message("status", self.workspace.status)  # e.g. "finished": the page says so instead of "disconnected"
        for ws in list(self.clients):
            try:
                await ws.send_str(last)
            except (ConnectionError, RuntimeError):
                pass
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopped")
        await runner.cleanup()

    # ------------------------------------------------------------------ pushing to the page

    def publish(self, kind: str, payload: Any) -> None:
        """Send an event to every connected page; callable from any thread."""
        if kind == "model_captions":
            text = server_message(kind, ModelCaptions(captions=payload))
        else:
            text = server_message(kind, payload)
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._broadcast, text)
            except RuntimeError:  # loop closed between the check and the call
                pass

    def _broadcast(self, text: str) -> None:
        for ws in list(self.clients):
            if ws.closed:
                self.clients.discard(ws)
                continue
            asyncio.ensure_future(self._send(ws, text))

    async def _send(self, ws: Any, text: str) -> None:
        try:
            await ws.send_str(text)
        except (ConnectionError, RuntimeError):
            self.clients.discard(ws)

    def _send_status(self, force: bool = False) -> None:
        text = server_message("status", self.workspace.status)
        if force or text != self._last_status:
            self._last_status = text
            self._broadcast(text)

    async def _tick(self) -> None:
        # Status goes out at most 4 times a second, however fast the steps are: the training thread only
        # updates a field, and never waits on the page.
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self._send_status()

    # ------------------------------------------------------------------ guards

    def _token_of(self, request: Any) -> str | None:
        token = request.query.get("token") or request.headers.get(TOKEN_HEADER)
        auth = request.headers.get("Authorization", "")
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        return token or None

    def _origin_ok(self, request: Any) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser page (a browser always sends Origin on websockets and POSTs); token still needed
        if origin in self.allowed_origins:
            return True
        # Bound to a non-loopback address, the page may be opened under any name of this machine.
        return not self.loopback and origin == f"http://{request.host}"

    async def _guard(self, request: Any, handler: Any) -> Any:
        if self.loopback and request.host and request.host not in self.allowed_hosts:
            return _error("forbidden", f"Host {request.host!r} is not this server's loopback address")
        token = self._token_of(request)
        if token is None:
            return _error("unauthorized", "missing token: open the URL printed by caption-train (it ends in ?token=...)")
        if not hmac.compare_digest(token.encode("utf-8", "replace"), self.token.encode()):
            return _error("forbidden", "wrong token: open the URL printed by this run of caption-train")
        if not self._origin_ok(request):
            return _error("forbidden", f"Origin {request.headers.get('Origin')!r} may not use this server")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error("too_large", f"request body over {MAX_BODY_BYTES} bytes")
        except web.HTTPNotFound:
            return _error("not_found", "no such page or image")
        except web.HTTPMethodNotAllowed:
            return _error("not_found", f"{request.method} is not allowed on {request.path}")

    async def _headers(self, request: Any, response: Any) -> None:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Referrer-Policy"] = "no-referrer"  # the token is in the page URL
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Cache-Control", "no-store")

    # ------------------------------------------------------------------ routes

    async def _index(self, request: Any) -> Any:
        html = self._files["index.html"].decode("utf-8").replace("__TOKEN__", self.token)
        return web.Response(text=html, content_type="text/html", charset="utf-8")

    async def _static(self, request: Any) -> Any:
        name = request.match_info["name"]
        return web.Response(body=self._files[name], content_type=STATIC[name], charset="utf-8")

    def hello(self) -> Hello:
        limits = {"max_caption_chars": MAX_CAPTION_CHARS, "max_generate_images": MAX_GENERATE_IMAGES, "max_body_bytes": MAX_BODY_BYTES}
        return Hello(status=self.workspace.status, probe=list(self.workspace.probe), limits=limits)

    async def _state(self, request: Any) -> Any:
        return _json(200, server_message("hello", self.hello()))

    async def _images(self, request: Any) -> Any:
        query = request.query
        view, text = query.get("view", "all"), query.get("q", "")
        try:
            offset, limit = int(query.get("offset", "0")), int(query.get("limit", "24"))
        except ValueError:
            return _error("invalid_message", "offset and limit must be integers")
        if view not in VIEWS or len(text) > MAX_QUERY_CHARS or offset < 0 or not 1 <= limit <= MAX_PAGE:
            return _error("invalid_message", f"view must be one of {', '.join(VIEWS)}; q at most {MAX_QUERY_CHARS} characters; 0 <= offset; 1 <= limit <= {MAX_PAGE}")
        total, infos = self.workspace.search(text, view, offset, limit)
        body = {"total": total, "offset": offset, "images": [info.model_dump(mode="json") for info in infos]}
        return _json(200, json.dumps(body))

    async def _image_info(self, request: Any) -> Any:
        try:
            info = self.workspace.info(request.match_info["id"])
        except WorkspaceError as error:
            return _error(error.code, error.message)
        return _json(200, info.model_dump_json())

    async def _image_file(self, request: Any) -> Any:
        try:
            path = self.workspace.image_file(request.match_info["id"])
        except WorkspaceError as error:
            return _error(error.code, error.message)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Type": content_type, "Cache-Control": "private, max-age=600"})

    async def _message(self, request: Any) -> Any:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _error("too_large", f"request body over {MAX_BODY_BYTES} bytes")
        if request.content_type != "application/json":
            return _error("invalid_message", "send messages as application/json")
        body = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size (also when chunked)
        status, reply = await self.handle(body)
        return _json(status, reply)

    async def _websocket(self, request: Any) -> Any:
        if len(self.clients) >= MAX_CLIENTS:
            return _error("busy", f"at most {MAX_CLIENTS} pages may be connected at once")
        ws = web.WebSocketResponse(max_msg_size=MAX_BODY_BYTES, heartbeat=20)
        await ws.prepare(request)
        self.clients.add(ws)
        try:
            await ws.send_str(server_message("hello", self.hello()))
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    _, reply = await self.handle(msg.data)
                    await ws.send_str(reply)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_str(error_message("invalid_message", "send messages as JSON text frames"))
                else:
                    break
        finally:
            self.clients.discard(ws)
        return ws

    # ------------------------------------------------------------------ messages

    async def handle(self, data: str | bytes) -> tuple[int, str]:
        """Validate and carry out one page message; (HTTP status, reply JSON). Never raises."""
        try:
            message = parse_client_message(data)
        except ValidationError as error:
            if any(item["type"] == "json_invalid" for item in error.errors()):
                return 400, error_message("invalid_json", "the message is not valid JSON")
            return 422, error_message("invalid_message", "the message does not match the schema", details=error_details(error), request_id=_request_id(data))
        try:
            assert self.loop is not None
            detail = await self.loop.run_in_executor(None, self._dispatch, message)
        except WorkspaceError as error:
            return HTTP_STATUS[error.code], error_message(error.code, error.message, request_id=message.id)
        except Exception as error:  # a bug must not take the server (or training) down: report it
            log.exception("interactive page: %s failed", message.type)
            return 500, error_message("internal", f"{message.type} failed: {type(error).__name__}: {error}", request_id=message.id)
        return 200, server_message("ack", Ack(request=message.type, detail=detail), message.id)

    def _dispatch(self, message: Any) -> dict[str, Any]:
        """Runs on a worker thread (file writes must not stall the event loop)."""
        workspace, kind, payload = self.workspace, message.type, message.payload
        if kind == "caption_new":
            return {"image": workspace.set_caption(payload.image, payload.new_caption, previous=payload.previous).model_dump(mode="json")}
        if kind == "caption_quality":
            return {"image": workspace.set_rating(payload.image, payload.quality).model_dump(mode="json")}
        if kind == "caption_accept":
            return {"image": workspace.accept(payload.image, payload.model_caption).model_dump(mode="json")}
        if kind == "caption_fine":
            return {"image": workspace.set_fine(payload.image, payload.fine, seen=payload.caption).model_dump(mode="json")}
        if kind == "caption_generate":
            return {"pending": workspace.request_captions(list(payload.images), can_generate=workspace.status.can_generate)}
        if workspace.mode != "training":
            raise WorkspaceError("unavailable", f"{kind}: there is no training to control in review mode")
        if workspace.status.state == "finished":
            raise WorkspaceError("unavailable", f"{kind}: training has finished")
        if kind == "pause":
            workspace.set_control(pause=True)
        elif kind == "resume":
            workspace.set_control(pause=False)
        elif kind == "save":
            workspace.set_control(save=True)
        return {}


def _request_id(data: str | bytes) -> str | None:
    """The id of a message that failed validation, if it has a usable one, so the error can be matched to it."""
    try:
        value = json.loads(data)
    except (ValueError, TypeError):
        return None
    request_id = value.get("id") if isinstance(value, dict) else None
    return request_id if isinstance(request_id, str) and len(request_id) <= 64 else None

