"""HTTP routes, one module per concern; each hands the request to its serving object."""

from fastapi import APIRouter

from . import chat, completions, health, models

router = APIRouter()
for module in (completions, chat, models, health):
    router.include_router(module.router)
