"""Pure rules: process server health, RPO alerts, assignment, the replication state machine."""
