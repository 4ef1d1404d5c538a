"""API routes of the triggers app, included under ``/api/``."""

from __future__ import annotations

from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter(trailing_slash=False)
router.register("channels", views.ChannelViewSet, basename="channel")
router.register(r"channels/(?P<channel_id>[^/]+)/routes", views.RouteViewSet, basename="channel-route")

urlpatterns = router.urls
