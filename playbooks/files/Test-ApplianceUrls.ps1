<#
.SYNOPSIS
    Checks, without changing anything, that the machine reaches every URL of an allow-list.

.DESCRIPTION
    For each entry: TCP entries are probed with a TCP connection to `probe` on `port` (443
    unless given); UDP entries on port 123 (the time source) with one NTP sample
    (w32tm /stripchart). Used by playbooks/prereqs.yml with the seed's allow-list of the
    chosen cloud.

.PARAMETER Urls
    List of @{pattern; probe; port (optional); protocol (optional, tcp|udp); optional (bool)}.
.PARAMETER TimeoutSeconds
    Per-connection timeout (default 5).

.OUTPUTS
    Sets $Ansible.Result.urls (and $Ansible.Changed = $false) when run by
    ansible.windows.win_powershell; otherwise writes one object per URL: pattern, probe,
    port, reachable, optional, detail.
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)][object[]]$Urls,
    [ValidateRange(1, 60)][int]$TimeoutSeconds = 5
)
Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'

function Get-Field($Entry, [string]$Name, $Default) {
    if ($Entry -is [System.Collections.IDictionary]) { if ($Entry.Contains($Name)) { return $Entry[$Name] } else { return $Default } }
    if ($Entry.PSObject.Properties[$Name]) { return $Entry.$Name }
    return $Default
}

# One NTP sample; 'Continue' because w32tm writes failures to stderr.
function Test-Ntp([string]$Server) {
    $ErrorActionPreference = 'Continue'
    $sample = (& w32tm.exe /stripchart "/computer:$Server" /samples:1 /dataonly 2>&1) -join ' '
    return $sample -match '[+-]\d+\.\d+s'
}

$results = foreach ($entry in $Urls) {
    $protocol = Get-Field $entry 'protocol' 'tcp'
    $port = [int](Get-Field $entry 'port' 443)
    $probe = Get-Field $entry 'probe' ''
    $reachable = $false
    $detail = ''
    if ($protocol -eq 'udp') {
        $reachable = Test-Ntp $probe
        $detail = if ($reachable) { 'NTP answered' } else { 'no NTP answer' }
    } else {
        $client = New-Object System.Net.Sockets.TcpClient
        try {
            $connect = $client.BeginConnect($probe, $port, $null, $null)
            $reachable = $connect.AsyncWaitHandle.WaitOne($TimeoutSeconds * 1000) -and $client.Connected
            $detail = if ($reachable) { 'connected' } else { "no connection within $TimeoutSeconds s" }
        } catch {
            $detail = if ($_.Exception.InnerException) { $_.Exception.InnerException.Message } else { $_.Exception.Message }
        } finally {
            $client.Close()
        }
    }
    [ordered]@{ pattern = (Get-Field $entry 'pattern' $probe); probe = $probe; port = $port; protocol = $protocol
        reachable = [bool]$reachable; optional = [bool](Get-Field $entry 'optional' $false); detail = $detail }
}

$ansibleVar = Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue
if ($ansibleVar) {
    $ansibleVar.Value.Changed = $false
    $ansibleVar.Value.Result = @{ urls = @($results) }
} else {
    $results | ForEach-Object { [pscustomobject]$_ }
}
