"""URLs of the server-rendered pages (``plays.pages``), outside ``/api/`` and ``/admin/``."""

from __future__ import annotations

from django.urls import path, re_path

from flows import credential_views

from . import bulk_pages, dashboard, flow_pages, history, inbox, pages, play_page

app_name = "pages"

urlpatterns = [
    path("", pages.home, name="home"),
    path("login/", pages.LoginPage.as_view(), name="login"),
    path("logout/", pages.LogoutPage.as_view(), name="logout"),
    path("flows/", pages.flow_list, name="flows"),
    path("flows/<str:flow_key>/", flow_pages.flow_detail, name="flow-detail"),
    path("flows/<str:flow_key>/run/", flow_pages.flow_run, name="flow-run"),
    path("flows/<str:flow_key>/dashboard/", dashboard.dashboard, name="flow-dashboard"),
    path("flows/<str:flow_key>/plays/", history.flow_history, name="flow-history"),
    path("flows/<str:flow_key>/plays/match/", history.flow_match, name="flow-history-match"),
    path("dashboard/", dashboard.dashboard, name="dashboard"),
    path("dashboard/data/", dashboard.dashboard_data, name="dashboard-data"),
    path("plays/", history.play_history, name="history"),
    path("plays/match/", history.play_match, name="history-match"),
    path("plays/bulk/", bulk_pages.job_list, name="bulk-jobs"),
    path("plays/bulk/preview/", bulk_pages.preview, name="bulk-preview"),
    path("plays/bulk/confirm/", bulk_pages.confirm, name="bulk-confirm"),
    path("plays/bulk/<str:job_id>/", bulk_pages.job_page, name="bulk-job"),
    path("plays/bulk/<str:job_id>/resume/", bulk_pages.job_resume, name="bulk-job-resume"),
    path("inbox/", inbox.inbox, name="inbox"),
    path("inbox/decide/", inbox.decide, name="inbox-decide"),
    path("credentials/", credential_views.credential_list, name="credentials"),
    path("credentials/change/", credential_views.credential_action, name="credential-action"),
    path("plays/<str:play_id>/", play_page.play_detail, name="play-detail"),
    path("plays/<str:play_id>/layers/<str:layer_id>/out", play_page.layer_out, name="layer-out"),
    path("plays/<str:play_id>/decide/", pages.play_decide, name="play-decide"),
    re_path(r"^plays/(?P<play_id>[^/]+)/(?P<verb>start|hold|resume|cancel|retry)/$", pages.play_action, name="play-action"),
]
