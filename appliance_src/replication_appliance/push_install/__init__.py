"""Push install of the Mobility agent: the process server's agent installer.

Linux over SSH/SFTP (root, or sudo: NOPASSWD, or the password on stdin), Windows over WinRM
(pywinrm; the file goes over WinRM in chunks). Steps: copy, prerequisite check, install,
register with the passphrase, confirm the first heartbeat. Credentials are stored sealed with
the appliance's master key (credentials.py); progress is recorded as a job with steps (jobs.py)
that the API (`GET /api/v1/jobs/{id}`) and the CLI show.
"""
