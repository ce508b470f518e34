{{/* Labels of every object; the selector labels stay those of
deploy/kubernetes (deploy/prometheus finds the agent by them). */}}
{{- define "underpass.labels" -}}
app.kubernetes.io/part-of: underpass
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ include "underpass.tag" . | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "underpass.tag" -}}
{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "underpass.image" -}}
{{ .Values.image.repository }}:{{ include "underpass.tag" . }}
{{- end }}

{{/* The port of config.metrics.listen, which the kubelet probes on the
node's loopback. */}}
{{- define "underpass.metricsPort" -}}
{{ splitList ":" .Values.config.metrics.listen | last }}
{{- end }}

{{/* The CNI network: the reference macvlan plugin with underpass chained
after it, or underpass alone. The plugin is told the pin directory only
when it is not its default. */}}
{{- define "underpass.conflist" -}}
{{- $n := .Values.network -}}
{{- $up := dict "type" "underpass" -}}
{{- if ne .Values.config.bpffs "/sys/fs/bpf/underpass" }}{{ $_ := set $up "bpffs" .Values.config.bpffs }}{{ end -}}
{{- $plugins := list -}}
{{- if eq $n.mode "chained" -}}
  {{- $mv := dict "type" "macvlan" "mode" $n.macvlanMode "ipam" $n.ipam -}}
  {{- if $n.master }}{{ $_ := set $mv "master" $n.master }}{{ end -}}
  {{- if $n.mtu }}{{ $_ := set $mv "mtu" $n.mtu }}{{ end -}}
  {{- $plugins = list $mv $up -}}
{{- else if eq $n.mode "main" -}}
  {{- if not $n.master }}{{ fail "network.master is required in main mode: the NIC underpass makes the pods' macvlan slaves on" }}{{ end -}}
  {{- $_ := set $up "master" $n.master -}}
  {{- $_ := set $up "mode" "macvlan" -}}
  {{- $_ := set $up "macvlanMode" $n.macvlanMode -}}
  {{- $_ := set $up "ipam" $n.ipam -}}
  {{- if $n.mtu }}{{ $_ := set $up "mtu" $n.mtu }}{{ end -}}
  {{- $plugins = list $up -}}
{{- else -}}
  {{- fail (printf "network.mode %q: want chained or main" $n.mode) -}}
{{- end -}}
{{ dict "cniVersion" $n.cniVersion "name" $n.name "plugins" $plugins | toPrettyJson }}
{{- end }}
