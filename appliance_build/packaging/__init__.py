"""Installer artifacts: the physical-server bundle and the Mobility agent packages.

Every archive is reproducible: entries sorted, one fixed timestamp, fixed owners and modes,
wheels built with SOURCE_DATE_EPOCH and dependency wheels pinned by a lock with hashes.
"""
