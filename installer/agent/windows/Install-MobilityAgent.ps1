<#
.SYNOPSIS
    Checks, installs or upgrades the Mobility agent on Windows and registers it as a service.

.DESCRIPTION
    Run from the unzipped agent package (the appliance's push install does this over WinRM):
        .\Install-MobilityAgent.ps1 -Action Check      prerequisites only; exit 3 when one fails
        .\Install-MobilityAgent.ps1 -Action Install    install or upgrade; exit 4 when a newer
                                                       version is installed (-Force overrides)
        .\Install-MobilityAgent.ps1 -Action Start | Stop | Status | Uninstall
    Layout: <InstallDir>\<version> (a venv), <InstallDir>\current (junction to it),
    <InstallDir>\installed.json, and the agent's state (registration, certificate, configuration)
    in <DataDir>\state, kept across upgrades and uninstall.
    The service MobilityAgent (LocalSystem, automatic start, restart on failure) runs
    mobility_agent_service.py from the installed venv. Registration is separate
    (mobility-agent register, passphrase on standard input), so no secret is a parameter here.
    A failed install removes the half-made version folder; the running version is untouched.
#>
[CmdletBinding()]
param(
    [ValidateSet('Check', 'Install', 'Start', 'Stop', 'Status', 'Uninstall')][string]$Action = 'Install',
    [string]$InstallDir = (Join-Path $env:ProgramFiles 'MobilityAgent'),
    [string]$DataDir = (Join-Path $env:ProgramData 'MobilityAgent'),
    [string]$OfflineDir = 'C:\Temp\ASRSetup',
    [switch]$Force
)

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'
$PackageDir = $PSScriptRoot
$ServiceName = 'MobilityAgent'
$Manifest = Get-Content -LiteralPath (Join-Path $PackageDir 'manifest.json') -Raw | ConvertFrom-Json
$Marker = Join-Path $InstallDir 'installed.json'

function Get-InstalledVersion {
    if (Test-Path -LiteralPath $Marker) { return [version]((Get-Content -LiteralPath $Marker -Raw | ConvertFrom-Json).version) }
    return $null
}

function Test-Prerequisites {
    $results = @()
    $admin = ([Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()).IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)
    $results += [pscustomobject]@{ Check = 'administrator'; Ok = $admin; Found = [Security.Principal.WindowsIdentity]::GetCurrent().Name }
    $results += [pscustomobject]@{ Check = '64-bit Windows'; Ok = [Environment]::Is64BitOperatingSystem; Found = $env:PROCESSOR_ARCHITECTURE }
    $drive = Get-PSDrive -Name ($env:SystemDrive.TrimEnd(':'))
    $results += [pscustomobject]@{ Check = 'disk space'; Ok = ($drive.Free -ge (500MB)); Found = "$([math]::Floor($drive.Free / (1MB))) MB free (500 MB needed)" }
    $results | ForEach-Object { Write-Output ('{0} {1}: {2}' -f $(if ($_.Ok) { 'PASS' } else { 'FAIL' }), $_.Check, $_.Found) }
    return -not ($results | Where-Object { -not $_.Ok })
}

function Install-Agent {
    $version = [version]$Manifest.version
    $current = Get-InstalledVersion
    if ($current -eq $version -and -not $Force) { Write-Output "mobility-agent: version $version is already installed: nothing to do"; return }
    if ($current -and $current -gt $version -and -not $Force) {
        Write-Error "mobility-agent: version $current is installed, newer than this package ($version): a downgrade needs -Force"
        exit 4
    }
    if (-not (Test-Prerequisites)) { Write-Error 'mobility-agent: prerequisites not met (see FAIL lines above)'; exit 3 }
    $pinned = $Manifest.python_runtime
    $python = & (Join-Path $PackageDir 'Install-PythonRuntime.ps1') -TargetDir (Join-Path $InstallDir 'python') `
        -Version $pinned.version -FileName $pinned.file -Url $pinned.url -ExpectedHash $pinned.sha256 -SearchDirs @($OfflineDir)
    $target = Join-Path $InstallDir "$version"
    if (Test-Path -LiteralPath $target) { Remove-Item -LiteralPath $target -Recurse -Force }
    try {
        & $python -m venv --without-pip $target
        if ($LASTEXITCODE -ne 0) { throw "creating the virtual environment $target failed" }
        $pipWheel = Get-ChildItem -LiteralPath (Join-Path $PackageDir 'wheels') -Filter 'pip-*.whl' | Select-Object -First 1
        # pip runs from its wheel and stays out of the venv (each version gets a new venv).
        $wheels = Get-ChildItem -LiteralPath (Join-Path $PackageDir 'wheels') -Filter '*.whl' |
            Where-Object { $_.Name -notlike 'pip-*' } | ForEach-Object { $_.FullName }
        & (Join-Path $target 'Scripts\python.exe') (Join-Path $pipWheel.FullName 'pip') install --quiet --no-index --no-deps `
            --disable-pip-version-check --find-links (Join-Path $PackageDir 'wheels') @wheels
        if ($LASTEXITCODE -ne 0) { throw 'installing the agent wheels failed' }
        # The service host, and this script for Start/Stop/Status/Uninstall once the package is gone.
        foreach ($file in @('mobility_agent_service.py', 'Install-MobilityAgent.ps1', 'manifest.json')) {
            Copy-Item -LiteralPath (Join-Path $PackageDir $file) -Destination $target
        }
    } catch {
        Remove-Item -LiteralPath $target -Recurse -Force -ErrorAction SilentlyContinue
        Write-Error "mobility-agent: $($_.Exception.Message); the installed version (if any) is untouched"
        exit 1
    }
    $service = Get-Service -Name $ServiceName -ErrorAction SilentlyContinue
    $wasRunning = $service -and $service.Status -eq 'Running'
    if ($service) {
        Stop-Service -Name $ServiceName -ErrorAction SilentlyContinue
        & (Join-Path $target 'Scripts\python.exe') (Join-Path $target 'mobility_agent_service.py') remove | Out-Null
    }
    $state = Join-Path $DataDir 'state'
    New-Item -ItemType Directory -Force -Path $state | Out-Null
    # the agent's key lives here: SYSTEM (the service) and Administrators only, by SID (a
    # localised Windows has other names for them)
    & icacls.exe $state /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' | Out-Null
    if ($LASTEXITCODE -ne 0) { Write-Error "mobility-agent: could not restrict access to $state"; exit 1 }
    & (Join-Path $target 'Scripts\python.exe') (Join-Path $target 'mobility_agent_service.py') --startup auto install
    if ($LASTEXITCODE -ne 0) { Write-Error 'mobility-agent: registering the service failed'; exit 1 }
    $key = "HKLM:\SYSTEM\CurrentControlSet\Services\$ServiceName"
    Set-ItemProperty -Path $key -Name Environment -Type MultiString -Value @("MOBILITY_AGENT_STATE_DIR=$state")
    & sc.exe failure $ServiceName reset= 86400 actions= restart/10000/restart/10000/restart/60000 | Out-Null
    $link = Join-Path $InstallDir 'current'
    if (Test-Path -LiteralPath $link) { (Get-Item -LiteralPath $link).Delete() }  # the junction only
    New-Item -ItemType Junction -Path $link -Target $target | Out-Null
    @{ version = "$version"; venv = $target } | ConvertTo-Json | Set-Content -LiteralPath $Marker -Encoding UTF8
    Get-ChildItem -LiteralPath $InstallDir -Directory | Where-Object { $_.Name -match '^\d+(\.\d+)+$' -and $_.FullName -ne $target } |
        Remove-Item -Recurse -Force
    Write-Output "mobility-agent: installed $version$(if ($current) { " (upgraded from $current)" })"
    if ($wasRunning) { Start-Service -Name $ServiceName }
}

switch ($Action) {
    'Check' { if (-not (Test-Prerequisites)) { exit 3 } }
    'Install' { Install-Agent }
    'Start' { Start-Service -Name $ServiceName; Write-Output "mobility-agent: service $ServiceName started" }
    'Stop' { Stop-Service -Name $ServiceName -ErrorAction SilentlyContinue }
    'Status' {
        $version = Get-InstalledVersion
        if (-not $version) { Write-Output 'not installed'; exit 3 }
        $service = Get-Service -Name $ServiceName -ErrorAction SilentlyContinue
        Write-Output "installed $version $(if ($service -and $service.Status -eq 'Running') { 'running' } else { 'stopped' })"
    }
    'Uninstall' {
        Stop-Service -Name $ServiceName -ErrorAction SilentlyContinue
        & sc.exe delete $ServiceName | Out-Null
        Remove-Item -LiteralPath $InstallDir -Recurse -Force -ErrorAction SilentlyContinue
        Write-Output "mobility-agent: uninstalled (configuration kept in $DataDir)"
    }
}
