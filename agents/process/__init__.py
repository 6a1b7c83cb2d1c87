"""The agent process (`manage.py runagent`), a client of builds.services:

- agent: the AgentProcess (its identity, the draining flag, the attempts it runs and their
  stop events, the workspaces kept for a lease, consumer sync, heartbeats);
- control: the remote-control commands it answers, which only call into the AgentProcess;
- executor: running one job attempt, its steps, logs and results;
- runner: one step as a subprocess; orphans: the steps a killed run of it left behind;
- metrics: its own /metrics on AGENT_METRICS_PORT.
"""
