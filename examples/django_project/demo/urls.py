from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("hit", views.hit),
    path("totals", views.totals),
]
