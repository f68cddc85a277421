{{- define "recmesh.labels" -}}
app.kubernetes.io/part-of: recmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "recmesh.serviceAccount" -}}
{{- if .Values.serviceAccount.create }}{{ default (printf "%s-recmesh" .Release.Name) .Values.serviceAccount.name }}{{ else }}{{ default "default" .Values.serviceAccount.name }}{{ end }}
{{- end }}

{{/* Pod-level settings shared by every Deployment and the trainer. */}}
{{- define "recmesh.podSpec" -}}
serviceAccountName: {{ include "recmesh.serviceAccount" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "recmesh.adminSecret" -}}
{{- if .Values.adminToken.existingSecret }}{{ .Values.adminToken.existingSecret }}{{ else }}{{ .Release.Name }}-admin{{ end }}
{{- end }}

{{/* The namespace of every object: the release's, or namespaceOverride. */}}
{{- define "recmesh.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}
