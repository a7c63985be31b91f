"""Ray Serve: N replicas of the full server behind one OpenAI endpoint, requests routed by adapter name.

- `MaloraServer`: one whole `malora-serve` per replica (engine, adapter manager, the same FastAPI app, served by
  uvicorn on a free port of the replica's node). `forward` first makes sure the adapter named by Ray's multiplexed
  model id is in this replica (`@serve.multiplexed`: read on demand, LRU), then proxies the request to the app.
- `Ingress`: the HTTP entry. It reads `model` from the body and passes it as the multiplexed model id, so Ray sends
  an adapter's requests to the replicas that already hold it. Adapter changes (load, reload, unload) are not routed
  to one replica: they are broadcast to every replica's own URL, and answer 200 only when every replica took them.
- `Directory`: where each replica listens, and the last change of each adapter, which a replica started later
  (scale-up, restart) replays before it is listed.

    MALORA_API_KEY=... MALORA_ADMIN_KEY=... serve run deploy.ray.app:build_app replicas=2 \
        server_args="--adapter-root /adapters"

Replicas listening on a non-loopback address (`--host 0.0.0.0`, for several nodes) need an API key (`--api-key`, or
MALORA_API_KEY in the replicas' environment) or an explicit `--allow-unauthenticated`; an admin key has at least 16
characters and is no API key. These are `malora-serve`'s own rules, applied where its flags are parsed: `build_app`
refuses such arguments before any replica starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import shlex
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ray
import uvicorn
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.app import create_app
from server.main import build_engine
from server.settings import parse_settings

log = logging.getLogger("malora.ray")
HOP_HEADERS = {"connection", "content-length", "host", "keep-alive", "transfer-encoding"}
CHANGE_ROUTES = {("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"), ("POST", "/v1/adapters")}
ADAPTER_PREFIX = "/v1/adapters/"


def adapter_change(method: str, path: str, body: bytes) -> str | None:
    """The adapter name an admin request loads, reloads or unloads ("" if the body names none); None otherwise."""
    if (method, path) in CHANGE_ROUTES:
        fields = _json(body)
        name = fields.get("lora_name", fields.get("name"))
        return name if isinstance(name, str) else ""
    if method in ("PUT", "DELETE") and path.startswith(ADAPTER_PREFIX) and "/" not in path[len(ADAPTER_PREFIX):]:
        return path[len(ADAPTER_PREFIX):]
    return None


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _headers(headers) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_HEADERS]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Directory:
    """Where each server replica listens, and the changes a replica started later must replay.

    A replica is listed (and so reached by broadcasts) only once it has replayed every recorded change; a change
    recorded by a broadcast that did not reach a listed replica (it registered while the broadcast was in flight)
    waits for that replica's next health check."""

    def __init__(self) -> None:
        self.replicas: dict[str, dict] = {}  # replica id -> {"replica", "url", "base_models"}
        self.changes: dict[str, dict] = {}  # adapter name -> its last change {"seq", "method", "path", "body"}
        self.seq = 0  # of the last recorded change
        self.missed: dict[str, list[dict]] = {}  # listed replica id -> changes recorded without it

    def register(self, replica: str, url: str, base_models: list[str], replayed: int) -> tuple[list[dict], int]:
        """The changes after `replayed`, oldest first, and the newest seq; the replica is listed when none remain."""
        pending = sorted((c for c in self.changes.values() if c["seq"] > replayed), key=lambda c: c["seq"])
        if not pending:
            self.replicas[replica] = {"replica": replica, "url": url, "base_models": base_models}
            self.missed[replica] = []
        return pending, self.seq

    def unregister(self, replica: str) -> None:
        self.replicas.pop(replica, None)
        self.missed.pop(replica, None)

    def list(self) -> list[dict]:
        return list(self.replicas.values())

    def record(self, name: str, change: dict, reached: list[str]) -> None:
        self.seq += 1
        change = {**change, "seq": self.seq}
        self.changes.pop(name, None)
        self.changes[name] = change
        for replica, missed in self.missed.items():
            if replica not in reached:
                missed.append(change)

    def take_missed(self, replica: str) -> list[dict]:
        missed, self.missed[replica] = self.missed.get(replica, []), []
        return missed if replica in self.replicas else []


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64, health_check_period_s=10)
class MaloraServer:
    """One full server. `max_ongoing_requests` is high so that Ray keeps an adapter on the replica holding it rather
    than spilling to another while this one queues (the engine has its own queue and answers 429 past it)."""

    async def __init__(self, directory: DeploymentHandle, server_args: list[str], max_adapters: int) -> None:
        settings = parse_settings(server_args)  # the flags, then MALORA_* variables, like malora-serve
        engine, manager = await asyncio.to_thread(build_engine, settings)
        app = create_app(engine, settings, manager)
        self.state = app.state.server
        # Several replicas share a node: each listens on a free port and registers its URL.
        self.server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=0,
                                                    log_level=settings.log_level.lower(),
                                                    timeout_graceful_shutdown=settings.shutdown_timeout))
        self.serving = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.serving.done():
                self.serving.result()
                raise RuntimeError("the replica's server stopped while starting")
            await asyncio.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        host = ray.util.get_node_ip_address() if settings.host in ("0.0.0.0", "::", "") else settings.host
        self.url = f"http://{host}:{port}"
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=None)
        # /health needs no key; one is sent anyway, so that the check holds whatever the server leaves open.
        self.health_headers = {"Authorization": f"Bearer {settings.api_keys[0]}"} if settings.api_keys else {}

        async def read_adapter(name: str) -> str:
            await manager.resolve(name)  # into host memory; the request then takes an engine slot (LRU)
            return name

        self.load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(read_adapter)
        self.directory = directory
        self.replica = serve.get_replica_context().replica_id.unique_id
        base_models = sorted({self.state.base_model, engine.model_name})  # the names that mean "no adapter"
        self.admin_key = settings.admin_key
        replayed = 0
        while True:  # listed only once nothing recorded is left to replay
            changes, replayed = await directory.register.remote(self.replica, self.url, base_models, replayed)
            if not changes:
                break
            await self._replay(changes)
        log.info("replica %s serving %s at %s", self.replica, self.state.base_model, self.url)

    async def _replay(self, changes: list[dict]) -> None:
        headers = {"Authorization": f"Bearer {self.admin_key}", "Content-Type": "application/json"}
        for change in changes:
            response = await self.client.request(change["method"], change["path"], content=change["body"],
                                                 headers=headers)
            if response.status_code >= 400:
                log.warning("replaying %s %s: %d %s", change["method"], change["path"], response.status_code,
                            response.text[:200])

    async def forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
                      ) -> AsyncIterator[Any]:
        """This replica's answer: first (status, headers), then the body's chunks as the app sends them."""
        name = serve.get_multiplexed_model_id()
        if name:
            with contextlib.suppress(Exception):  # an unknown or broken adapter: the app answers with the error
                await self.load_adapter(name)
        request = self.client.build_request(method, path, headers=headers, content=body)
        response = await self.client.send(request, stream=True)
        try:
            yield response.status_code, _headers(response.headers)
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()

    async def check_health(self) -> None:
        """Ray replaces a replica whose check raises: the server stopped, or its own liveness probe `/health`
        fails (the engine thread died, or work waits and no engine step finished for --health-stall-seconds)."""
        if self.serving.done() or not self.state.ready:
            raise RuntimeError(f"replica {self.replica}: server or engine stopped")
        response = await self.client.get("/health", headers=self.health_headers, timeout=10)
        if response.status_code != 200:
            raise RuntimeError(f"replica {self.replica}: /health answered {response.status_code}: "
                               f"{response.text[:200]}")
        await self._replay(await self.directory.take_missed.remote(self.replica))

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):
            await self.directory.unregister.remote(self.replica)
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self.serving


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
class Ingress:
    def __init__(self, server: DeploymentHandle, directory: DeploymentHandle, server_args: list[str]) -> None:
        self.server = server.options(stream=True)
        self.directory = directory
        self.admin_key = parse_settings(server_args).admin_key
        self.http = httpx.AsyncClient(timeout=None)
        self.base_models: set[str] = set()

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.url.path == "/v1/replicas":
            return await self.list_replicas(request)
        name = adapter_change(request.method, request.url.path, body)
        if name is not None:
            return await self.broadcast(request.method, path, _headers(request.headers), body, name)
        model = _json(body).get("model") if request.method == "POST" else None
        if isinstance(model, str) and not self.base_models:
            self.base_models = {m for r in await self.directory.list.remote() for m in r["base_models"]}
        model_id = model if isinstance(model, str) and model not in self.base_models else ""
        stream = self.server.options(multiplexed_model_id=model_id).forward.remote(
            request.method, path, _headers(request.headers), body)
        status, headers = await stream.__anext__()
        return StreamingResponse(_chunks(stream), status_code=status, headers=dict(headers))

    async def list_replicas(self, request: Request) -> Response:
        """Every replica's own URL (for per-replica metrics and checks); admin key when one is set."""
        if self.admin_key and request.headers.get("authorization") != f"Bearer {self.admin_key}":
            return _error(401, "missing or invalid admin key", "invalid_admin_key")
        return JSONResponse({"data": await self.live_replicas()})

    async def live_replicas(self) -> list[dict]:
        """The registered replicas that still answer; one that is gone (killed, crashed) is forgotten."""
        replicas = await self.directory.list.remote()
        probes = await asyncio.gather(*(self.http.get(r["url"] + "/health", timeout=5) for r in replicas),
                                      return_exceptions=True)
        for replica, probe in zip(replicas, probes, strict=True):
            if isinstance(probe, httpx.ConnectError):
                await self.directory.unregister.remote(replica["replica"])
        return [r for r, probe in zip(replicas, probes, strict=True) if not isinstance(probe, httpx.ConnectError)]

    async def broadcast(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes, name: str
                        ) -> Response:
        """One adapter change sent to every replica; recorded for later replicas once every replica took it."""
        replicas = await self.live_replicas()
        if not replicas:
            return _error(503, "no server replica is registered yet", "not_ready")
        answers = await asyncio.gather(*(self.http.request(method, r["url"] + path, headers=headers, content=body)
                                         for r in replicas), return_exceptions=True)
        results = [(replica, 502, str(answer), "text/plain") if isinstance(answer, Exception) else
                   (replica, answer.status_code, answer.text, answer.headers.get("content-type"))
                   for replica, answer in zip(replicas, answers, strict=True)]
        statuses = [status for _, status, _, _ in results]
        if len(set(statuses)) == 1:  # every replica agrees: their answer, as one server would give it
            if statuses[0] < 300 and name:
                await self.directory.record.remote(name, {"method": method, "path": path, "body": body.decode()},
                                                   [r["replica"] for r in replicas])
            _, status, text, media_type = results[0]
            return Response(text, status_code=status, media_type=media_type,
                            headers={"x-malora-replicas": str(len(results))})
        details = [{"url": r["url"], "status": s, "body": t[:500]} for r, s, t, _ in results]
        return _error(502, f"the adapter change reached {sum(s < 300 for s in statuses)} of {len(results)} replicas; "
                      "retry it (see `replicas`)", "partial_adapter_change", replicas=details)


async def _chunks(stream) -> AsyncIterator[bytes]:
    async for chunk in stream:
        yield chunk


def _error(status: int, message: str, code: str, **extra) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error" if status >= 500 else
                                   "invalid_request_error", "code": code, **extra}}, status_code=status)


def _check_server_args(server_args: list[str]) -> None:
    """`malora-serve`'s checks of its flags and MALORA_* variables (keys included), as a ValueError that carries
    argparse's message: Ray reports it, where an exit would only say that the builder stopped."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parse_settings(server_args)
    except SystemExit:
        lines = errors.getvalue().strip().splitlines()
        raise ValueError(f"server_args: {lines[-1] if lines else 'refused'}") from None  # (not the args: keys)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application. Args (strings from `serve run`, or typed values from a Serve config file):
    `replicas` (2), `num_cpus` (1) and `num_gpus` (0) per replica, `max_adapters_per_replica` (8: adapters Ray
    counts as held by one replica, LRU), `max_ongoing_requests` (64) per replica, and `server_args`: malora-serve
    flags (a list or one string); every MALORA_* variable of the replicas' environment applies too."""
    server_args = args.get("server_args", [])
    if isinstance(server_args, str):
        server_args = shlex.split(server_args)
    _check_server_args(server_args)  # bad flags and missing keys fail here, not in every replica
    directory = Directory.bind()
    server = MaloraServer.options(
        num_replicas=int(args.get("replicas", 2)),
        max_ongoing_requests=int(args.get("max_ongoing_requests", 64)),
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1)), "num_gpus": float(args.get("num_gpus", 0))},
    ).bind(directory, server_args, int(args.get("max_adapters_per_replica", 8)))
    return Ingress.bind(server, directory, server_args)
