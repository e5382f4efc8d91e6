"""Dependency aliases for the routers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReady
from service.metrics import Metrics
from service.repository import Repository
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    repository: Repository | None = None
    load_error: str | None = None
    ready: bool = field(default=False)

    def require_repository(self) -> Repository:
        if self.repository is None:
            raise NotReady(self.load_error or "models are still loading; retry shortly")
        return self.repository


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.vae
    return state


State = Annotated[AppState, Depends(get_state)]
