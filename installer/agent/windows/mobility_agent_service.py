"""Windows service host for the Mobility agent (pywin32), shipped in the Windows agent package.

    python mobility_agent_service.py --startup auto install   (Install-MobilityAgent.ps1 does this)
    python mobility_agent_service.py start | stop | remove

The service runs `mobility-agent run` from the same virtual environment as a child process and
stops it when Windows stops the service; it runs as LocalSystem, like the agent on Linux runs as root.
The state directory (registration, certificate, configuration) comes from the environment
variable MOBILITY_AGENT_STATE_DIR, stored in the service's registry key by the installer.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import servicemanager
import win32event
import win32service
import win32serviceutil

AGENT = Path(sys.executable).with_name("mobility-agent.exe")
STOP_GRACE_SECONDS = 20


class MobilityAgentService(win32serviceutil.ServiceFramework):
    _svc_name_ = "MobilityAgent"
    _svc_display_name_ = "Mobility agent (replication appliance)"
    _svc_description_ = "Tracks writes on this machine's disks and replicates them to the replication appliance."

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        self._stop = win32event.CreateEvent(None, 0, 0, None)
        self._child: subprocess.Popen[bytes] | None = None

    def SvcStop(self) -> None:
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)
        win32event.SetEvent(self._stop)

    def SvcDoRun(self) -> None:
        state_dir = os.environ.get("MOBILITY_AGENT_STATE_DIR", r"C:\ProgramData\MobilityAgent\state")
        self._child = subprocess.Popen([str(AGENT), "run", "--state-dir", state_dir])
        servicemanager.LogInfoMsg(f"{self._svc_name_}: agent started (pid {self._child.pid})")
        # Leave when Windows asks or when the agent dies; a dead agent ends the service with an
        # error so the recovery actions set by the installer restart it.
        while win32event.WaitForSingleObject(self._stop, 5000) == win32event.WAIT_TIMEOUT:
            if self._child.poll() is not None:
                servicemanager.LogErrorMsg(f"{self._svc_name_}: agent exited with {self._child.returncode}")
                sys.exit(1)
        self._child.terminate()
        try:
            self._child.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self._child.kill()


if __name__ == "__main__":
    win32serviceutil.HandleCommandLine(MobilityAgentService)
