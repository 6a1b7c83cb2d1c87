import cProfile, pstats, time, statistics
import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from tests.support import make_pipeline, one_step


@pytest.mark.django_db(transaction=True)
def test_probe():
    p = make_pipeline("web", one_step("true"))
    c = APIClient()
    c.force_authenticate(User.objects.create_superuser("bench"))
    for _ in range(10):
        c.post(f"/api/pipelines/{p.pk}/builds/", {}, format="json")
    t = []
    prof = cProfile.Profile()
    for _ in range(100):
        s = time.perf_counter()
        prof.enable()
        r = c.post(f"/api/pipelines/{p.pk}/builds/", {}, format="json")
        prof.disable()
        t.append((time.perf_counter() - s) * 1000)
        assert r.status_code == 201
    print("p50", statistics.median(t))
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
