"""URLs of the channel pages (``triggers.pages``), under ``/channels/``."""

from __future__ import annotations

from django.urls import path

from . import pages

app_name = "channels"

urlpatterns = [
    path("", pages.channel_list, name="list"),
    path("<str:channel_key>/", pages.channel_detail, name="detail"),
]
