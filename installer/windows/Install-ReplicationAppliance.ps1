<#
.SYNOPSIS
    Installs or upgrades the replication appliance on a physical Windows server, offline.

.DESCRIPTION
    Run from the unzipped bundle, in an elevated PowerShell:
        .\Install-ReplicationAppliance.ps1
    1. checks every file of the bundle against manifest.json (SHA-256);
    2. checks the prerequisites (Test-AppliancePrerequisites.ps1) and stops with a report if any fail;
    3. detects the installed version (InstallDir\install.json): the same version -> nothing to do;
       older -> upgrade in place; newer -> refused unless -Force;
    4. runs the Windows setup steps in setup\ - the same scripts the Ansible roles run (TLS 1.2,
       .NET, firewall, MySQL by the seed's three methods: detected, from C:\Temp\ASRSetup, or
       downloaded);
    5. Python: detected, from the bundle or C:\Temp\ASRSetup, or downloaded; checked against the
       SHA-256 pinned in manifest.json whichever way it came (Install-PythonRuntime.ps1);
    6. setup\Install-ApplianceSoftware.ps1 installs the wheels (no index: bundle only), runs the
       database migrations and (re)registers the service; configuration, data and certificates
       in -DataDir are kept.
    Everything is logged to -LogPath; no secret is written to the log or the console. The MySQL
    passwords are generated or read by Install-MySql.ps1 (MYSQL_ROOT_PASSWORD and
    APPLIANCE_DB_PASSWORD in the environment, never parameters).
#>
[CmdletBinding()]
param(
    [string]$InstallDir = (Join-Path $env:ProgramFiles 'ReplicationAppliance'),
    [string]$DataDir = (Join-Path $env:ProgramData 'ReplicationAppliance\data'),
    [string]$OfflineDir = 'C:\Temp\ASRSetup',
    [string]$LogPath = (Join-Path $env:ProgramData 'ReplicationAppliance\logs\installer.log'),
    [switch]$InitializeDisks,
    [switch]$CheckOnly,
    [switch]$Force
)

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'
$BundleDir = $PSScriptRoot
$PythonDir = Join-Path $InstallDir 'python'

function Write-Log {
    param([Parameter(Mandatory)][string]$Message, [ValidateSet('INFO', 'WARN', 'ERROR')][string]$Level = 'INFO')
    $line = '{0} {1} {2}' -f (Get-Date -Format 'yyyy-MM-ddTHH:mm:ssK'), $Level, $Message
    Add-Content -LiteralPath $LogPath -Value $line -Encoding UTF8
    Write-Host $line
}

function Stop-Install {
    param([Parameter(Mandatory)][string]$Reason)
    Write-Log -Level ERROR -Message $Reason
    Write-Log -Level ERROR -Message "installation stopped; nothing was changed after this point. Log: $LogPath"
    exit 1
}

function Read-Manifest {
    $path = Join-Path $BundleDir 'manifest.json'
    if (-not (Test-Path -LiteralPath $path)) { Stop-Install "manifest.json is missing from $BundleDir: unzip the whole bundle" }
    return Get-Content -LiteralPath $path -Raw | ConvertFrom-Json
}

function Test-BundleIntegrity {
    param([Parameter(Mandatory)]$Manifest)
    $bad = @()
    foreach ($entry in $Manifest.files.PSObject.Properties) {
        $file = Join-Path $BundleDir ($entry.Name -replace '/', '\')
        if (-not (Test-Path -LiteralPath $file)) { $bad += "$($entry.Name) (missing)"; continue }
        $hash = (Get-FileHash -LiteralPath $file -Algorithm SHA256).Hash.ToLowerInvariant()
        if ($hash -ne $entry.Value.sha256) { $bad += "$($entry.Name) (SHA-256 mismatch)" }
    }
    if ($bad.Count -gt 0) { Stop-Install ("the bundle is damaged: " + ($bad -join ', ') + '; download it again and check SHA256SUMS') }
    Write-Log "bundle verified: $(@($Manifest.files.PSObject.Properties).Count) files match manifest.json"
}

function Get-InstalledVersion {
    $record = Join-Path $InstallDir 'install.json'  # written by Install-ApplianceSoftware.ps1
    if (-not (Test-Path -LiteralPath $record)) { return $null }
    return [version]((Get-Content -LiteralPath $record -Raw | ConvertFrom-Json).version)
}

function Invoke-SetupStep {
    param([Parameter(Mandatory)][string]$Script, [hashtable]$Arguments = @{})
    $path = Join-Path $BundleDir "setup\$Script"
    if (-not (Test-Path -LiteralPath $path)) { Stop-Install "setup step $Script is missing from the bundle" }
    Write-Log "setup step $Script"
    try {
        & $path @Arguments | Out-String | ForEach-Object { if ($_.Trim()) { Write-Log $_.TrimEnd() } }
    } catch {
        Stop-Install "setup step $Script failed: $($_.Exception.Message)"
    }
}

function Resolve-PythonRuntime {
    param([Parameter(Mandatory)]$Pinned)
    try {
        return & (Join-Path $BundleDir 'Install-PythonRuntime.ps1') -TargetDir $PythonDir `
            -Version $Pinned.version -FileName $Pinned.file -Url $Pinned.url -ExpectedHash $Pinned.sha256 `
            -SearchDirs @((Join-Path $BundleDir 'runtime'), $OfflineDir)
    } catch {
        Stop-Install "Python runtime: $($_.Exception.Message)"
    }
}

function Find-ServiceWrapper {
    foreach ($candidate in @((Join-Path $BundleDir 'runtime\WinSW-x64.exe'), (Join-Path $OfflineDir 'WinSW-x64.exe'))) {
        if (Test-Path -LiteralPath $candidate) { return $candidate }
    }
    Stop-Install "WinSW-x64.exe (WinSW 2.x, the service wrapper) is neither in the bundle nor in $OfflineDir: place it there and run again"
}

# --- main --------------------------------------------------------------------------------------
New-Item -ItemType Directory -Force -Path (Split-Path -Parent $LogPath) | Out-Null
$manifest = Read-Manifest
Write-Log "replication appliance installer $($manifest.version) from $BundleDir"
Test-BundleIntegrity -Manifest $manifest

$prerequisites = Join-Path $BundleDir 'prerequisites.json'
$ports = (Get-Content -LiteralPath $prerequisites -Raw | ConvertFrom-Json).ports
$report = & (Join-Path $BundleDir 'Test-AppliancePrerequisites.ps1') -PrerequisitesPath $prerequisites
$report | Format-Table -AutoSize -Property @('Id', 'Status', 'Expected', 'Found') | Out-String | ForEach-Object { Write-Log $_.TrimEnd() }
$failed = @($report | Where-Object { $_.Status -eq 'FAIL' })
if ($failed.Count -gt 0) { Stop-Install ("prerequisites not met: " + (($failed | ForEach-Object { $_.Id }) -join ', ')) }
if ($CheckOnly) { Write-Log 'prerequisites met (-CheckOnly: nothing installed)'; exit 0 }

$bundleVersion = [version]$manifest.version
$installed = Get-InstalledVersion
if ($installed -and $installed -eq $bundleVersion -and -not $Force) {
    Write-Log "version $installed is already installed: nothing to do"
    exit 0
}
if ($installed -and $installed -gt $bundleVersion -and -not $Force) {
    Stop-Install "version $installed is installed, newer than this bundle ($bundleVersion): a downgrade needs -Force"
}
Write-Log $(if ($installed) { "upgrading $installed -> $bundleVersion (configuration, data and certificates in $DataDir are kept)" } else { "installing $bundleVersion" })

$mysql = (Get-Content -LiteralPath $prerequisites -Raw | ConvertFrom-Json).mysql
$wrapper = Find-ServiceWrapper
Invoke-SetupStep -Script 'Set-Tls12.ps1'
Invoke-SetupStep -Script 'Install-DotNet.ps1' -Arguments @{ InstallerPath = (Join-Path $OfflineDir 'ndp48-x86-x64-allos-enu.exe') }
Invoke-SetupStep -Script 'Set-ApplianceFirewall.ps1' -Arguments @{ ControlPort = [int]$ports.control; DataPort = [int]$ports.data }
if ($InitializeDisks) { Invoke-SetupStep -Script 'Initialize-ApplianceDisks.ps1' }
Invoke-SetupStep -Script 'Install-MySql.ps1' -Arguments @{ Version = $mysql.version; OfflineDir = $OfflineDir; DownloadUrl = $mysql.download_url }
$python = Resolve-PythonRuntime -Pinned $manifest.python_runtime
Invoke-SetupStep -Script 'Install-ApplianceSoftware.ps1' -Arguments @{
    ApplianceVersion = $manifest.version; WheelDir = (Join-Path $BundleDir 'wheels'); PythonVersion = $manifest.python_runtime.version
    PythonDir = (Split-Path -Parent $python); ServiceWrapper = $wrapper; InstallDir = $InstallDir; DataDir = $DataDir
    ControlPort = [int]$ports.control; DataPort = [int]$ports.data; AllowDowngrade = [bool]$Force
}
# The agent packages the appliance pushes (appliance push-install / agents upgrade read them here).
$agentPackages = Join-Path $DataDir 'agent-packages'
New-Item -ItemType Directory -Force -Path $agentPackages | Out-Null
Copy-Item -Path (Join-Path $BundleDir 'agent-packages\*') -Destination $agentPackages -Force
Write-Log "replication appliance $bundleVersion installed in $InstallDir (data in $DataDir); log: $LogPath"
