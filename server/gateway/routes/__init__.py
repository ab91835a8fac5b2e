"""One router per API; each route reads in a glance: its request model as a parameter, auth as a dependency, the work
in a service from ``app.state.gateway`` (server.gateway.state)."""

from __future__ import annotations

from fastapi import APIRouter

from server.gateway.routes import chat, health, images, models, responses

ROUTERS: tuple[APIRouter, ...] = (health.router, models.router, chat.router, images.router, responses.router)
