{{- define "recmesh.labels" -}}
app.kubernetes.io/part-of: recmesh
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "recmesh.adminSecret" -}}
{{- if .Values.adminToken.existingSecret }}{{ .Values.adminToken.existingSecret }}{{ else }}{{ .Release.Name }}-admin{{ end }}
{{- end }}
