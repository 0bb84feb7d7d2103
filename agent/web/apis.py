"""The HTTP APIs the agent serves: its page's, OpenAI's and AUTOMATIC1111's, all over one queue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.web.a1111_api import A1111Api
from agent.web.generation import Generation
from agent.web.openai_api import OpenAIApi
from agent.web.page_api import PageApi

if TYPE_CHECKING:
    from agent.jobs.events import JobEvents
    from agent.jobs.service import JobService
    from agent.web.routing import Routes


def register_apis(routes: Routes, service: JobService, events: JobEvents) -> None:
    """Add every API's routes: each admits its jobs through ``service``."""
    generation = Generation(settings=service.settings, jobs=service)
    for api in (
        PageApi(jobs=service, events=events),
        OpenAIApi(generation),
        A1111Api(generation, jobs=service),
    ):
        api.register(routes)
