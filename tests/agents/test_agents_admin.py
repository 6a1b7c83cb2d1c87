"""The agents' pages in the admin: each agent's heartbeat age (by the database's clock, red
once lost), its labels, capacity and current jobs linked to their builds, and draining it
(the list's actions, the change page's button), always through agents.services."""

import re

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from agents import services
from agents.models import Agent, AgentStatus
from tests.agents.test_registry import running_job_on, silent_for

CHANGELIST = reverse("admin:agents_agent_changelist")


def change_url(agent) -> str:
    return reverse("admin:agents_agent_change", args=(agent.pk,))


def drain_url(agent, drain=True) -> str:
    name = "agents_agent_drain" if drain else "agents_agent_undrain"
    return reverse(f"admin:{name}", args=(agent.pk,))


def row_of(html: str, name: str) -> str:
    """The row of the agent `name` in the list."""
    return re.search(rf"<tr>((?!</tr>).)*>{re.escape(name)}</a>.*?</tr>", html, re.S).group(0)


def heartbeat_cell(html: str, agent: Agent) -> str:
    """The heartbeat of `agent`'s row in the list."""
    row = row_of(html, agent.name)
    return re.search(r'<td class="field-heartbeat_age">(.*?)</td>', row, re.S).group(1)


@pytest.fixture
def agent(db):
    return services.register_agent("a1", "node1", ["unit-tests", "big"], 2, "1.2")


@pytest.fixture
def viewer(client, db):
    """A staff user who may see agents, and not change them."""
    user = User.objects.create_user("viewer", password="x", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_agent"))
    client.force_login(user)
    return client


def act(client, action: str, *agents):
    return client.post(
        CHANGELIST, {"action": action, "_selected_action": [a.pk for a in agents]}, follow=True
    )


def test_the_list_shows_heartbeat_age_labels_capacity_and_current_jobs(admin_client, agent):
    services.register_agent("a2", "node2", ["linux"], 1, "1.2")
    build, _ = running_job_on("a1")
    silent_for("a1", 12)  # by the database's clock, as the lost-agent sweep ages heartbeats
    html = admin_client.get(CHANGELIST).text
    # "12 s ago": the number is the cell's text, the words its style (see the template).
    assert re.fullmatch(
        r'<span class="agent-heartbeat" title="last heartbeat 1[23] s ago">1[23]</span>',
        heartbeat_cell(html, agent),
    )
    assert ".agent-heartbeat::after" in html
    assert 's ago"' in html
    assert "unit-tests, big" in html
    assert '<td class="field-capacity">2</td>' in html
    build_url = reverse("admin:builds_build_change", args=(build.pk,))
    assert f'<a href="{build_url}">p #1</a> / j (attempt 1)' in html
    # The idle agent runs nothing.
    assert '<td class="field-current_jobs">-</td>' in row_of(html, "a2")


def test_a_lost_agent_shows_its_heartbeat_in_red(admin_client, agent, settings):
    settings.AGENT_OFFLINE_AFTER_SECONDS = 30
    silent_for("a1", 29)
    assert "agent-lost" not in heartbeat_cell(admin_client.get(CHANGELIST).text, agent)
    silent_for("a1", 2)  # now 31 s: lost, even before the sweep marks it offline
    cell = heartbeat_cell(admin_client.get(CHANGELIST).text, agent)
    assert 'class="agent-heartbeat agent-lost"' in cell
    assert "lost (offline after 30 s without one)" in cell
    # Offline, whatever its age.
    Agent.objects.filter(pk=agent.pk).update(status=AgentStatus.OFFLINE)
    silent_for("a1", -31)
    assert "agent-lost" in heartbeat_cell(admin_client.get(CHANGELIST).text, agent)
    # No heartbeat yet: nothing to age.
    Agent.objects.filter(pk=agent.pk).update(last_heartbeat=None)
    assert heartbeat_cell(admin_client.get(CHANGELIST).text, agent) == "-"


def test_the_change_page_shows_the_agent_and_its_jobs(admin_client, agent):
    build, _ = running_job_on("a1")
    silent_for("a1", 3)
    html = admin_client.get(change_url(agent)).text
    assert re.search(
        r'<div class="readonly"><span class="agent-heartbeat" title="[^"]*">[34]</span></div>', html
    )
    assert "unit-tests, big" in html
    assert reverse("admin:builds_build_change", args=(build.pk,)) in html
    assert "1.2" in html  # its version
    # Its Drain button: a POST form of its own.
    assert f'<form method="post" action="{drain_url(agent)}"' in html
    assert ">Drain</button>" in html


def test_drain_and_undrain_through_the_list_actions(admin_client, agent):
    other = services.register_agent("a2", "node2", ["linux"], 1, "1.2")

    response = act(admin_client, "drain_agents", agent, other)
    assert response.status_code == 200
    assert "Agent a1: drained: it finishes its jobs and takes no new one" in response.text
    assert "Agent a2: drained" in response.text
    assert set(Agent.objects.values_list("status", flat=True)) == {AgentStatus.DISABLED}
    assert services.heartbeat("a1") == AgentStatus.DISABLED  # and it stays drained

    response = act(admin_client, "drain_agents", agent)
    assert "Agent a1: already drained" in response.text

    response = act(admin_client, "undrain_agents", agent)
    assert "Agent a1: undrained: it takes jobs again" in response.text
    assert Agent.objects.get(pk=agent.pk).status == AgentStatus.ONLINE
    assert Agent.objects.get(pk=other.pk).status == AgentStatus.DISABLED
    response = act(admin_client, "undrain_agents", agent)
    assert "Agent a1: not drained" in response.text


def test_drain_and_undrain_from_the_change_page(admin_client, agent):
    response = admin_client.post(drain_url(agent), follow=True)
    assert response.redirect_chain == [(change_url(agent), 302)]
    assert "Agent a1: drained" in response.text
    assert Agent.objects.get(pk=agent.pk).status == AgentStatus.DISABLED
    # Drained, the page offers the way back.
    assert f'<form method="post" action="{drain_url(agent, drain=False)}"' in response.text
    assert ">Undrain</button>" in response.text
    response = admin_client.post(drain_url(agent, drain=False), follow=True)
    assert "Agent a1: undrained" in response.text
    # Through the service: the status alone changed, the agent's own fields stay.
    fresh = Agent.objects.get(pk=agent.pk)
    assert fresh.status == AgentStatus.ONLINE
    assert (fresh.last_heartbeat, fresh.labels, fresh.capacity) == (
        agent.last_heartbeat,
        ["unit-tests", "big"],
        2,
    )


def test_draining_is_post_only_and_needs_the_change_permission(viewer, admin_client, agent):
    assert admin_client.get(drain_url(agent)).status_code == 405
    assert viewer.post(drain_url(agent)).status_code == 403
    assert viewer.post(drain_url(agent, drain=False)).status_code == 403
    assert Agent.objects.get(pk=agent.pk).status == AgentStatus.ONLINE
    # The viewer sees the agent, without the button or the actions.
    html = viewer.get(change_url(agent)).text
    assert ">Drain</button>" not in html
    assert viewer.get(CHANGELIST).status_code == 200
    response = act(viewer, "drain_agents", agent)
    assert Agent.objects.get(pk=agent.pk).status == AgentStatus.ONLINE
    assert "drain_agents" not in viewer.get(CHANGELIST).text
    assert response.status_code == 200
    assert admin_client.post(reverse("admin:agents_agent_drain", args=(0,))).status_code == 404
