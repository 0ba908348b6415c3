<#
.SYNOPSIS
    Installs or upgrades the replication appliance on a physical Windows server, offline.

.DESCRIPTION
    Run from the unzipped bundle, in an elevated PowerShell:
        .\Install-ReplicationAppliance.ps1
    1. checks every file of the bundle against manifest.json (SHA-256);
    2. checks the prerequisites (Test-AppliancePrerequisites.ps1) and stops with a report if any fail;
    3. detects the installed version: same version -> nothing to do; older -> upgrade in place;
       newer -> refused unless -Force;
    4. runs the Windows setup steps in setup\ (the same scripts the Ansible roles run);
    5. MySQL and the Python runtime: detected, or from the offline folder (C:\Temp\ASRSetup),
       or downloaded; a downloaded Python is checked against the SHA-256 pinned in manifest.json;
    6. installs the wheels into a new versioned virtual environment (no index, bundle only),
       runs the database migrations, switches the services to it; configuration, data and
       certificates in -DataDir are kept.
    Everything is logged to -LogPath; no secret is ever written to the log or the console.
    The MySQL root password is asked for at a prompt (or read from the environment variable
    APPLIANCE_MYSQL_ROOT_PASSWORD) and handed over in memory, never on a command line.
#>
[CmdletBinding()]
param(
    [string]$InstallDir = (Join-Path $env:ProgramFiles 'ReplicationAppliance'),
    [string]$DataDir = (Join-Path $env:ProgramData 'ReplicationAppliance'),
    [string]$OfflineDir = 'C:\Temp\ASRSetup',
    [string]$LogPath = (Join-Path $env:ProgramData 'ReplicationAppliance\logs\installer.log'),
    [switch]$CheckOnly,
    [switch]$Force
)

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'
$BundleDir = $PSScriptRoot
$ServiceNames = @('ReplicationApplianceControl', 'ReplicationApplianceProcessServer')

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
    $marker = Join-Path $InstallDir 'installed.json'
    if (-not (Test-Path -LiteralPath $marker)) { return $null }
    return [version]((Get-Content -LiteralPath $marker -Raw | ConvertFrom-Json).version)
}

function Invoke-SetupStep {
    param([Parameter(Mandatory)][string]$Script, [hashtable]$Arguments = @{})
    $path = Join-Path $BundleDir "setup\$Script"
    if (-not (Test-Path -LiteralPath $path)) { Stop-Install "setup step $Script is missing from the bundle" }
    Write-Log "setup step $Script"
    & $path @Arguments
    if (-not $?) { Stop-Install "setup step $Script failed; see the messages above" }
}

function Resolve-PythonRuntime {
    param([Parameter(Mandatory)]$Pinned)
    try {
        return & (Join-Path $BundleDir 'Install-PythonRuntime.ps1') -TargetDir (Join-Path $InstallDir 'python') `
            -Version $Pinned.version -FileName $Pinned.file -Url $Pinned.url -Sha256 $Pinned.sha256 `
            -SearchDirs @((Join-Path $BundleDir 'runtime'), $OfflineDir)
    } catch {
        Stop-Install "Python runtime: $($_.Exception.Message)"
    }
}

function Install-ApplianceWheels {
    param([Parameter(Mandatory)][string]$Python, [Parameter(Mandatory)]$Manifest)
    $venv = Join-Path $InstallDir "venv-$($Manifest.version)"
    if (Test-Path -LiteralPath $venv) { Remove-Item -LiteralPath $venv -Recurse -Force }  # a half-made one from a failed run
    & $Python -m venv $venv
    if ($LASTEXITCODE -ne 0) { Stop-Install "creating the virtual environment $venv failed" }
    $pip = Join-Path $venv 'Scripts\python.exe'
    & $pip -m pip install --quiet --no-index --find-links (Join-Path $BundleDir 'wheels') "replication-appliance==$($Manifest.version)"
    if ($LASTEXITCODE -ne 0) {
        Remove-Item -LiteralPath $venv -Recurse -Force
        Stop-Install 'installing the appliance wheels failed; the previous version (if any) is untouched'
    }
    return $venv
}

function Switch-ApplianceVersion {
    param([Parameter(Mandatory)][string]$Venv, [Parameter(Mandatory)]$Manifest)
    $appliance = Join-Path $Venv 'Scripts\appliance.exe'
    foreach ($name in $ServiceNames) { Stop-Service -Name $name -ErrorAction SilentlyContinue }
    if (-not (Test-Path -LiteralPath (Join-Path $DataDir 'config.json'))) {
        Write-Log "initialising the data directory $DataDir"
        & $appliance init --data-dir $DataDir
        if ($LASTEXITCODE -ne 0) { Stop-Install 'appliance init failed' }
    }
    Write-Log 'running database migrations'
    & $appliance db upgrade --data-dir $DataDir
    if ($LASTEXITCODE -ne 0) { Stop-Install 'database migrations failed; the previous version is still installed' }
    Invoke-SetupStep -Script 'Install-ApplianceSoftware.ps1' -Arguments @{ VenvPath = $Venv; DataDir = $DataDir }
    $current = Join-Path $InstallDir 'current'
    if (Test-Path -LiteralPath $current) { (Get-Item -LiteralPath $current).Delete() }  # a junction: removes the link only
    New-Item -ItemType Junction -Path $current -Target $Venv | Out-Null
    @{ version = $Manifest.version; venv = $Venv; installed = (Get-Date -Format o) } | ConvertTo-Json |
        Set-Content -LiteralPath (Join-Path $InstallDir 'installed.json') -Encoding UTF8
    foreach ($name in $ServiceNames) { Start-Service -Name $name -ErrorAction SilentlyContinue }
}

# --- main --------------------------------------------------------------------------------------
New-Item -ItemType Directory -Force -Path (Split-Path -Parent $LogPath), $InstallDir, $DataDir | Out-Null
$manifest = Read-Manifest
Write-Log "replication appliance installer $($manifest.version) from $BundleDir"
Test-BundleIntegrity -Manifest $manifest

$prerequisites = Join-Path $BundleDir 'prerequisites.json'
$ports = (Get-Content -LiteralPath $prerequisites -Raw | ConvertFrom-Json).ports
$report = & (Join-Path $BundleDir 'Test-AppliancePrerequisites.ps1') -PrerequisitesPath $prerequisites -DataDir $DataDir
$report | Format-Table -AutoSize Id, Status, Expected, Found | Out-String | ForEach-Object { Write-Log $_.TrimEnd() }
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

Invoke-SetupStep -Script 'Set-Tls12.ps1'
Invoke-SetupStep -Script 'Install-DotNet.ps1'
Invoke-SetupStep -Script 'Set-ApplianceFirewall.ps1' -Arguments @{ ControlPort = [int]$ports.control; DataPort = [int]$ports.data }
Invoke-SetupStep -Script 'Install-MySql.ps1' -Arguments @{ OfflineDir = $OfflineDir }
$python = Resolve-PythonRuntime -Pinned $manifest.python_runtime
$venv = Install-ApplianceWheels -Python $python -Manifest $manifest
Switch-ApplianceVersion -Venv $venv -Manifest $manifest
Get-ChildItem -LiteralPath $InstallDir -Directory -Filter 'venv-*' | Where-Object { $_.FullName -ne $venv } |
    Remove-Item -Recurse -Force  # older versions, once the new one runs
Write-Log "replication appliance $bundleVersion installed in $InstallDir; log: $LogPath"
