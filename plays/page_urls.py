"""URLs of the server-rendered pages (``plays.pages``), outside ``/api/`` and ``/admin/``."""

from __future__ import annotations

from django.urls import path, re_path

from flows import credential_views

from . import dashboard, flow_pages, pages, play_page

app_name = "pages"

urlpatterns = [
    path("", pages.home, name="home"),
    path("login/", pages.LoginPage.as_view(), name="login"),
    path("logout/", pages.LogoutPage.as_view(), name="logout"),
    path("flows/", pages.flow_list, name="flows"),
    path("flows/<str:flow_key>/", flow_pages.flow_detail, name="flow-detail"),
    path("flows/<str:flow_key>/run/", flow_pages.flow_run, name="flow-run"),
    path("flows/<str:flow_key>/dashboard/", dashboard.dashboard, name="flow-dashboard"),
    path("flows/<str:flow_key>/plays/", pages.flow_history, name="flow-history"),
    path("dashboard/", dashboard.dashboard, name="dashboard"),
    path("dashboard/data/", dashboard.dashboard_data, name="dashboard-data"),
    path("plays/", pages.play_history, name="history"),
    path("credentials/", credential_views.credential_list, name="credentials"),
    path("credentials/change/", credential_views.credential_action, name="credential-action"),
    path("plays/<str:play_id>/", play_page.play_detail, name="play-detail"),
    path("plays/<str:play_id>/layers/<str:layer_id>/out", play_page.layer_out, name="layer-out"),
    path("plays/<str:play_id>/decide/", pages.play_decide, name="play-decide"),
    re_path(r"^plays/(?P<play_id>[^/]+)/(?P<verb>start|hold|resume|cancel|retry)/$", pages.play_action, name="play-action"),
]
