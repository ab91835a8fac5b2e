"""The model ids this gateway answers to: an optional alias for the chat model, the ids the engines report, and the
image model when SDXL workers are configured."""

from __future__ import annotations

import time

from server.gateway.config import GatewayConfig
from server.gateway.engine_pool import EnginePool


class ModelCatalog:
    def __init__(self, config: GatewayConfig, engines: EnginePool) -> None:
        self.config, self.engines = config, engines
        self.created = int(time.time())

    def _alias(self) -> list[str]:
        return [self.config.model_name] if self.config.model_name else []

    def chat_ids(self) -> list[str]:
        """The alias (if any) and the engines' own ids; empty while no engine has answered yet."""
        engine_ids = self.engines.models()
        return list(dict.fromkeys(self._alias() + engine_ids)) if engine_ids else []

    def all_ids(self) -> list[str]:
        ids = self._alias() + self.engines.models()
        if self.config.sdxl_workers:
            ids.append(self.config.image_model_name)
        return list(dict.fromkeys(ids))

    def _entry(self, model: str) -> dict[str, object]:
        return {"id": model, "object": "model", "created": self.created, "owned_by": "minigemini-serve"}

    def listing(self) -> dict[str, object]:
        """The ``GET /v1/models`` body."""
        return {"object": "list", "data": [self._entry(m) for m in self.all_ids()]}

    def get(self, model: str) -> dict[str, object] | None:
        """One ``GET /v1/models/{id}`` entry; None for an id this gateway does not serve."""
        return self._entry(model) if model in self.all_ids() else None
