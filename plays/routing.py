from django.urls import path

from .consumers import PlayEventsConsumer

websocket_urlpatterns = [path("api/ws", PlayEventsConsumer.as_asgi())]
