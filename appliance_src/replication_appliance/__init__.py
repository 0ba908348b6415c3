"""Replication appliance software: configuration server, process server, Mobility agent, apply."""
