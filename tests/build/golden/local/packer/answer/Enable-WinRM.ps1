<#
.SYNOPSIS
  Last first-boot step: enable WinRM so Packer connects only to a finished machine.
.DESCRIPTION
  Basic authentication over HTTP is for the build network only; Stop-Build.ps1 turns it off
  again before the image is exported. Rendered from
  images/windows-server-2016/scripts/Enable-WinRM.ps1.j2.
#>
$ErrorActionPreference = 'Stop'
Get-NetConnectionProfile | Where-Object NetworkCategory -eq 'Public' | Set-NetConnectionProfile -NetworkCategory Private
# Stage the shutdown script where Packer's shutdown_command finds it.
foreach ($drive in Get-PSDrive -PSProvider FileSystem) {
    $stop = Join-Path $drive.Root 'Stop-Build.ps1'
    if (Test-Path -LiteralPath $stop) { Copy-Item -LiteralPath $stop -Destination (Join-Path $env:SystemRoot 'Temp\Stop-Build.ps1') -Force; break }
}
Enable-PSRemoting -SkipNetworkProfileCheck -Force | Out-Null
Set-Item -Path WSMan:\localhost\Service\AllowUnencrypted -Value $true
Set-Item -Path WSMan:\localhost\Service\Auth\Basic -Value $true
Set-Item -Path WSMan:\localhost\MaxTimeoutms -Value 1800000
New-NetFirewallRule -Name 'packer-winrm-http' -DisplayName 'WinRM HTTP (image build only)' -Direction Inbound -Protocol TCP -LocalPort 5985 -Action Allow | Out-Null
Set-Service -Name WinRM -StartupType Automatic
Restart-Service -Name WinRM
