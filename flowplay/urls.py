from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from rest_framework.routers import SimpleRouter

from flows import credential_views, module_views
from flows import views as flow_views
from plays import health as play_health
from plays import metrics as play_metrics
from plays import views as play_views
from triggers import views as trigger_views

router = SimpleRouter(trailing_slash=False)
router.register("flows", play_views.FlowViewSet, basename="flow")
router.register(r"flows/(?P<flow_id>[^/]+)/layers", flow_views.FlowletViewSet, basename="flowlet")
router.register("plays", play_views.PlayViewSet, basename="play")
router.register("auth/api-keys", flow_views.ApiKeyViewSet, basename="api-key")
router.register("credentials", credential_views.CredentialViewSet, basename="credential")
router.register("schedules", trigger_views.ScheduleViewSet, basename="schedule")
router.register(r"flows/(?P<flow_id>[^/]+)/schedules", trigger_views.FlowScheduleViewSet, basename="flow-schedule")
router.register("channels", trigger_views.ChannelViewSet, basename="channel")
router.register(r"channels/(?P<channel_id>[^/]+)/routes", trigger_views.RouteViewSet, basename="channel-route")

api = [
    path("auth/login", flow_views.LoginView.as_view(), name="api-login"),
    path("auth/logout", flow_views.LogoutView.as_view(), name="api-logout"),
    path("auth/me", flow_views.MeView.as_view(), name="api-me"),
    path("health", play_health.HealthView.as_view(), name="health"),
    path("ready", play_health.ReadyView.as_view(), name="ready"),
    path("modules", module_views.ModuleListView.as_view(), name="module-list"),
    path("schema", flow_views.SchemaView.as_view(), name="schema"),
    path("docs", flow_views.SwaggerView.as_view(url_name="schema"), name="docs"),
    path("redoc", flow_views.RedocView.as_view(url_name="schema"), name="redoc"),
    path("events", play_views.EventsView.as_view(), name="events"),
    path("flows/<str:flow_id>/plays", play_views.FlowPlaysViewSet.as_view({"get": "list"}), name="flow-plays"),
    *router.urls,
]

urlpatterns = [
    path("api/", include(api)),
    path("metrics", play_metrics.metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("channels/", include("triggers.page_urls")),
    path("", include("plays.page_urls")),
]

handler400 = "flows.api.handler400"
handler404 = "flows.api.handler404"
handler500 = "flows.api.handler500"
