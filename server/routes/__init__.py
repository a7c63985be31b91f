"""HTTP routes, one module per concern; each hands the request to its serving object."""

from fastapi import APIRouter

from . import adapters, chat, completions, health, metrics, models, tokenize

router = APIRouter()
for module in (completions, chat, tokenize, models, adapters, health, metrics):
    router.include_router(module.router)
