<#
.SYNOPSIS
    Reads, without changing anything, the machine facts the seed's requirement rows need.

.DESCRIPTION
    Used by playbooks/prereqs.yml (and usable on a physical server before installing). It only
    reads: CPU, memory, disks and volumes, OS, licence, locale, TLS and .NET registry values,
    MySQL, installed programs, Windows features, group policy registry values, IIS, listening
    ports, firewall rules, network adapters, PowerCLI and the Windows Time configuration.

.PARAMETER CacheLabel
    Volume label of the cache volume (ApplianceCache).
.PARAMETER RetentionLabel
    Volume label of the retention volume (ApplianceRetention).
.PARAMETER ControlPort
    Control port (443).
.PARAMETER DataPort
    Data port (9443).
.PARAMETER MySqlOfflineDir
    The seed's offline MySQL folder (C:\Temp\ASRSetup).
.PARAMETER ServiceName
    The appliance's Windows service (ReplicationAppliance).
.PARAMETER PolicyValues
    Registry values behind the forbidden group policies: list of @{policy; path; name}.
.PARAMETER AllowedApps
    Wildcard patterns of installed programs that belong on the appliance.

.OUTPUTS
    Sets $Ansible.Result (and $Ansible.Changed = $false) when run by
    ansible.windows.win_powershell; otherwise writes the facts object to the pipeline.
#>
[CmdletBinding()]
param(
    [string]$CacheLabel = 'ApplianceCache',
    [string]$RetentionLabel = 'ApplianceRetention',
    [int]$ControlPort = 443,
    [int]$DataPort = 9443,
    [string]$MySqlOfflineDir = 'C:\Temp\ASRSetup',
    [string]$ServiceName = 'ReplicationAppliance',
    [object[]]$PolicyValues = @(),
    [string[]]$AllowedApps = @()
)
Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'

function Get-RegValue([string]$Path, [string]$Name) {
    $item = Get-ItemProperty -Path $Path -Name $Name -ErrorAction SilentlyContinue
    if ($item) { return $item.$Name }
    return $null
}

# Bytes in a GiB (a literal, not the 1GB multiplier, so every PowerShell parser reads it).
$GiB = 1073741824
$facts = [ordered]@{}
$computer = Get-CimInstance Win32_ComputerSystem
$os = Get-CimInstance Win32_OperatingSystem
$facts.manufacturer = [string]$computer.Manufacturer
$facts.is_vmware = ([string]$computer.Manufacturer) -match 'VMware'
$facts.cpu_cores = [int]$computer.NumberOfLogicalProcessors
$facts.ram_gb = [math]::Round($computer.TotalPhysicalMemory / $GiB, 1)
$facts.os_caption = [string]$os.Caption
$facts.os_version = [string]$os.Version

# Disks: labelled volumes once prepared, else the raw disks that would become them.
$facts.disk_count = @(Get-Disk).Count
$raw = @(Get-Disk | Where-Object { $_.PartitionStyle -eq 'RAW' } | Sort-Object Size -Descending | ForEach-Object { [math]::Round($_.Size / $GiB, 1) })
foreach ($pair in @(@('cache', $CacheLabel, 0), @('retention', $RetentionLabel, 1))) {
    $volume = Get-Volume -FileSystemLabel $pair[1] -ErrorAction SilentlyContinue | Select-Object -First 1
    if ($volume) {
        $facts["$($pair[0])_free_gb"] = [math]::Round($volume.SizeRemaining / $GiB, 1)
        $facts["$($pair[0])_where"] = "$($volume.DriveLetter): ($($pair[1]))"
    } elseif ($raw.Count -gt $pair[2]) {
        $facts["$($pair[0])_free_gb"] = $raw[$pair[2]]
        $facts["$($pair[0])_where"] = 'raw disk, not yet prepared'
    } else {
        $facts["$($pair[0])_free_gb"] = 0
        $facts["$($pair[0])_where"] = 'no volume or free disk'
    }
}

# Licence.
$licence = Get-CimInstance SoftwareLicensingProduct -Filter "ApplicationID='55c92734-d682-4d71-983e-d6ec3f16059f' AND PartialProductKey IS NOT NULL" | Select-Object -First 1
$facts.licence_status = if ($licence) { [int]$licence.LicenseStatus } else { -1 }
$facts.licence_days_left = if ($licence) { [math]::Floor($licence.GracePeriodRemaining / 1440) } else { 0 }
$facts.licence_evaluation = [bool]($licence -and $licence.Description -match 'TIMEBASED_EVAL')

$facts.system_locale = (Get-WinSystemLocale).Name

# TLS 1.2 is on unless explicitly disabled; strong crypto needs all four .NET values.
$schannel = 'HKLM:\SYSTEM\CurrentControlSet\Control\SecurityProviders\SCHANNEL\Protocols\TLS 1.2'
$facts.tls12_enabled = $true
foreach ($side in 'Client', 'Server') {
    $enabled = Get-RegValue "$schannel\$side" 'Enabled'
    $disabledByDefault = Get-RegValue "$schannel\$side" 'DisabledByDefault'
    if (($null -ne $enabled -and $enabled -eq 0) -or ($null -ne $disabledByDefault -and $disabledByDefault -ne 0)) { $facts.tls12_enabled = $false }
}
$facts.strong_crypto = $true
foreach ($root in 'HKLM:\SOFTWARE\Microsoft\.NETFramework\v4.0.30319', 'HKLM:\SOFTWARE\Wow6432Node\Microsoft\.NETFramework\v4.0.30319') {
    foreach ($name in 'SchUseStrongCrypto', 'SystemDefaultTlsVersions') {
        if ((Get-RegValue $root $name) -ne 1) { $facts.strong_crypto = $false }
    }
}
$release = Get-RegValue 'HKLM:\SOFTWARE\Microsoft\NET Framework Setup\NDP\v4\Full' 'Release'
$facts.dotnet_release = if ($null -ne $release) { [int]$release } else { 0 }

# MySQL: installed (service running mysqld), or an installer waiting in the offline folder.
$mysql = Get-CimInstance Win32_Service | Where-Object { $_.PathName -match 'mysqld' } | Select-Object -First 1
$facts.mysql_service = if ($mysql) { "$($mysql.Name) ($($mysql.State))" } else { '' }
$offline = Get-ChildItem -Path $MySqlOfflineDir -Filter 'mysql*' -ErrorAction SilentlyContinue | Where-Object { $_.Extension -in '.msi', '.zip' } | Select-Object -First 1
$facts.mysql_offline_installer = if ($offline) { $offline.Name } else { '' }

# Installed programs other than the appliance's own.
$programs = foreach ($key in 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall\*', 'HKLM:\SOFTWARE\Wow6432Node\Microsoft\Windows\CurrentVersion\Uninstall\*') {
    Get-ItemProperty -Path $key -ErrorAction SilentlyContinue | Where-Object { $_.PSObject.Properties['DisplayName'] -and $_.DisplayName -and -not ($_.PSObject.Properties['SystemComponent'] -and $_.SystemComponent -eq 1) } |
        ForEach-Object { $_.DisplayName }
}
$facts.other_apps = @($programs | Sort-Object -Unique | Where-Object { $name = $_; -not ($AllowedApps | Where-Object { $name -like $_ }) })

# Windows Server roles.
$facts.features = @{}
if (Get-Command Get-WindowsFeature -ErrorAction SilentlyContinue) {
    foreach ($feature in Get-WindowsFeature -Name @('AD-Domain-Services', 'Web-Server', 'Hyper-V', 'Web-CGI')) {
        $facts.features[$feature.Name] = [bool]$feature.Installed
    }
}

# Group policies: a policy counts as enabled when any of its values is set to non-zero.
$facts.policies_enabled = @()
foreach ($value in $PolicyValues) {
    $data = Get-RegValue $value.path $value.name
    if ($null -ne $data -and "$data" -ne '0' -and "$data" -ne '') { $facts.policies_enabled += $value.policy }
}
$facts.policies_enabled = @($facts.policies_enabled | Sort-Object -Unique)

# IIS.
$facts.iis_default_site = $false
$facts.iis_anonymous_auth = $null
if (Get-Service -Name W3SVC -ErrorAction SilentlyContinue) {
    Import-Module WebAdministration -ErrorAction SilentlyContinue
    if (Get-Command Get-Website -ErrorAction SilentlyContinue) {
        $facts.iis_default_site = [bool](Get-Website -Name 'Default Web Site' -ErrorAction SilentlyContinue)
        $facts.iis_anonymous_auth = [bool](Get-WebConfigurationProperty -PSPath 'MACHINE/WEBROOT/APPHOST' -Filter 'system.webServer/security/authentication/anonymousAuthentication' -Name enabled).Value
    }
}

# Listeners on the appliance's ports that are not the appliance service (or its children).
$service = Get-CimInstance Win32_Service -Filter "Name='$ServiceName'" -ErrorAction SilentlyContinue
$servicePid = if ($service) { [int]$service.ProcessId } else { 0 }
function Test-Appliance([int]$ProcessId) {
    for ($depth = 0; $depth -lt 4 -and $ProcessId -gt 0; $depth++) {
        if ($servicePid -ne 0 -and $ProcessId -eq $servicePid) { return $true }
        $process = Get-CimInstance Win32_Process -Filter "ProcessId=$ProcessId" -ErrorAction SilentlyContinue
        if (-not $process) { return $false }
        $ProcessId = [int]$process.ParentProcessId
    }
    return $false
}
foreach ($pair in @(@('control', $ControlPort), @('data', $DataPort))) {
    $foreign = @()
    foreach ($listener in @(Get-NetTCPConnection -State Listen -LocalPort $pair[1] -ErrorAction SilentlyContinue)) {
        if (-not (Test-Appliance $listener.OwningProcess)) {
            $process = Get-Process -Id $listener.OwningProcess -ErrorAction SilentlyContinue
            $foreign += if ($process) { $process.ProcessName } else { "pid $($listener.OwningProcess)" }
        }
    }
    $facts["$($pair[0])_port_foreign"] = @($foreign | Sort-Object -Unique)
    $open = @(Get-NetFirewallPortFilter -Protocol TCP -ErrorAction SilentlyContinue | Where-Object { [string]$_.LocalPort -eq [string]$pair[1] } |
        Get-NetFirewallRule | Where-Object { $_.Enabled -eq 'True' -and $_.Direction -eq 'Inbound' -and $_.Action -eq 'Allow' })
    $facts["$($pair[0])_port_open"] = $open.Count -gt 0
}

# Network adapters.
$adapters = @(Get-NetAdapter -Physical -ErrorAction SilentlyContinue | Where-Object Status -eq 'Up')
$facts.nic_types = @($adapters | ForEach-Object { $_.InterfaceDescription })
$facts.static_ip = $adapters.Count -gt 0
foreach ($adapter in $adapters) {
    $interface = Get-NetIPInterface -InterfaceIndex $adapter.ifIndex -AddressFamily IPv4 -ErrorAction SilentlyContinue
    if (-not $interface -or $interface.Dhcp -ne 'Disabled') { $facts.static_ip = $false }
}
$facts.ip_addresses = @($adapters | ForEach-Object { Get-NetIPAddress -InterfaceIndex $_.ifIndex -AddressFamily IPv4 -ErrorAction SilentlyContinue } | ForEach-Object { "$($_.IPAddress)/$($_.PrefixLength)" })

# PowerCLI.
$powercli = Get-Module -ListAvailable -Name @('VMware.PowerCLI', 'VMware.VimAutomation.Core') -ErrorAction SilentlyContinue | Sort-Object Version -Descending | Select-Object -First 1
$facts.powercli_version = if ($powercli) { $powercli.Version.ToString() } else { '' }

# Windows Time.
$facts.ntp_server = [string](Get-RegValue 'HKLM:\SYSTEM\CurrentControlSet\Services\W32Time\Parameters' 'NtpServer')

$ansibleVar = Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue
if ($ansibleVar) {
    $ansibleVar.Value.Changed = $false
    $ansibleVar.Value.Result = $facts
} else {
    [pscustomobject]$facts
}
