{{/* The release's full name, at most 63 characters. */}}
{{- define "baton.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object (helm.sh/chart only here, never in selectors). */}}
{{- define "baton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Selector labels of the operator pods (stable across upgrades). */}}
{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "baton.serviceAccountName" -}}
{{- default (include "baton.fullname" .) .Values.serviceAccountName -}}
{{- end -}}

{{- define "baton.image" -}}
{{- printf "%s:%s" .Values.imageRepository (default .Chart.AppVersion .Values.imageTag) -}}
{{- end -}}

{{- define "baton.workerImage" -}}
{{- printf "%s:%s" .Values.workerImageRepository (default .Chart.AppVersion .Values.workerImageTag) -}}
{{- end -}}

{{/*
Rules on the namespaced resources the operator (reconcile + autoscaler) touches, exactly the
verbs it uses: Kopf watches Models and Deployments; the reconcile lists its owned objects,
creates, server-side applies (patch) and deletes them; the autoscaler reads pods and marks
the ones to remove (patch); both write Model status and post Events.
*/}}
{{- define "baton.namespacedRules" -}}
- apiGroups: [baton.dev]
  resources: [models]
  verbs: [get, list, watch, patch]
- apiGroups: [baton.dev]
  resources: [models/status]
  verbs: [get, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [podmonitors]
  verbs: [get, list, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, patch]
# The Model's CA and role certificates (spec.security.transport mtls): made once, never read
# back into pods beyond each role's own certificate and key.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end -}}
