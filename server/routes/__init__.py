"""HTTP routes, one module per concern; each hands the request to its serving object."""

from fastapi import APIRouter

from . import adapters, chat, completions, health, metrics, models

router = APIRouter()
for module in (completions, chat, models, adapters, health, metrics):
    router.include_router(module.router)
