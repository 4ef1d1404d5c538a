"""URLs of the server-rendered pages (``plays.pages``), outside ``/api/`` and ``/admin/``."""

from __future__ import annotations

from django.urls import path, re_path

from flows import credential_views

from . import history, pages

app_name = "pages"

urlpatterns = [
    path("", pages.home, name="home"),
    path("login/", pages.LoginPage.as_view(), name="login"),
    path("logout/", pages.LogoutPage.as_view(), name="logout"),
    path("flows/", pages.flow_list, name="flows"),
    path("flows/<str:flow_key>/plays/", history.flow_history, name="flow-history"),
    path("plays/", history.play_history, name="history"),
    path("credentials/", credential_views.credential_list, name="credentials"),
    path("credentials/change/", credential_views.credential_action, name="credential-action"),
    path("plays/<str:play_id>/", pages.play_detail, name="play-detail"),
    path("plays/<str:play_id>/decide/", pages.play_decide, name="play-decide"),
    re_path(r"^plays/(?P<play_id>[^/]+)/(?P<verb>start|hold|resume|cancel|retry)/$", pages.play_action, name="play-action"),
]
