<#
.SYNOPSIS
    Ensures .NET Framework 4.6 or later; installs 4.8 from a local file or a download.

.DESCRIPTION
    Reads the release key (HKLM:\SOFTWARE\Microsoft\NET Framework Setup\NDP\v4\Full\Release).
    At or above MinimumRelease nothing changes. Otherwise the offline installer at
    InstallerPath is used when present, else it is downloaded from DownloadUrl to that path
    (and checked against DownloadSha256 when given), then run quietly without restarting.

.PARAMETER MinimumRelease
    Lowest acceptable release key (393295 = .NET Framework 4.6).
.PARAMETER InstallerPath
    Where the offline installer is looked for and a download is saved
    (default C:\Temp\ASRSetup\ndp48-x86-x64-allos-enu.exe).
.PARAMETER DownloadUrl
    Where the installer is downloaded from when InstallerPath does not exist.
.PARAMETER DownloadSha256
    Expected SHA-256 (hex) of the download; empty skips the check.

.OUTPUTS
    Sets $Ansible.Changed when run by ansible.windows.win_powershell; otherwise writes an
    object with `changed`, `release`, `installed_from` and `reboot_required`.
#>
[CmdletBinding()]
param(
    [ValidateRange(378389, 2147483647)][int]$MinimumRelease = 393295,
    [string]$InstallerPath = 'C:\Temp\ASRSetup\ndp48-x86-x64-allos-enu.exe',
    [string]$DownloadUrl = 'https://go.microsoft.com/fwlink/?linkid=2088631',
    [string]$DownloadSha256 = ''
)
Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'

function Get-DotNetRelease {
    $key = Get-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\NET Framework Setup\NDP\v4\Full' -Name Release -ErrorAction SilentlyContinue
    if ($key) { return [int]$key.Release }
    return 0
}

function Complete-Run([bool]$Changed, [hashtable]$Result) {
    $ansibleVar = Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue
    if ($ansibleVar) {
        $ansibleVar.Value.Changed = $Changed
        $ansibleVar.Value.Result = $Result
    } else {
        [pscustomobject](@{ changed = $Changed } + $Result)
    }
}

$release = Get-DotNetRelease
if ($release -ge $MinimumRelease) {
    Complete-Run $false @{ release = $release; installed_from = ''; reboot_required = $false }
    return
}

$installedFrom = 'local file'
if (-not (Test-Path $InstallerPath)) {
    $installedFrom = 'download'
    New-Item -ItemType Directory -Force -Path (Split-Path $InstallerPath) | Out-Null
    [Net.ServicePointManager]::SecurityProtocol = [Net.SecurityProtocolType]::Tls12
    $partial = "$InstallerPath.partial"
    Invoke-WebRequest -Uri $DownloadUrl -OutFile $partial -UseBasicParsing
    if ($DownloadSha256 -ne '') {
        $actual = (Get-FileHash -Algorithm SHA256 -Path $partial).Hash
        if ($actual -ne $DownloadSha256.ToUpperInvariant()) {
            Remove-Item $partial -Force
            throw "the .NET Framework installer from $DownloadUrl has SHA-256 $actual, expected $DownloadSha256"
        }
    }
    Move-Item -Force $partial $InstallerPath
}

$process = Start-Process -FilePath $InstallerPath -ArgumentList '/q', '/norestart' -Wait -PassThru
# 3010 and 1641: installed, restart required.
if ($process.ExitCode -notin 0, 3010, 1641) {
    throw ".NET Framework installer $InstallerPath failed with exit code $($process.ExitCode)"
}
Complete-Run $true @{ release = (Get-DotNetRelease); installed_from = $installedFrom; reboot_required = ($process.ExitCode -ne 0) }
