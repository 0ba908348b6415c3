<#
.SYNOPSIS
  Packer's shutdown command: lock WinRM down again, then shut the machine down for export.
.DESCRIPTION
  Rendered from images/windows-server-2016/scripts/Stop-Build.ps1.j2.
#>
$ErrorActionPreference = 'Continue'
# Shutdown is scheduled first: locking WinRM down may end the session that runs this script.
& shutdown.exe /s /t 30 /f /d p:4:1 /c 'Appliance image build finished'
Set-Item -Path WSMan:\localhost\Service\AllowUnencrypted -Value $false
Set-Item -Path WSMan:\localhost\Service\Auth\Basic -Value $false
Remove-NetFirewallRule -Name 'packer-winrm-http' -ErrorAction SilentlyContinue
# Autologon kept the password in the registry during the build; remove it from the image.
Remove-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon' -Name DefaultPassword -ErrorAction SilentlyContinue
Set-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon' -Name AutoAdminLogon -Value '0'
