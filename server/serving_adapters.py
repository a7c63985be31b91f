"""Adapter management (admin key): list, load, reload, unload; views of each adapter for `/v1/models` too."""

from __future__ import annotations

from malora_runtime.adapters.errors import UnknownAdapterError
from malora_runtime.adapters.manager import AdapterManager, AdapterView, Tier

from .protocol import AdapterCard, AdapterInfo, AdapterList, AdapterModule, AdapterStatsInfo
from .serving import ServerState

API_STATES = {Tier.DEVICE: "loaded", Tier.HOST: "cpu", Tier.DISK: "disk"}


def api_state(view: AdapterView) -> str:
    """The wire's word for where an adapter is (`AdapterInfo.state`)."""
    if view.unloaded:
        return "unloaded"
    return "failed" if view.error is not None and view.tier is Tier.DISK else API_STATES[view.tier]


def adapter_info(view: AdapterView) -> AdapterInfo:
    info = AdapterInfo(state=api_state(view), path=str(view.path) if view.path else None, version=view.version,
                       slot=view.slot, pinned=view.pinned, error=view.error)
    if view.fetch is not None:
        info.source = view.fetch.ref.source.name
        info.source_url = view.fetch.ref.url
        info.source_version = view.fetch.version
        info.fetch_seconds = view.fetch.seconds
        info.fetched_offline = view.fetch.offline
    config = view.config
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


def adapter_card(view: AdapterView) -> AdapterCard:
    return AdapterCard(name=view.name, **adapter_info(view).model_dump())


class AdaptersServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def manager(self) -> AdapterManager:
        self.state.require_engine()
        assert self.state.adapters is not None
        return self.state.adapters

    def list(self) -> AdapterList:
        manager = self.manager
        stats = manager.stats()
        return AdapterList(data=[adapter_card(v) for v in manager.views()],
                           stats=AdapterStatsInfo(**stats.__dict__))

    def get(self, name: str) -> AdapterCard:
        manager = self.manager
        view = next((v for v in manager.views() if v.name == name), None)
        if view is None:
            raise UnknownAdapterError(f"adapter {name!r} does not exist")
        return adapter_card(view)

    async def load(self, name: str, path: str | None, pinned: bool | None, reload: bool) -> AdapterCard:
        return adapter_card(await self.manager.load(name, path, pinned, reload))

    async def unload(self, name: str) -> AdapterCard:
        return adapter_card(await self.manager.unload(name))
