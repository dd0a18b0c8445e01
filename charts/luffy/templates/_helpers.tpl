{{/* Names, labels, images and the operator's RBAC rules, shared by the templates. */}}

{{- define "luffy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "luffy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "luffy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "luffy.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of every object; call with (dict "root" $ "component" "operator"). */}}
{{- define "luffy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "luffy.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: luffy
{{- end }}

{{- define "luffy.operatorName" -}}
{{- printf "%s-operator" (include "luffy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "luffy.mlflowName" -}}
{{- printf "%s-mlflow" (include "luffy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "luffy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "luffy.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, pinned with @digest when the values give one; call with (dict "image" ... "tag" default-tag). */}}
{{- define "luffy.image" -}}
{{- printf "%s:%s" .image.repository (default .tag .image.tag) }}{{ with .image.digest }}@{{ . }}{{ end }}
{{- end }}

{{- define "luffy.operatorImage" -}}
{{- include "luffy.image" (dict "image" .Values.operator.image "tag" .Chart.AppVersion) }}
{{- end }}

{{/*
A container's resources with an ephemeral-storage request for its /tmp emptyDir unless the values give one; call
with (dict "resources" .Values.x.resources "tmp" .Values.x.tmpSizeLimit).
*/}}
{{- define "luffy.resources" -}}
{{- $resources := deepCopy .resources }}
{{- $requests := default (dict) $resources.requests }}
{{- if not (hasKey $requests "ephemeral-storage") }}
{{- $_ := set $requests "ephemeral-storage" .tmp }}
{{- end }}
{{- $_ := set $resources "requests" $requests }}
{{- toYaml $resources }}
{{- end }}

{{/* Whether MLflow keeps anything on its PVC: the sqlite database or the artifacts. */}}
{{- define "luffy.mlflowUsesVolume" -}}
{{- if or (eq .Values.mlflow.backendStore.type "sqlite") (eq .Values.mlflow.artifacts.type "pvc") }}true{{ end }}
{{- end }}

{{- define "luffy.mlflowClaimName" -}}
{{- default (include "luffy.mlflowName" .) .Values.mlflow.persistence.existingClaim }}
{{- end }}

{{/*
What the operator does in the namespaces of its runs, and nothing more (operator/luffy_operator/kube.py,
controller.py, reconcile.py; kopf's finalizer, annotation and status patches and its Events). The run's children are
created, and deleted on cleanup; only the trainer config (its ConfigMap: rollout server URLs), the trainer Service
(ports) and the rollout StatefulSet (replicas) are patched. Secrets: create only (the per-run token Secret, owned by
the run and garbage-collected with it); the operator reads no Secret, so it cannot be made to pass one on.
The trainer's Role grants get on its LuffyRun and get/patch on its status, which the operator must hold itself
(RBAC refuses to create a Role granting more than its creator has); the children's ownerReferences set
blockOwnerDeletion, which needs update on luffyruns/finalizers.
*/}}
{{- define "luffy.namespacedRules" -}}
- apiGroups: [luffy.dev]
  resources: [luffyruns]
  verbs: [get, list, watch, patch]
- apiGroups: [luffy.dev]
  resources: [luffyruns/status]
  verbs: [get, patch]
- apiGroups: [luffy.dev]
  resources: [luffyruns/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [create]
- apiGroups: [""]
  resources: [services]
  verbs: [create, patch, delete]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [create, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, create, patch, delete]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, create, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [create, delete]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, create, delete]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads/status]
  verbs: [patch]
{{- end }}

{{/* Cluster-scoped reads of a queued run (spec.scheduling.queueName): the ResourceFlavors its Workload's admission
names (their node labels and tolerations place the pods) and the value of its PriorityClass. Read-only. */}}
{{- define "luffy.kueueClusterRules" -}}
- apiGroups: [kueue.x-k8s.io]
  resources: [resourceflavors]
  verbs: [get]
- apiGroups: [scheduling.k8s.io]
  resources: [priorityclasses]
  verbs: [get]
{{- end }}

{{/* kopf discovers the CRD's served versions cluster-wide, in either mode. */}}
{{- define "luffy.crdRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}

{{/* Only when namespaced: kopf lists and watches namespaces to learn which of the listed ones exist. */}}
{{- define "luffy.namespaceRules" -}}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}

{{/* The MLflow server the operator's own credentials are for: operator.mlflow.trackingUri, else the chart's. */}}
{{- define "luffy.operatorMlflowUri" -}}
{{- if .Values.operator.mlflow.trackingUri }}
{{- .Values.operator.mlflow.trackingUri }}
{{- else if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc:%v" (include "luffy.mlflowName" .) .Release.Namespace .Values.mlflow.service.port }}
{{- end }}
{{- end }}

{{/* The egress rules of every run's pods besides their own and DNS (JSON): operator.runEgress, plus the chart's
MLflow pods on their container port when mlflow.enabled. */}}
{{- define "luffy.runEgress" -}}
{{- $rules := .Values.operator.runEgress }}
{{- if .Values.mlflow.enabled }}
{{- $pods := include "luffy.selectorLabels" (dict "root" . "component" "mlflow") | fromYaml }}
{{- $peer := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" $pods) }}
{{- $rules = append $rules (dict "to" (list $peer) "ports" (list (dict "protocol" "TCP" "port" 5000))) }}
{{- end }}
{{- toJson $rules }}
{{- end }}

{{/* Cross-field checks that values.schema.json cannot express. */}}
{{- define "luffy.validate" -}}
{{- $s := .Values.operator.settings }}
{{- if le ($s.watchClientTimeoutSeconds | float64) ($s.watchServerTimeoutSeconds | float64) }}
{{- fail (printf "operator.settings.watchClientTimeoutSeconds (%v) must be greater than watchServerTimeoutSeconds (%v): the client would cut every watch before the server ends it" $s.watchClientTimeoutSeconds $s.watchServerTimeoutSeconds) }}
{{- end }}
{{- $m := .Values.operator.mlflow }}
{{- if $m.credentialsSecret }}
{{- $uri := include "luffy.operatorMlflowUri" . }}
{{- if not $uri }}
{{- fail "operator.mlflow.credentialsSecret needs operator.mlflow.trackingUri (or mlflow.enabled): the server those credentials are for" }}
{{- end }}
{{- if and (not (hasPrefix "https://" $uri)) (not $m.allowHttp) }}
{{- fail (printf "operator.mlflow: credentials go over https only, and the MLflow server is %s (set operator.mlflow.allowHttp=true to allow http)" $uri) }}
{{- end }}
{{- end }}
{{- end }}
