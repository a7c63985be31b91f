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

    def list(self, show_paths: bool = False) -> ModelList:
        """Every model; adapter directories (server file paths) only with `show_paths`."""
        engine = self.state.require_engine()
        base = self.state.base_model
        cards = [ModelCard(id=base, created=self.created, root=base, max_model_len=engine.max_model_len)]
        views = self.state.adapters.views() if self.state.adapters is not None else []
        for view in views:
            info = adapter_info(view)
            if not show_paths:
                info.path = info.source_url = None
                if info.error is not None and self.state.adapters is not None:
                    info.error = self.state.adapters.public_message(info.error)
            root = str(view.path or view.name) if show_paths else view.name
            cards.append(ModelCard(id=view.name, created=self.created, root=root, parent=base,
                                   max_model_len=engine.max_model_len, adapter=info))
        return ModelList(data=cards)

    def get(self, model_id: str, show_paths: bool = False) -> ModelCard:
        for card in self.list(show_paths).data:
            if card.id == model_id:
                return card
        raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
