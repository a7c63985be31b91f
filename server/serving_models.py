"""`/v1/models`: the base model and every adapter the server knows, with adapter state and metadata."""

from __future__ import annotations

from .errors import APIError
from .protocol import ModelCard, ModelList
from .serving import ServerState
from .serving_adapters import adapter_info


class ModelsServing:
    def __init__(self, state: ServerState, created: int) -> None:
        self.state = state
        self.created = created

    def list(self) -> ModelList:
        engine = self.state.require_engine()
        base = self.state.base_model
        cards = [ModelCard(id=base, created=self.created, root=base, max_model_len=engine.max_model_len)]
        views = self.state.adapters.views() if self.state.adapters is not None else []
        cards += [ModelCard(id=v.name, created=self.created, root=str(v.path or v.name), parent=base,
                            max_model_len=engine.max_model_len, adapter=adapter_info(v)) for v in views]
        return ModelList(data=cards)

    def get(self, model_id: str) -> ModelCard:
        for card in self.list().data:
            if card.id == model_id:
                return card
        raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
