<#
.SYNOPSIS
    Opens inbound TCP for the appliance's control port and data port, and nothing else.

.DESCRIPTION
    Ensures two enabled inbound allow rules (all profiles, TCP):
        "<RulePrefix> control (TCP <ControlPort>)"
        "<RulePrefix> data (TCP <DataPort>)"
    Rules whose display name starts with RulePrefix but which are not these two (for example
    after the data port changed) are removed, so the appliance never leaves a port open that
    it no longer uses. Rules of other software are not touched.

.PARAMETER ControlPort
    Configuration server port (the seed: 443).
.PARAMETER DataPort
    Process server data port (the seed: 9443, configurable); must differ from ControlPort.
.PARAMETER RulePrefix
    Display-name prefix of the rules this script owns (default "Replication appliance").

.OUTPUTS
    Sets $Ansible.Changed when run by ansible.windows.win_powershell; otherwise writes an
    object with `changed`, `added` and `removed` (rule names).
#>
[CmdletBinding()]
param(
    [ValidateRange(1, 65535)][int]$ControlPort = 443,
    [ValidateRange(1, 65535)][int]$DataPort = 9443,
    [ValidateNotNullOrEmpty()][string]$RulePrefix = 'Replication appliance'
)
Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'
if ($ControlPort -eq $DataPort) { throw "the data port must differ from the control port (both are $ControlPort)" }

$wanted = @{
    "$RulePrefix control (TCP $ControlPort)" = $ControlPort
    "$RulePrefix data (TCP $DataPort)" = $DataPort
}
$added = @()
$removed = @()

foreach ($rule in @(Get-NetFirewallRule -ErrorAction SilentlyContinue | Where-Object { $_.DisplayName.StartsWith($RulePrefix) })) {
    $keep = $false
    if ($wanted.ContainsKey($rule.DisplayName)) {
        $filter = $rule | Get-NetFirewallPortFilter
        $keep = $rule.Direction -eq 'Inbound' -and $rule.Action -eq 'Allow' -and $rule.Enabled -eq 'True' -and
            $filter.Protocol -eq 'TCP' -and [string]$filter.LocalPort -eq [string]$wanted[$rule.DisplayName]
    }
    if (-not $keep) {
        $rule | Remove-NetFirewallRule
        $removed += $rule.DisplayName
    }
}

foreach ($name in $wanted.Keys) {
    if (-not (Get-NetFirewallRule -DisplayName $name -ErrorAction SilentlyContinue)) {
        New-NetFirewallRule -DisplayName $name -Direction Inbound -Action Allow -Protocol TCP -LocalPort $wanted[$name] -Profile Any -Enabled True | Out-Null
        $added += $name
    }
}

$changed = ($added.Count + $removed.Count) -gt 0
$ansibleVar = Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue
if ($ansibleVar) {
    $ansibleVar.Value.Changed = $changed
    $ansibleVar.Value.Result = @{ added = $added; removed = $removed }
} else {
    [pscustomobject]@{ changed = $changed; added = $added; removed = $removed }
}
