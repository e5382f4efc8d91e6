"""Dependency aliases for the routers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute

from service.errors import NotReady
from service.metrics import Metrics
from service.repository import Repository
from service.settings import Settings
from service.statistics import Statistics


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    repository: Repository | None = None
    load_error: str | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    statistics: Statistics = field(default_factory=Statistics)

    async def loaded_repository(self) -> Repository:
        """The repository, once loading has finished: a request arriving during warm-up waits for
        it (within its timeout) instead of failing; /health/ready reports the loading state."""
        if not self.loaded.is_set():
            await self.loaded.wait()
        if self.repository is None:
            raise NotReady(self.load_error or "the model repository did not load")
        return self.repository


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.vae
    return state


State = Annotated[AppState, Depends(get_state)]


def add_head(router: APIRouter, *paths: str) -> None:
    """HEAD beside GET on probe paths (load balancers and uptime checks send it), kept out of the schema:
    one route with both methods would give both operations the same OpenAPI operation id."""
    gets = [r for r in router.routes if isinstance(r, APIRoute) and r.path in paths and "GET" in (r.methods or ())]
    for route in gets:
        router.add_api_route(route.path.removeprefix(router.prefix), route.endpoint, methods=["HEAD"],
                             include_in_schema=False)
