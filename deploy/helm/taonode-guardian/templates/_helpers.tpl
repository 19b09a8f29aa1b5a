{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "taonode-guardian.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; objects add -server / -agent to it. */}}
{{- define "taonode-guardian.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "taonode-guardian.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "taonode-guardian.server.fullname" -}}
{{- printf "%s-server" (include "taonode-guardian.fullname" .) -}}
{{- end -}}

{{- define "taonode-guardian.agent.fullname" -}}
{{- printf "%s-agent" (include "taonode-guardian.fullname" .) -}}
{{- end -}}

{{/* The standard app.kubernetes.io set, on every object. */}}
{{- define "taonode-guardian.labels" -}}
helm.sh/chart: {{ include "taonode-guardian.chart" . }}
app.kubernetes.io/name: {{ include "taonode-guardian.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: taonode-guardian
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "taonode-guardian.selectorLabels" -}}
app.kubernetes.io/name: {{ include "taonode-guardian.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "taonode-guardian.server.labels" -}}
{{ include "taonode-guardian.labels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "taonode-guardian.server.selectorLabels" -}}
{{ include "taonode-guardian.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "taonode-guardian.agent.labels" -}}
{{ include "taonode-guardian.labels" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "taonode-guardian.agent.selectorLabels" -}}
{{ include "taonode-guardian.selectorLabels" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{/* repository@sha256:...; a tag or a malformed digest fails the render. */}}
{{- define "taonode-guardian.image" -}}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" (toString .digest)) -}}
{{- fail (printf "%s: image.digest must be sha256:<64 hex digits> (images are pulled by digest), got %q" .repository (toString .digest)) -}}
{{- end -}}
{{- printf "%s@%s" .repository .digest -}}
{{- end -}}

{{/* The server's in-cluster DNS name, which agents dial and the certificate carries. */}}
{{- define "taonode-guardian.server.host" -}}
{{- printf "%s.%s.svc" (include "taonode-guardian.server.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "taonode-guardian.server.tlsSecret" -}}
{{- if .Values.server.tls.secretName -}}
{{- .Values.server.tls.secretName -}}
{{- else if .Values.certManager.enabled -}}
{{- printf "%s-tls" (include "taonode-guardian.server.fullname" .) -}}
{{- else -}}
{{- fail "server.tls.secretName is required when certManager.enabled is false (a Secret with ca.crt, tls.crt, tls.key)" -}}
{{- end -}}
{{- end -}}

{{- define "taonode-guardian.issuerRef" -}}
{{- if .Values.certManager.issuer.create -}}
name: {{ include "taonode-guardian.fullname" . }}-ca
kind: Issuer
group: cert-manager.io
{{- else -}}
{{- if not .Values.certManager.issuer.issuerRef.name -}}
{{- fail "certManager.issuer.issuerRef.name is required when certManager.issuer.create is false" -}}
{{- end -}}
name: {{ .Values.certManager.issuer.issuerRef.name }}
kind: {{ .Values.certManager.issuer.issuerRef.kind }}
group: {{ .Values.certManager.issuer.issuerRef.group }}
{{- end -}}
{{- end -}}

{{/* Hardened container securityContext; runAsUser/runAsGroup come from the pod. */}}
{{- define "taonode-guardian.containerSecurityContext" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "taonode-guardian.usesPostgres" -}}
{{- if or .Values.server.ledger.existingSecret (hasPrefix "postgres" .Values.server.ledger.url) -}}true{{- end -}}
{{- end -}}
