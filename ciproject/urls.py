from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

import agents.api  # noqa: F401  (each api module registers its views on the router)
import artifacts.api  # noqa: F401
import builds.api  # noqa: F401
import tokens.api  # noqa: F401
import vault.api  # noqa: F401
from ciproject.api import router
from ciproject.monitoring import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/", include("forge.api")),  # before the router's catch-all 404
    path("api/", include(router.urls)),
    path("metrics", metrics_view, name="metrics"),
]
