<#
.SYNOPSIS
    Applies the deploy-time OVF properties (static IP, DNS, hostname, data port) at boot.

.DESCRIPTION
    Reads the OVF environment that vCenter hands to the VM (guestinfo.ovfEnv, read with VMware
    Tools' rpctool.exe) and applies the ProductSection properties of class `appliance`:

        appliance.ip         IPv4 address (static; DHCP is turned off when it is given)
        appliance.prefix     prefix length, 1-32
        appliance.gateway    default gateway (optional)
        appliance.dns        DNS servers, comma-separated (optional)
        appliance.hostname   computer name (optional; the machine restarts once to apply it)
        appliance.data_port  process server data port, 1-65535 (optional)
        appliance.admin_password  new password of the local administrator AdminUser
                             (optional; a secret: never logged, kept only as a SHA-256
                             fingerprint; it is also the operator password handed to
                             Initialize-ApplianceIdentity.ps1 in APPLIANCE_ADMIN_PASSWORD)

    Every value is validated before anything changes; an invalid value changes nothing and is
    logged. When no restart is pending it then runs ScriptsDir\Initialize-ApplianceIdentity.ps1
    (when present), which initialises an appliance made from the image with its own identity,
    now that its name and address are final. The properties applied last are kept in StateDir, so later boots with the same
    properties change nothing. Without an OVF environment (a physical server, a KVM build) it
    does nothing.

.PARAMETER RpcToolPath
    Path of VMware Tools' rpctool.exe.
.PARAMETER StateDir
    Folder for the state file (ovfenv-applied.json) and the log (firstboot.log).
.PARAMETER ScriptsDir
    Folder holding Set-ApplianceFirewall.ps1 (run when the data port changes) and
    Initialize-ApplianceIdentity.ps1 (run at the end of every boot without a pending restart).
.PARAMETER ServiceName
    Windows service of the appliance, restarted when the data port changes.
.PARAMETER ServiceConfig
    The service wrapper's XML file whose `--data-port` argument is rewritten.
.PARAMETER ControlPort
    Control port passed on to Set-ApplianceFirewall.ps1 (default 443).
.PARAMETER AdminUser
    Local administrator whose password appliance.admin_password sets (default Administrator).
.PARAMETER OvfEnvXml
    The OVF environment document itself; when given, rpctool is not called (for tests and
    for physical servers that receive the same document another way).

.OUTPUTS
    Sets $Ansible.Changed when run by ansible.windows.win_powershell; otherwise writes an
    object with `changed` and `applied` to the pipeline.
#>
[CmdletBinding()]
param(
    [string]$RpcToolPath = 'C:\Program Files\VMware\VMware Tools\rpctool.exe',
    [string]$StateDir = 'C:\ProgramData\ReplicationAppliance\firstboot',
    [string]$ScriptsDir = 'C:\ProgramData\ReplicationAppliance\scripts',
    [string]$ServiceName = 'ReplicationAppliance',
    [string]$ServiceConfig = 'C:\Program Files\ReplicationAppliance\service\ReplicationAppliance.xml',
    [ValidateRange(1, 65535)][int]$ControlPort = 443,
    [string]$AdminUser = 'Administrator',
    [string]$OvfEnvXml = ''
)
Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'

$changed = $false
New-Item -ItemType Directory -Force -Path $StateDir | Out-Null
$logFile = Join-Path $StateDir 'firstboot.log'
$stateFile = Join-Path $StateDir 'ovfenv-applied.json'

function Write-Log([string]$Message) {
    Add-Content -Path $logFile -Value ('{0:u} {1}' -f (Get-Date), $Message)
}

function Complete-Run([hashtable]$Applied, [bool]$RestartPending = $false) {
    $identityScript = Join-Path $ScriptsDir 'Initialize-ApplianceIdentity.ps1'
    if (-not $RestartPending -and (Test-Path $identityScript)) {
        $recordFile = Join-Path (Split-Path (Split-Path $ServiceConfig)) 'install.json'
        if ($Applied.ContainsKey('admin_password')) { $env:APPLIANCE_ADMIN_PASSWORD = $Applied.admin_password }
        try {
            $identity = & $identityScript -InstallRecord $recordFile
        } catch {
            Write-Log "initialising the appliance failed (retried at the next boot): $($_.Exception.Message)"
            throw
        } finally {
            Remove-Item Env:\APPLIANCE_ADMIN_PASSWORD -ErrorAction SilentlyContinue
        }
        if ($identity -and $identity.changed) {
            $script:changed = $true
            Write-Log "appliance initialised in $($identity.initialised)"
        }
    }
    $ansibleVar = Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue
    $shown = @{}
    foreach ($key in $Applied.Keys) { if ($key -ne 'admin_password') { $shown[$key] = $Applied[$key] } }
    if ($ansibleVar) {
        $ansibleVar.Value.Changed = $script:changed
        $ansibleVar.Value.Result = @{ applied = $shown }
    } else {
        [pscustomobject]@{ changed = $script:changed; applied = $shown }
    }
}

function Get-OvfProperties([string]$Xml) {
    $doc = [xml]$Xml
    $ns = New-Object System.Xml.XmlNamespaceManager($doc.NameTable)
    $ns.AddNamespace('oe', 'http://schemas.dmtf.org/ovf/environment/1')
    $props = @{}
    foreach ($node in $doc.SelectNodes('//oe:PropertySection/oe:Property', $ns)) {
        $key = $node.GetAttribute('key', 'http://schemas.dmtf.org/ovf/environment/1')
        $value = $node.GetAttribute('value', 'http://schemas.dmtf.org/ovf/environment/1')
        # A password is taken as typed; the other values without surrounding blanks.
        if ($key.StartsWith('appliance.') -and $value -ne '') {
            $props[$key.Substring(10)] = if ($key -eq 'appliance.admin_password') { $value } else { $value.Trim() }
        }
    }
    return $props
}

function Test-IPv4([string]$Value) {
    $ip = $null
    return [System.Net.IPAddress]::TryParse($Value, [ref]$ip) -and $ip.AddressFamily -eq 'InterNetwork'
}

function Get-ValidationErrors([hashtable]$Props) {
    $errors = @()
    if ($Props.ContainsKey('ip') -and -not (Test-IPv4 $Props.ip)) { $errors += "appliance.ip '$($Props.ip)' is not an IPv4 address" }
    if ($Props.ContainsKey('ip') -and -not $Props.ContainsKey('prefix')) { $errors += 'appliance.prefix is required with appliance.ip' }
    if ($Props.ContainsKey('prefix') -and -not ($Props.prefix -match '^\d+$' -and [int]$Props.prefix -ge 1 -and [int]$Props.prefix -le 32)) {
        $errors += "appliance.prefix '$($Props.prefix)' must be a whole number from 1 to 32"
    }
    if ($Props.ContainsKey('gateway') -and -not (Test-IPv4 $Props.gateway)) { $errors += "appliance.gateway '$($Props.gateway)' is not an IPv4 address" }
    if ($Props.ContainsKey('dns')) {
        foreach ($server in ($Props.dns -split ',')) {
            if (-not (Test-IPv4 $server.Trim())) { $errors += "appliance.dns entry '$($server.Trim())' is not an IPv4 address" }
        }
    }
    if ($Props.ContainsKey('hostname') -and $Props.hostname -notmatch '^(?!-)[A-Za-z0-9-]{1,15}(?<!-)$') {
        $errors += "appliance.hostname '$($Props.hostname)' must be 1-15 letters, digits or hyphens (NetBIOS name)"
    }
    if ($Props.ContainsKey('data_port') -and -not ($Props.data_port -match '^\d+$' -and [int]$Props.data_port -ge 1 -and [int]$Props.data_port -le 65535 -and [int]$Props.data_port -ne $ControlPort)) {
        $errors += "appliance.data_port '$($Props.data_port)' must be a port from 1 to 65535 other than the control port $ControlPort"
    }
    if ($Props.ContainsKey('admin_password')) {
        # Windows' complexity rule (3 of 4 kinds) and the appliance's 12-character minimum; the value is never shown.
        $password = $Props.admin_password
        $kinds = @('[A-Z]', '[a-z]', '[0-9]', '[^A-Za-z0-9]' | Where-Object { $password -cmatch $_ }).Count
        if ($password.Length -lt 12 -or $kinds -lt 3) {
            $errors += 'appliance.admin_password must have at least 12 characters of 3 kinds (upper case, lower case, digits, symbols)'
        }
    }
    return $errors
}

function Set-StaticAddress([hashtable]$Props) {
    $adapter = Get-NetAdapter -Physical | Where-Object Status -eq 'Up' | Sort-Object ifIndex | Select-Object -First 1
    if (-not $adapter) { throw 'no connected network adapter to configure' }
    $current = Get-NetIPAddress -InterfaceIndex $adapter.ifIndex -AddressFamily IPv4 -ErrorAction SilentlyContinue |
        Where-Object { $_.PrefixOrigin -eq 'Manual' }
    $wanted = ($current | Where-Object { $_.IPAddress -eq $Props.ip -and $_.PrefixLength -eq [int]$Props.prefix })
    if (-not $wanted) {
        Set-NetIPInterface -InterfaceIndex $adapter.ifIndex -Dhcp Disabled
        Get-NetIPAddress -InterfaceIndex $adapter.ifIndex -AddressFamily IPv4 -ErrorAction SilentlyContinue | Remove-NetIPAddress -Confirm:$false
        Get-NetRoute -InterfaceIndex $adapter.ifIndex -DestinationPrefix '0.0.0.0/0' -ErrorAction SilentlyContinue | Remove-NetRoute -Confirm:$false
        $address = @{ InterfaceIndex = $adapter.ifIndex; IPAddress = $Props.ip; PrefixLength = [int]$Props.prefix }
        if ($Props.ContainsKey('gateway')) { $address.DefaultGateway = $Props.gateway }
        New-NetIPAddress @address | Out-Null
        $script:changed = $true
        Write-Log "static address $($Props.ip)/$($Props.prefix) set on $($adapter.Name)"
    }
    if ($Props.ContainsKey('dns')) {
        $servers = @($Props.dns -split ',' | ForEach-Object { $_.Trim() })
        $have = @((Get-DnsClientServerAddress -InterfaceIndex $adapter.ifIndex -AddressFamily IPv4).ServerAddresses)
        if (($have -join ',') -ne ($servers -join ',')) {
            Set-DnsClientServerAddress -InterfaceIndex $adapter.ifIndex -ServerAddresses $servers
            $script:changed = $true
            Write-Log "DNS servers set to $($servers -join ', ')"
        }
    }
}

function Set-DataPort([int]$Port) {
    if (Test-Path $ServiceConfig) {
        $text = Get-Content -Raw -Path $ServiceConfig
        $updated = $text -replace '--data-port \d+', "--data-port $Port"
        if ($updated -ne $text) {
            Set-Content -Path $ServiceConfig -Value $updated -Encoding UTF8 -NoNewline
            # Keep the install record in step, so an upgrade keeps the deploy-time port.
            $recordFile = Join-Path (Split-Path (Split-Path $ServiceConfig)) 'install.json'
            if (Test-Path $recordFile) {
                $record = Get-Content -Raw -Path $recordFile | ConvertFrom-Json
                $record.data_port = $Port
                Set-Content -Path $recordFile -Value ($record | ConvertTo-Json) -Encoding UTF8 -NoNewline
            }
            $script:changed = $true
            if (Get-Service -Name $ServiceName -ErrorAction SilentlyContinue) { Restart-Service -Name $ServiceName }
            Write-Log "data port set to $Port"
        }
    }
    $firewallScript = Join-Path $ScriptsDir 'Set-ApplianceFirewall.ps1'
    if (Test-Path $firewallScript) {
        $result = & $firewallScript -ControlPort $ControlPort -DataPort $Port
        if ($result -and $result.changed) { $script:changed = $true }
    }
}

# rpctool answers "No value found" on stderr when vCenter passed no OVF environment; under
# 'Stop' Windows PowerShell would make that a terminating error.
function Read-OvfEnvironment {
    $ErrorActionPreference = 'Continue'
    return (& $RpcToolPath 'info-get guestinfo.ovfEnv' 2>$null | Out-String).Trim()
}

if ($OvfEnvXml -eq '') {
    if (-not (Test-Path $RpcToolPath)) {
        Write-Log "no VMware Tools rpctool at $RpcToolPath: no OVF environment, nothing to apply"
        Complete-Run @{}
        return
    }
    $OvfEnvXml = Read-OvfEnvironment
}
if ($OvfEnvXml -eq '' -or $OvfEnvXml -like 'No value found*') {
    Write-Log 'the OVF environment is empty: nothing to apply'
    Complete-Run @{}
    return
}

$props = Get-OvfProperties $OvfEnvXml
$problems = @(Get-ValidationErrors $props)
if ($problems.Count -gt 0) {
    Write-Log ('OVF properties rejected, nothing changed: ' + ($problems -join '; '))
    throw ('invalid OVF properties: ' + ($problems -join '; '))
}

# A digest, not the values: the state file must not keep the administrator password.
$canonical = ($props.GetEnumerator() | Sort-Object Name | ForEach-Object { "$($_.Name)=$($_.Value)" }) -join "`n"
$sha256 = [Security.Cryptography.SHA256]::Create()
$fingerprint = [BitConverter]::ToString($sha256.ComputeHash([Text.Encoding]::UTF8.GetBytes($canonical))).Replace('-', '')
if ((Test-Path $stateFile) -and ((Get-Content -Raw $stateFile | ConvertFrom-Json).fingerprint -eq $fingerprint)) {
    Complete-Run $props
    return
}

if ($props.ContainsKey('ip')) { Set-StaticAddress $props }
if ($props.ContainsKey('data_port')) { Set-DataPort ([int]$props.data_port) }
if ($props.ContainsKey('admin_password')) {
    $secure = ConvertTo-SecureString -String $props.admin_password -AsPlainText -Force
    Set-LocalUser -Name $AdminUser -Password $secure
    $changed = $true
    Write-Log "password of $AdminUser set from the OVF environment"
}
$rename = $props.ContainsKey('hostname') -and ($props.hostname -ne $env:COMPUTERNAME)
if ($rename) {
    Rename-Computer -NewName $props.hostname -Force
    $changed = $true
    Write-Log "computer renamed to $($props.hostname); restarting"
}
@{ fingerprint = $fingerprint; applied = (Get-Date).ToString('o') } | ConvertTo-Json | Set-Content -Path $stateFile
Complete-Run $props $rename
if ($rename) { Restart-Computer -Force }
