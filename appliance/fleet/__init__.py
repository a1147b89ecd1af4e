"""Several appliances behind HAProxy (docs/fleet.md).

`agent_check`: the HAProxy agent-check port each daemon serves ([fleet] in the TOML).
`haproxy`: the HAProxy configuration `llm-appliance fleet haproxy` writes.
`cli`: the `llm-appliance fleet` command line.

NOTE: nothing here imports torch or the engine: the generator runs on the load balancer's host.
"""
