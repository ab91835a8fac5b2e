{{/* Names, labels and the pieces every pod shares. */}}

{{- define "mgm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mgm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects: (dict "root" $ "component" "engine") */}}
{{- define "mgm.componentName" -}}
{{- printf "%s-%s" (include "mgm.fullname" .root | trunc 50 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "mgm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mgm.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mgm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "mgm.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: minigemini
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "mgm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mgm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mgm.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
{{- end -}}

{{/* In-cluster DNS name of a component's Service. */}}
{{- define "mgm.serviceHost" -}}
{{- printf "%s.%s.svc.%s" (include "mgm.componentName" .) .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{- define "mgm.modelCacheClaim" -}}
{{- default (printf "%s-models" (include "mgm.fullname" .)) .Values.modelCache.existingClaim -}}
{{- end -}}

{{/* Model id an engine reports: engine.servedModelName or the checkpoint directory's name. */}}
{{- define "mgm.servedModelName" -}}
{{- default (base .Values.engine.model.path) .Values.engine.servedModelName -}}
{{- end -}}

{{/* Marker the model-download Job writes when a checkpoint is complete. */}}
{{- define "mgm.downloadMarker" -}}
{{- printf "%s/.mgm-download-complete" . -}}
{{- end -}}

{{- define "mgm.containerSecurityContext" -}}
{{- $ctx := deepCopy .root.Values.containerSecurityContext -}}
{{- $_ := set $ctx "readOnlyRootFilesystem" .readOnly -}}
{{- $_ := set $ctx "runAsNonRoot" true -}}
{{- toYaml $ctx -}}
{{- end -}}

{{/* Probes from values (startup, readiness, liveness). */}}
{{- define "mgm.probes" -}}
startupProbe:
  {{- toYaml .startup | nindent 2 }}
readinessProbe:
  {{- toYaml .readiness | nindent 2 }}
livenessProbe:
  {{- toYaml .liveness | nindent 2 }}
{{- end -}}

{{/* The model volume (PVC or a per-pod emptyDir) and the writable scratch dirs of a model-serving pod. */}}
{{- define "mgm.modelVolumes" -}}
- name: models
{{- if .Values.modelCache.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "mgm.modelCacheClaim" . }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: home
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "mgm.modelMounts" -}}
- name: models
  mountPath: {{ .Values.modelCache.mountPath }}
- name: home
  mountPath: /home/mgm
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* initContainer that makes sure a model is on the volume before the server starts:
     (dict "root" $ "model" .Values.engine.model "build" "build-tiny" "marker" "config.json" "tinyArgs" list) */}}
{{- define "mgm.modelInit" -}}
- name: model
  image: {{ include "mgm.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  securityContext:
    {{- include "mgm.containerSecurityContext" (dict "root" .root "readOnly" true) | nindent 4 }}
  env:
    - name: MODEL_DIR
      value: {{ .model.path | quote }}
  {{- if eq .model.source "tiny" }}
  # Random tiny weights, built once per volume (CPU tests, laptops).
  command: ["sh", "-c"]
  args:
    - {{ printf "test -f \"$MODEL_DIR/%s\" || exec mgm %s \"$MODEL_DIR\" --force %s" .marker .build (join " " .tinyArgs) | trimSuffix " " | quote }}
  {{- else if eq .model.source "huggingface" }}
  # The model-download Job fills the volume; this waits for its completion marker.
  command: ["sh", "-c"]
  args:
    - {{ printf "until test -f %s; do echo \"waiting for the model-download Job to finish $MODEL_DIR\"; sleep 10; done" (include "mgm.downloadMarker" "\"$MODEL_DIR\"") | quote }}
  {{- else }}
  command: ["sh", "-c"]
  args:
    - {{ printf "test -f \"$MODEL_DIR/%s\" || { echo \"no checkpoint at $MODEL_DIR (%s missing): copy it onto the model volume or use model.source=huggingface\" >&2; exit 1; }" .marker .marker | quote }}
  {{- end }}
  resources:
    requests: {cpu: 100m, memory: 256Mi}
    limits: {memory: 8Gi}
  volumeMounts:
    {{- include "mgm.modelMounts" .root | nindent 4 }}
{{- end -}}

{{/* preStop: keep serving while the endpoint removal propagates; SIGTERM (the drain) comes after. */}}
{{- define "mgm.preStop" -}}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ . | quote }}]
{{- end -}}

{{/* The gateways' image store URL when it is not in a Secret: url, else the in-chart Redis, else memory://. */}}
{{- define "mgm.imageStoreURL" -}}
{{- $s := .Values.imageStore -}}
{{- if $s.url -}}
{{- $s.url -}}
{{- else if $s.redis.enabled -}}
{{- printf "redis://%s:6379/0" (include "mgm.serviceHost" (dict "root" . "component" "image-store")) -}}
{{- else -}}
memory://
{{- end -}}
{{- end -}}

{{/* Checks JSON Schema cannot express; a failed one stops the render with a message naming the values. */}}
{{- define "mgm.validate" -}}
{{- range $key := list "gateway" "engine" "sdxlWorker" }}
{{- $v := index $.Values $key }}
{{- if le (int $v.terminationGracePeriodSeconds) (add $v.preStopSleepSeconds $v.drainSeconds | int) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed %s.preStopSleepSeconds + %s.drainSeconds (%v): the pod would be killed mid-drain" $key $v.terminationGracePeriodSeconds $key $key (add $v.preStopSleepSeconds $v.drainSeconds)) }}
{{- end }}
{{- end }}
{{- if and .Values.gateway.autoscaling.enabled (lt (int .Values.gateway.autoscaling.maxReplicas) (int .Values.gateway.autoscaling.minReplicas)) }}
{{- fail "gateway.autoscaling.maxReplicas must be >= gateway.autoscaling.minReplicas" }}
{{- end }}
{{- if and .Values.engine.keda.enabled (lt (int .Values.engine.keda.maxReplicas) (int .Values.engine.keda.minReplicas)) }}
{{- fail "engine.keda.maxReplicas must be >= engine.keda.minReplicas" }}
{{- end }}
{{- if .Values.ingress.enabled }}
{{- range $h := .Values.ingress.hosts }}
{{- range $p := ($h.paths | default $.Values.ingress.paths) }}
{{- $path := trimSuffix "/" $p.path }}
{{- /* Prefix matches whole segments; ImplementationSpecific may be a string prefix or a regex: refuse more. */}}
{{- $covers := or (eq $path "/metrics") (and (ne $p.pathType "Exact") (eq $path "")) }}
{{- if and (eq $p.pathType "ImplementationSpecific") (or (hasPrefix $path "/metrics") (regexMatch "[*+?()\\[\\]{}|^$\\\\]" $p.path)) }}
{{- $covers = true }}
{{- end }}
{{- if $covers }}
{{- fail (printf "ingress path %s (%s) on host %q would make /metrics public: route only the API paths (ingress.paths); the ServiceMonitor scrapes the Service" $p.path $p.pathType $h.host) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $store := include "mgm.imageStoreURL" . }}
{{- $many := or .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.replicas) 1) }}
{{- /* Not only images: stored Responses (previous_response_id) live in the same store, image generation or not. */}}
{{- if and $many (not .Values.imageStore.existingSecret) (hasPrefix "memory://" $store) }}
{{- fail "imageStore: several gateway pods (gateway.replicas > 1 or gateway.autoscaling.enabled) need a shared image store, or a response_format=url image or a stored response (previous_response_id) written by one pod is a 404 on the others: set imageStore.redis.enabled=true, imageStore.url (redis:// or file:// with existingClaim) or imageStore.existingSecret" }}
{{- end }}
{{- $edits := .Values.gateway.maxEditImages }}
{{- if and .Values.engine.enabled (not (kindIs "invalid" $edits)) (gt (int $edits) (int .Values.engine.imagesPerPrompt)) }}
{{- fail (printf "gateway.maxEditImages (%v) must not exceed engine.imagesPerPrompt (%v): MGM sees every input image of an edit when it re-captions it, and the engine refuses a prompt with more images than that" $edits .Values.engine.imagesPerPrompt) }}
{{- end }}
{{- if and (hasPrefix "file://" $store) (not .Values.imageStore.existingClaim) }}
{{- fail "imageStore.url is file://: set imageStore.existingClaim to a ReadWriteMany claim every gateway pod mounts there" }}
{{- end }}
{{- if and (not .Values.engine.enabled) (not (has "--engine" .Values.gateway.extraArgs)) }}
{{- fail "engine.enabled=false: the gateway needs engines elsewhere (gateway.extraArgs: [--engine, URL])" }}
{{- end }}
{{- end -}}
