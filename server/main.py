"""`malora-serve`: load the model and adapters, then serve the API with uvicorn until a stop signal."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

import uvicorn

from .adapters import AdapterCatalog, discover
from .app import create_app
from .settings import ServerSettings, parse_settings

log = logging.getLogger("malora.serve")


def build_engine(settings: ServerSettings):
    """The engine (not started yet) and the catalog of its adapters, loaded. Raises on a bad model or adapter."""
    from malora_runtime.adapters import load_adapter
    from malora_runtime.engine.async_engine import AsyncEngine
    from malora_runtime.patching import linear_shapes

    paths = discover(settings.adapters, settings.adapter_root)
    for name, path in paths.items():
        if not path.is_dir():
            raise FileNotFoundError(f"adapter {name}: {path} is not a directory")
    engine = AsyncEngine.from_config(settings.engine)
    shapes = linear_shapes(engine.engine.runner.model)
    catalog = AdapterCatalog(engine, lambda path: load_adapter(path, shapes), settings.engine.max_loaded_adapters)
    asyncio.run(catalog.load_all(paths))  # before the engine thread starts: runs inline
    return engine, catalog


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        engine, catalog = build_engine(settings)
    except (ValueError, OSError) as exc:  # bad model, adapter or setting: one clear line, no traceback
        log.error("cannot start: %s", exc)
        return 2
    app = create_app(engine, settings, catalog)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=settings.shutdown_timeout)
    log.info("listening on http://%s:%d (OpenAI base URL http://%s:%d/v1)", settings.host, settings.port,
             settings.host, settings.port)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
