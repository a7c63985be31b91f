"""`create_app()`: the FastAPI application around an engine client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI

from malora_runtime.adapters.manager import AdapterManager

from . import __version__
from .engine_client import EngineClient
from .errors import install_error_handlers
from .metrics import ErrorMetricsMiddleware, ServerMetrics
from .middleware import AuthMiddleware, BodyLimitMiddleware
from .routes import router
from .serving import ServerState
from .serving_adapters import AdaptersServing
from .serving_chat import ChatServing
from .serving_completions import CompletionServing
from .serving_models import ModelsServing
from .serving_tokenize import TokenizeServing
from .settings import ServerSettings
from .telemetry import Telemetry

log = logging.getLogger(__name__)


def create_app(engine: EngineClient | None, settings: ServerSettings, adapters: AdapterManager | None = None
               ) -> FastAPI:
    """The API over `engine` (None: not ready yet; set `app.state.server.engine` later).

    The app's lifespan starts the engine and, on shutdown, lets in-flight requests finish up to
    `settings.shutdown_timeout` before stopping it.
    """
    state = ServerState(settings, engine, adapters, settings.served_model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        if state.engine is not None:
            state.engine.start()
            log.info("ready: model %s, %d adapter(s)", state.base_model,
                     len(adapters.views()) if adapters is not None else 0)
        yield
        state.draining = True
        if state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown, settings.shutdown_timeout)
        if adapters is not None:
            adapters.close()

    app = FastAPI(title="MALoRA Serve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API for one base model and many MALoRA adapters.")
    app.state.server = state
    app.state.completions = CompletionServing(state)
    app.state.chat = ChatServing(state)
    app.state.tokenize = TokenizeServing(state)
    app.state.models = ModelsServing(state, int(time.time()))
    app.state.adapters = AdaptersServing(state)
    metrics = ServerMetrics(state.base_model if engine is not None else "base",
                            settings.metrics_max_adapters, settings.vllm_compatible_metrics)
    app.state.telemetry = Telemetry(state, metrics)
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(ErrorMetricsMiddleware, metrics=lambda: metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_keys=settings.api_keys, open_health=settings.open_health,
                       admin_key=settings.admin_key, public_metrics=settings.public_metrics)
    return app
