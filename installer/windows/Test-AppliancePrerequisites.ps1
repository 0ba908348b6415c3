<#
.SYNOPSIS
    Checks this Windows server against the replication appliance's requirements; changes nothing.

.DESCRIPTION
    Reads prerequisites.json (the seed's requirement rows and thresholds, written by the bundle
    build from replication_appliance/requirements/seed.yml) and returns one record per check:
    Id (the seed row id), Status (PASS, FAIL or WARN), Expected and Found. The installer stops
    when any record is FAIL. Rows that the installer itself puts right (TLS 1.2, .NET, MySQL,
    firewall) are reported as WARN when not yet met, since the setup steps fix them.
    Run on its own to see the report:  .\Test-AppliancePrerequisites.ps1 | Format-Table
#>
[CmdletBinding()]
param(
    [string]$PrerequisitesPath = (Join-Path $PSScriptRoot 'prerequisites.json')
)

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'
$doc = Get-Content -LiteralPath $PrerequisitesPath -Raw | ConvertFrom-Json
$limits = $doc.thresholds
$rows = @{}
foreach ($row in $doc.rows) { $rows[$row.id] = $row }

function New-Check {
    param([Parameter(Mandatory)][string]$Id, [Parameter(Mandatory)][bool]$Ok, [string]$Found, [switch]$Fixable)
    $status = if ($Ok) { 'PASS' } elseif ($Fixable) { 'WARN' } else { 'FAIL' }
    [pscustomobject]@{ Id = $Id; Status = $status; Component = $rows[$Id].component; Expected = $rows[$Id].expected; Found = $Found }
}

function Test-PortFree {
    param([Parameter(Mandatory)][int]$Port)
    $owners = @(Get-NetTCPConnection -State Listen -LocalPort $Port -ErrorAction SilentlyContinue |
        Where-Object { $_.OwningProcess -ne 0 })
    $ours = @($owners | Where-Object { (Get-Process -Id $_.OwningProcess -ErrorAction SilentlyContinue).Path -like '*ReplicationAppliance*' })
    return ($owners.Count -eq 0) -or ($ours.Count -eq $owners.Count)  # an upgrade finds its own services listening
}

$os = Get-CimInstance -ClassName Win32_OperatingSystem
$build = [int]$os.BuildNumber
$allowedBuilds = @($limits.os_builds.PSObject.Properties | ForEach-Object { [int]$_.Value })
New-Check -Id 'sw.os' -Ok ($allowedBuilds -contains $build) -Found "$($os.Caption) (build $build)"

$cores = (Get-CimInstance -ClassName Win32_Processor | Measure-Object -Property NumberOfLogicalProcessors -Sum).Sum
New-Check -Id 'hw.cpu' -Ok ($cores -ge [int]$limits.min_cpus) -Found "$cores cores"

$memoryMb = [math]::Floor($os.TotalVisibleMemorySize / 1024)
# Windows reports a little less than the installed memory; allow 3 % for firmware and reserved pages.
New-Check -Id 'hw.ram' -Ok ($memoryMb -ge [int]$limits.min_memory_mb * 0.97) -Found "$memoryMb MB"

$volumes = @(Get-Volume | Where-Object { $_.DriveType -eq 'Fixed' -and $_.DriveLetter })
$freeGb = @($volumes | ForEach-Object { [math]::Floor($_.SizeRemaining / (1GB)) } | Sort-Object -Descending)
New-Check -Id 'hw.disks' -Ok ($volumes.Count -ge 3) -Found "$($volumes.Count) fixed volumes"
New-Check -Id 'hw.cache_free' -Ok (($freeGb.Count -ge 1) -and ($freeGb[0] -ge [int]$limits.min_cache_gb)) -Found "largest free: $(if ($freeGb.Count) { $freeGb[0] } else { 0 }) GB"
New-Check -Id 'hw.retention_free' -Ok (($freeGb.Count -ge 2) -and ($freeGb[1] -ge [int]$limits.min_retention_gb)) -Found "second largest free: $(if ($freeGb.Count -ge 2) { $freeGb[1] } else { 0 }) GB"

$locale = (Get-Culture).Name
New-Check -Id 'sw.locale' -Ok ($locale -eq $limits.locale) -Found $locale

$tls = Get-ItemProperty -Path 'HKLM:\SYSTEM\CurrentControlSet\Control\SecurityProviders\SCHANNEL\Protocols\TLS 1.2\Server' -Name Enabled -ErrorAction SilentlyContinue
New-Check -Id 'sw.tls12' -Ok ($null -ne $tls -and $tls.Enabled -ne 0) -Found $(if ($tls) { "Enabled=$($tls.Enabled)" } else { 'not configured' }) -Fixable

$net = Get-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\NET Framework Setup\NDP\v4\Full' -Name Release -ErrorAction SilentlyContinue
New-Check -Id 'sw.dotnet' -Ok ($null -ne $net -and [int]$net.Release -ge [int]$limits.min_dotnet_release) -Found $(if ($net) { "release $($net.Release)" } else { 'not installed' }) -Fixable

foreach ($feature in @(@{ Id = 'sw.role_adds'; Name = 'AD-Domain-Services' }, @{ Id = 'sw.role_iis'; Name = 'Web-Server' }, @{ Id = 'sw.role_hyperv'; Name = 'Hyper-V' })) {
    $state = Get-WindowsFeature -Name $feature.Name -ErrorAction SilentlyContinue
    New-Check -Id $feature.Id -Ok (-not ($state -and $state.Installed)) -Found $(if ($state -and $state.Installed) { 'enabled' } else { 'not enabled' })
}

$policies = @(
    @{ Id = 'gpo.cmd'; Path = 'HKCU:\Software\Policies\Microsoft\Windows\System'; Name = 'DisableCMD' },
    @{ Id = 'gpo.regedit'; Path = 'HKCU:\Software\Microsoft\Windows\CurrentVersion\Policies\System'; Name = 'DisableRegistryTools' },
    @{ Id = 'gpo.attachments'; Path = 'HKCU:\Software\Microsoft\Windows\CurrentVersion\Policies\Attachments'; Name = 'UseTrustedHandlers' },
    @{ Id = 'gpo.scripts'; Path = 'HKLM:\Software\Policies\Microsoft\Windows\PowerShell'; Name = 'EnableScripts' }
)
foreach ($policy in $policies) {
    $value = Get-ItemProperty -Path $policy.Path -Name $policy.Name -ErrorAction SilentlyContinue
    New-Check -Id $policy.Id -Ok ($null -eq $value) -Found $(if ($value) { "$($policy.Name) set" } else { 'not set' })
}

$site = Get-Item -Path 'IIS:\Sites\Default Web Site' -ErrorAction SilentlyContinue
New-Check -Id 'iis.default_site' -Ok ($null -eq $site) -Found $(if ($site) { 'present' } else { 'absent' })
New-Check -Id 'iis.port443' -Ok (Test-PortFree -Port ([int]$doc.ports.control)) -Found "port $($doc.ports.control)"
New-Check -Id 'net.port_data' -Ok (Test-PortFree -Port ([int]$doc.ports.data)) -Found "port $($doc.ports.data)"

$dhcp = @(Get-NetIPInterface -AddressFamily IPv4 -ConnectionState Connected | Where-Object { $_.InterfaceAlias -notlike 'Loopback*' -and $_.Dhcp -eq 'Enabled' })
New-Check -Id 'net.static_ip' -Ok ($dhcp.Count -eq 0) -Found $(if ($dhcp.Count) { "DHCP on $($dhcp.InterfaceAlias -join ', ')" } else { 'static' })

$mysql = Get-Service -Name 'MySQL*' -ErrorAction SilentlyContinue
New-Check -Id 'sw.mysql' -Ok ($null -ne $mysql) -Found $(if ($mysql) { "service $($mysql[0].Name)" } else { "not installed (the MySQL step installs it)" }) -Fixable

$timeSource = $doc.time_source
# NTP is UDP, which Test-NetConnection cannot probe; one w32tm sample says whether the source answers.
$sample = & w32tm.exe /stripchart "/computer:$timeSource" /samples:1 /dataonly 2>&1 | Out-String
$reachable = $sample -match '[+-]\d+\.\d+s'
New-Check -Id 'time.sync' -Ok ([bool]$reachable) -Found "$timeSource $(if ($reachable) { 'reachable' } else { 'unreachable' })" -Fixable
