"""A token's value is stored nowhere: the table holds its digest and a readable prefix, read
here with SQL; the value is in the one answer that made it, and in no log."""

import hashlib
import logging

import pytest
from django.db import connection
from rest_framework.test import APIClient

from tests.support import api_token, user_with

pytestmark = pytest.mark.django_db


def rows() -> list[dict]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM tokens_apitoken")
        names = [c.name for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def test_the_table_holds_the_digest_and_prefix_never_the_value():
    value = api_token(user_with(), name="ci")
    (row,) = rows()
    assert value.startswith("cip_")
    assert len(value) == 4 + 64
    assert row["digest"] == hashlib.sha512(value.encode()).hexdigest()
    assert row["token_key"] == value[:15]
    for column, cell in row.items():
        assert value not in str(cell), column
        assert value[15:] not in str(cell), column  # not even the secret part, anywhere


def test_the_value_is_in_the_creation_answer_only(caplog):
    user = user_with()
    client = APIClient()
    client.force_authenticate(user)
    with caplog.at_level(logging.DEBUG):
        made = client.post("/api/tokens/", {"name": "laptop"}, format="json")
        assert made.status_code == 201
        value = made.json()["token"]
        client.force_authenticate(None)
        client.credentials(HTTP_AUTHORIZATION=f"Token {value}")
        listed = client.get("/api/tokens/")
        one = client.get(f"/api/tokens/{made.json()['id']}/")
        client.get("/api/builds/")
    assert listed.status_code == one.status_code == 200
    assert listed.json()["results"][0]["prefix"] == value[:15]
    assert value[15:] not in listed.content.decode() + one.content.decode()
    assert "digest" not in one.json()
    assert value[15:] not in caplog.text
