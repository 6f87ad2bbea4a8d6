{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "fl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Default fully qualified app name, truncated to 63 characters (a DNS label). If the release name
contains the chart name it is used as is.
*/}}
{{- define "fl.fullname" -}}
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

{{/*
Chart name and version for the helm.sh/chart label.
*/}}
{{- define "fl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: never change after install.
*/}}
{{- define "fl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "fl.labels" -}}
helm.sh/chart: {{ include "fl.chart" . }}
{{ include "fl.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fl
{{- end }}

{{/*
Server: selector labels and object name (Deployment, Service).
*/}}
{{- define "fl.server.selectorLabels" -}}
{{ include "fl.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "fl.server.fullname" -}}
{{- printf "%s-server" (include "fl.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The server's address as sites and admins inside the cluster dial it: the Service's FQDN and port.
*/}}
{{- define "fl.server.host" -}}
{{- printf "%s.%s.svc.%s" (include "fl.server.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "fl.server.address" -}}
{{- printf "%s:%d" (include "fl.server.host" .) (int .Values.server.port) }}
{{- end }}

{{/*
Site: selector labels and object name. Call with (dict "root" $ "site" $siteName).
*/}}
{{- define "fl.site.selectorLabels" -}}
{{ include "fl.selectorLabels" .root }}
app.kubernetes.io/component: site
fl/site: {{ .site }}
{{- end }}

{{- define "fl.site.fullname" -}}
{{- printf "%s-site-%s" (include "fl.fullname" .root) .site | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "fl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fl.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference. Call with (dict "root" $ "image" <repository/tag/pullPolicy map>).
*/}}
{{- define "fl.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/*
TLS Secret names. Generated mode: <fullname>-server-tls, <fullname>-admin-tls,
<fullname>-site-<name>-tls and <fullname>-ca (CA certificate and key, to sign sites added later).
Existing mode: tls.existing.server, tls.existing.admin, sites[].tlsSecret.
*/}}
{{- define "fl.tls.caSecretName" -}}
{{- printf "%s-ca" (include "fl.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fl.tls.serverSecretName" -}}
{{- if eq .Values.tls.mode "existing" }}
{{- required "tls.existing.server: name the server's TLS Secret (ca.crt, tls.crt, tls.key) when tls.mode is existing" .Values.tls.existing.server }}
{{- else }}
{{- printf "%s-server-tls" (include "fl.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "fl.tls.adminSecretName" -}}
{{- if eq .Values.tls.mode "existing" }}
{{- required "tls.existing.admin: name the admin's TLS Secret (ca.crt, tls.crt, tls.key) when tls.mode is existing" .Values.tls.existing.admin }}
{{- else }}
{{- printf "%s-admin-tls" (include "fl.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Call with (dict "root" $ "site" <the site's map>). */}}
{{- define "fl.tls.siteSecretName" -}}
{{- if eq .root.Values.tls.mode "existing" }}
{{- if not .site.tlsSecret }}
{{- fail (printf "sites[%s].tlsSecret: name the site's TLS Secret (ca.crt, tls.crt, tls.key) when tls.mode is existing" .site.name) }}
{{- end }}
{{- .site.tlsSecret }}
{{- else }}
{{- printf "%s-tls" (include "fl.site.fullname" (dict "root" .root "site" .site.name)) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
The Secret holding the server's revocation list (key crl.pem): tls.crl.existingSecret, or
<fullname>-crl made from tls.crl.pem; empty when there is none. Giving both fails.
*/}}
{{- define "fl.tls.crlSecretName" -}}
{{- if and .Values.tls.crl.pem .Values.tls.crl.existingSecret }}
{{- fail "tls.crl: give either pem or existingSecret, not both" }}
{{- end }}
{{- if .Values.tls.crl.existingSecret }}
{{- .Values.tls.crl.existingSecret }}
{{- else if .Values.tls.crl.pem }}
{{- printf "%s-crl" (include "fl.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
The role marker that generated certificates carry as a DNS SAN, because Helm's genSignedCert cannot
set the subject OU that docs/operations.md puts the role in: "<role>.role.fl.invalid" (".invalid"
never resolves, RFC 6761). See charts/fl/README.md.
*/}}
{{- define "fl.tls.roleSAN" -}}
{{- printf "%s.role.fl.invalid" . }}
{{- end }}

{{/*
The DNS names of the server certificate: the Service's short and qualified names, localhost (for the
in-pod probes), tls.generate.serverDnsNames and the role marker.
*/}}
{{- define "fl.tls.serverDnsNames" -}}
{{- $svc := include "fl.server.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (include "fl.server.host" .) "localhost" }}
{{- $names = concat $names .Values.tls.generate.serverDnsNames (list (include "fl.tls.roleSAN" "server")) }}
{{- toJson (uniq $names) }}
{{- end }}

{{/*
Checks that the schema also makes, repeated here with the allowed values so that a render with
--skip-schema-validation fails just as clearly. Renders nothing.
*/}}
{{- define "fl.validate" -}}
{{- $allowed := dict
  "logFormat" (list "text" "json")
  "tls.mode" (list "generate" "existing")
  "server.service.type" (list "ClusterIP" "NodePort" "LoadBalancer")
  "job.dataset" (list "auto" "cifar10" "synthetic") }}
{{- $given := dict
  "logFormat" .Values.logFormat
  "tls.mode" .Values.tls.mode
  "server.service.type" .Values.server.service.type
  "job.dataset" .Values.job.dataset }}
{{- range $key, $values := $allowed }}
{{- $value := index $given $key }}
{{- if not (has $value $values) }}
{{- fail (printf "%s: %v is not allowed; allowed values: %s" $key $value (join ", " $values)) }}
{{- end }}
{{- end }}
{{- range $image := list .Values.image.server .Values.image.site }}
{{- if not (has $image.pullPolicy (list "Always" "IfNotPresent" "Never")) }}
{{- fail (printf "image pullPolicy: %v is not allowed; allowed values: Always, IfNotPresent, Never" $image.pullPolicy) }}
{{- end }}
{{- end }}
{{- if not .Values.sites }}
{{- fail "sites: list at least one site, e.g. sites: [{name: site-1}]" }}
{{- end }}
{{- $siteKeys := list "name" "gpus" "gpuResource" "runtimeClassName" "resources" "nodeSelector" "tolerations" "affinity" "podAnnotations" "env" "extraArgs" "noCustomCode" "workspaceSizeLimit" "shmSize" "data" "probes" "terminationGracePeriodSeconds" "image" "tlsSecret" }}
{{- $seenNames := dict }}
{{- $seenObjects := dict }}
{{- $reserved := list .Values.server.name .Values.admin.name }}
{{- range $i, $site := .Values.sites }}
{{- if not (kindIs "map" $site) }}
{{- fail (printf "sites[%d]: each site is a map with at least a name, e.g. {name: site-1}" $i) }}
{{- end }}
{{- range $key, $_ := $site }}
{{- if not (has $key $siteKeys) }}
{{- fail (printf "sites[%d].%s: unknown key; allowed keys: %s" $i $key (join ", " $siteKeys)) }}
{{- end }}
{{- end }}
{{- if not $site.name }}
{{- fail (printf "sites[%d].name: required" $i) }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString $site.name)) }}
{{- fail (printf "sites[%d].name: %q must be lower-case letters, digits and '-', starting and ending with a letter or digit" $i $site.name) }}
{{- end }}
{{- if hasKey $seenNames $site.name }}
{{- fail (printf "sites[%d].name: %q is listed twice" $i $site.name) }}
{{- end }}
{{- if has $site.name $reserved }}
{{- fail (printf "sites[%d].name: %q is the server's or the admin's name" $i $site.name) }}
{{- end }}
{{- $_ := set $seenNames $site.name true }}
{{- $object := include "fl.site.fullname" (dict "root" $ "site" $site.name) }}
{{- if hasKey $seenObjects $object }}
{{- fail (printf "sites[%d].name: %q gives the same object name %q as another site after truncation to 63 characters; shorten the names" $i $site.name $object) }}
{{- end }}
{{- $_ := set $seenObjects $object true }}
{{- $gpus := ternary $site.gpus $.Values.siteDefaults.gpus (hasKey $site "gpus") }}
{{- if not (or (kindIs "float64" $gpus) (kindIs "int64" $gpus) (kindIs "int" $gpus)) }}
{{- fail (printf "sites[%d].gpus: %v must be a whole number >= 0" $i $gpus) }}
{{- else if or (lt (float64 $gpus) 0.0) (ne (float64 (int $gpus)) (float64 $gpus)) }}
{{- fail (printf "sites[%d].gpus: %v must be a whole number >= 0" $i $gpus) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A site's effective settings: siteDefaults with the keys the site sets replacing them (an explicit 0,
false, "" or [] on a site wins too, which a plain merge would ignore); env merged by name, the site's
entries last. Call with (dict "root" $ "site" <the site's map>); returns YAML.
*/}}
{{- define "fl.site.settings" -}}
{{- $defaults := .root.Values.siteDefaults }}
{{- $site := .site }}
{{- $out := dict "name" $site.name }}
{{- range $key := list "gpus" "gpuResource" "runtimeClassName" "resources" "nodeSelector" "tolerations" "affinity" "podAnnotations" "extraArgs" "noCustomCode" "workspaceSizeLimit" "shmSize" "data" "probes" "terminationGracePeriodSeconds" }}
{{- $_ := set $out $key (ternary (index $site $key) (index $defaults $key) (hasKey $site $key)) }}
{{- end }}
{{- $_ := set $out "image" (mergeOverwrite (deepCopy $.root.Values.image.site) (default (dict) $site.image)) }}
{{- $_ := set $out "tlsSecret" (default "" $site.tlsSecret) }}
{{- $siteEnv := default (list) $site.env }}
{{- $siteEnvNames := list }}
{{- range $siteEnv }}{{ $siteEnvNames = append $siteEnvNames .name }}{{ end }}
{{- $env := list }}
{{- range (default (list) $defaults.env) }}
{{- if not (has .name $siteEnvNames) }}{{ $env = append $env . }}{{ end }}
{{- end }}
{{- $_ := set $out "env" (concat $env $siteEnv) }}
{{- toYaml $out }}
{{- end }}

{{/*
Container resources with the GPU request and limit set exactly when gpus > 0 (and removed
otherwise, even if given in resources). Call with (dict "resources" <map> "gpus" N "gpuResource" name).
*/}}
{{- define "fl.site.resources" -}}
{{- $res := deepCopy (default (dict) .resources) }}
{{- $limits := deepCopy (default (dict) (index $res "limits")) }}
{{- $requests := deepCopy (default (dict) (index $res "requests")) }}
{{- $_ := unset $limits .gpuResource }}
{{- $_ := unset $requests .gpuResource }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $limits .gpuResource (int .gpus) }}
{{- $_ := set $requests .gpuResource (int .gpus) }}
{{- end }}
{{- if $limits }}{{ $_ := set $res "limits" $limits }}{{ else }}{{ $_ := unset $res "limits" }}{{ end }}
{{- if $requests }}{{ $_ := set $res "requests" $requests }}{{ else }}{{ $_ := unset $res "requests" }}{{ end }}
{{- toYaml $res }}
{{- end }}

{{/*
The volume that mounts a participant's TLS Secret as /etc/fl/tls (ca.crt, tls.crt, tls.key).
Mode 0440: readable by the runtime user through fsGroup, by nobody else. Call with the Secret name.
*/}}
{{- define "fl.tls.volume" -}}
- name: tls
  secret:
    secretName: {{ . }}
    defaultMode: 288 # 0440
    items:
      - key: ca.crt
        path: ca.crt
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
