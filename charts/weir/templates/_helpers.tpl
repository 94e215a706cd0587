{{/*
Names and labels shared by every template.
*/}}

{{- define "weir.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: at most 52 characters, so that "<fullname>-controller-tls"
and friends stay within 63.
*/}}
{{- define "weir.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "weir.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; pass (dict "ctx" $ "component" "controller"). */}}
{{- define "weir.labels" -}}
helm.sh/chart: {{ include "weir.chart" .ctx }}
{{ include "weir.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: weir
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: stable across upgrades (Deployment and DaemonSet selectors are immutable). */}}
{{- define "weir.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weir.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "weir.controller.fullname" -}}
{{- printf "%s-controller" (include "weir.fullname" .) }}
{{- end }}

{{- define "weir.agent.fullname" -}}
{{- printf "%s-agent" (include "weir.fullname" .) }}
{{- end }}

{{- define "weir.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (include "weir.controller.fullname" .) .Values.controller.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "weir.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "weir.agent.fullname" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The controller Service's DNS name, as agents dial it and as its certificate names it. */}}
{{- define "weir.controller.host" -}}
{{- printf "%s.%s.svc" (include "weir.controller.fullname" .) .Release.Namespace }}
{{- end }}

{{/* The DNS names the controller certificate must cover. */}}
{{- define "weir.controller.dnsNames" -}}
{{- $svc := include "weir.controller.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | toJson }}
{{- end }}

{{/* The URL agents dial. */}}
{{- define "weir.controller.url" -}}
{{- $scheme := ternary "http" "https" (eq .Values.tls.mode "plaintext") }}
{{- printf "%s://%s:%d" $scheme (include "weir.controller.host" .) (int .Values.controller.grpcPort) }}
{{- end }}

{{- define "weir.controller.tlsSecret" -}}
{{- printf "%s-controller-tls" (include "weir.fullname" .) }}
{{- end }}

{{- define "weir.agent.tlsSecret" -}}
{{- printf "%s-agent-tls" (include "weir.fullname" .) }}
{{- end }}

{{/* "host:port" to listen on; pass (list $ port). IPv6 addresses get brackets. */}}
{{- define "weir.listenAddr" -}}
{{- $ctx := index . 0 }}
{{- $addr := $ctx.Values.bindAddress }}
{{- if contains ":" $addr }}
{{- printf "[%s]:%d" $addr (int (index . 1)) }}
{{- else }}
{{- printf "%s:%d" $addr (int (index . 1)) }}
{{- end }}
{{- end }}

{{/* image reference; pass (list $ .Values.controller.image). */}}
{{- define "weir.image" -}}
{{- $ctx := index . 0 }}
{{- $img := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $ctx.Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/*
The container securityContext of every weir container: non-root, read-only root filesystem,
no privilege escalation, every capability dropped, the runtime's default seccomp profile.
*/}}
{{- define "weir.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "weir.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Volume and flags of the TLS material; pass (list $ "controller"|"agent"). */}}
{{- define "weir.tlsArgs" -}}
{{- $ctx := index . 0 }}
{{- if eq $ctx.Values.tls.mode "plaintext" }}
{{- if eq (index . 1) "controller" }}
- --plaintext
{{- end }}
{{- else }}
- --tls-cert=/etc/weir/tls/tls.crt
- --tls-key=/etc/weir/tls/tls.key
- --tls-ca=/etc/weir/tls/ca.crt
{{- end }}
{{- end }}

{{/*
An init container that gives a hostPath folder of the agent to the agent's user; pass
(list $ containerName volumeName mountPath). The kubelet creates hostPath folders
root-owned; the agent (not root) must be able to write there, and nobody else to reach it.
*/}}
{{- define "weir.agent.ownDirInit" -}}
{{- $ctx := index . 0 }}
{{- $img := $ctx.Values.agent.handoff.initImage }}
{{- $path := index . 3 }}
- name: {{ index . 1 }}
  image: {{ include "weir.image" (list $ctx $img) }}
  imagePullPolicy: {{ $img.pullPolicy }}
  command: ["sh", "-c", "chmod 0700 {{ $path }} && chown 65532:65532 {{ $path }}"]
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 16Mi}
  securityContext:
    runAsNonRoot: false
    runAsUser: 0
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
      add: ["CHOWN"]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: {{ index . 2 }}
      mountPath: {{ $path }}
{{- end }}
