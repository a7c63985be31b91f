"""`/v1/models`: the base model and every adapter the server knows, with adapter metadata."""

from __future__ import annotations

from .adapters import AdapterEntry
from .errors import APIError
from .protocol import AdapterInfo, AdapterModule, ModelCard, ModelList
from .serving import ServerState


def adapter_info(entry: AdapterEntry) -> AdapterInfo:
    info = AdapterInfo(state=entry.state, path=str(entry.path), error=entry.error)
    config = entry.config
    if config is None:
        return info
    info.base_model = config.base_model
    info.target_modules = list(config.target_modules)
    info.modules = {name: AdapterModule(num_experts=s.num_experts, rank=s.r, subspace_rank=s.d, top_k=s.top_k,
                                        alpha=s.alpha) for name, s in config.modules.items()}
    specs = list(config.modules.values())
    if specs:  # summary fields: the largest over target modules (usually all the same)
        info.num_experts = max(s.num_experts for s in specs)
        info.rank = max(s.r for s in specs)
        info.subspace_rank = max(s.d for s in specs)
        info.top_k = max(s.top_k for s in specs)
    return info


class ModelsServing:
    def __init__(self, state: ServerState, created: int) -> None:
        self.state = state
        self.created = created

    def list(self) -> ModelList:
        engine = self.state.require_engine()
        base = self.state.base_model
        cards = [ModelCard(id=base, created=self.created, root=base, max_model_len=engine.max_model_len)]
        entries = self.state.catalog.entries.values() if self.state.catalog is not None else []
        cards += [ModelCard(id=e.name, created=self.created, root=str(e.path), parent=base,
                            max_model_len=engine.max_model_len, adapter=adapter_info(e)) for e in entries]
        return ModelList(data=cards)

    def get(self, model_id: str) -> ModelCard:
        for card in self.list().data:
            if card.id == model_id:
                return card
        raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
