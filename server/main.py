"""`malora-serve`: load the model and adapters, then serve the API with uvicorn until a stop signal."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

import uvicorn

from malora_runtime.adapters.manager import AdapterManager
from malora_runtime.cpu_features import IsaError

from .app import create_app
from .settings import ServerSettings, parse_settings

log = logging.getLogger("malora.serve")


def build_engine(settings: ServerSettings) -> tuple:
    """The engine (its thread already stepping) and its adapter manager, the command line's adapters read, validated
    and activated. Raises on a bad model or adapter. Adapters under the roots are read on first use."""
    from malora_runtime.adapters.registry import AdapterRegistry
    from malora_runtime.adapters.source_cache import SourceCache
    from malora_runtime.adapters.unloaded import UnloadedRecord
    from malora_runtime.cache import cache_root
    from malora_runtime.engine.async_engine import AsyncEngine

    for name, path in settings.adapters.items():
        AdapterRegistry.check_name(name)
        if not path.is_dir():
            raise FileNotFoundError(f"adapter {name}: {path} is not a directory")
    for root in settings.adapter_roots:
        if not root.is_dir():
            log.warning("adapter root %s does not exist; no adapters are found in it", root)
    engine = AsyncEngine.from_config(settings.engine)
    state_dir = settings.state_dir or cache_root() / "state"
    registry = AdapterRegistry(engine.module_shapes(), settings.adapter_roots,
                               settings.max_cpu_adapters, settings.max_adapter_bytes, limits=settings.adapter_limits,
                               unloaded_record=UnloadedRecord(state_dir, settings.adapter_roots),
                               sources=settings.adapter_sources,
                               source_cache=SourceCache(cache_root() / "adapters", settings.adapter_cache_bytes),
                               s3_endpoint_url=settings.s3_endpoint_url)
    for source in settings.adapter_sources:
        log.info("adapter source %s", source)
    manager = AdapterManager(engine, registry, settings.engine.max_loaded_adapters)
    asyncio.run(manager.load_startup(settings.adapters, settings.pins))  # activated between engine steps
    return engine, manager


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except IsaError as exc:  # MALORA_MAX_ISA is read while the defaults are built
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        log.error("cannot start: %s", exc)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        engine, adapters = build_engine(settings)
    except (ValueError, OSError) as exc:  # bad model, adapter or setting: one clear line, no traceback
        log.error("cannot start: %s", exc)
        return 2
    app = create_app(engine, settings, adapters)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=settings.shutdown_timeout)
    log.info("listening on http://%s:%d (OpenAI base URL http://%s:%d/v1)", settings.host, settings.port,
             settings.host, settings.port)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
