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

{{/*
The address sites and admins of this release dial: the Service's, or externalServer.address in a
sites-only release (server.enabled: false).
*/}}
{{- define "fl.server.address" -}}
{{- if .Values.server.enabled }}
{{- printf "%s:%d" (include "fl.server.host" .) (int .Values.server.port) }}
{{- else }}
{{- .Values.externalServer.address }}
{{- end }}
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
Image reference: repository@digest when a digest is given (the tag is then only a label), else
repository:tag (the tag defaulting to appVersion). Call with (dict "root" $ "image" <repository/tag/
digest/pullPolicy map>).
*/}}
{{- define "fl.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
Fails unless an image map's pullPolicy and digest are valid. Call with (dict "where" "image.site" "image" <map>).
*/}}
{{- define "fl.validateImage" -}}
{{- if not (has .image.pullPolicy (list "Always" "IfNotPresent" "Never")) }}
{{- fail (printf "%s.pullPolicy: %v is not allowed; allowed values: Always, IfNotPresent, Never" .where .image.pullPolicy) }}
{{- end }}
{{- if and .image.digest (not (regexMatch "^sha256:[0-9a-f]{64}$" (toString .image.digest))) }}
{{- fail (printf "%s.digest: %q is not an image digest (sha256: and 64 hex digits)" .where .image.digest) }}
{{- end }}
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
in-pod probes), server.externalNames, tls.generate.serverDnsNames and the role marker.
*/}}
{{- define "fl.tls.serverDnsNames" -}}
{{- $svc := include "fl.server.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (include "fl.server.host" .) "localhost" }}
{{- $names = concat $names .Values.server.externalNames .Values.tls.generate.serverDnsNames (list (include "fl.tls.roleSAN" "server")) }}
{{- toJson (uniq $names) }}
{{- end }}

{{/*
Fails when extra pod labels name a key the chart sets itself (its selectors and app.kubernetes.io/*,
helm.sh/*, fl/* labels). Call with (dict "where" "server.podLabels" "labels" <map>).
*/}}
{{- define "fl.validatePodLabels" -}}
{{- range $key, $_ := .labels }}
{{- if regexMatch "^(app\\.kubernetes\\.io|helm\\.sh|fl)/" $key }}
{{- fail (printf "%s: %q is a label the chart sets itself; choose another key" $.where $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Fails on a topology that cannot work, naming the values to change: all-in-one (the default), server
only (sites: []) or sites only (server.enabled: false with externalServer.address and tls.mode
existing, since a CA generated here would not be the coordinator's).
*/}}
{{- define "fl.validateTopology" -}}
{{- if .Values.server.enabled }}
{{- if .Values.externalServer.address }}
{{- fail (printf "externalServer.address: %q is set but server.enabled is true; set server.enabled: false for a sites-only release, or clear externalServer.address" .Values.externalServer.address) }}
{{- end }}
{{- else }}
{{- if not .Values.externalServer.address }}
{{- fail "externalServer.address: required when server.enabled is false (host:port of the fl server the sites dial, e.g. fl.example.org:8002); or set server.enabled: true" }}
{{- end }}
{{- if not (regexMatch "^[^:/\\s]+:[0-9]{1,5}$" (toString .Values.externalServer.address)) }}
{{- fail (printf "externalServer.address: %q is not host:port (e.g. fl.example.org:8002)" .Values.externalServer.address) }}
{{- end }}
{{- if ne .Values.tls.mode "existing" }}
{{- fail (printf "tls.mode: %q cannot work with server.enabled: false; set tls.mode: existing with Secrets from the coordinator's `fl provision` (a CA generated here would not be the server's CA)" .Values.tls.mode) }}
{{- end }}
{{- if not .Values.sites }}
{{- fail "sites: list at least one site when server.enabled is false (a release with neither server nor sites runs nothing)" }}
{{- end }}
{{- if .Values.server.ingress.enabled }}
{{- fail "server.ingress.enabled: true needs the server; set server.enabled: true or server.ingress.enabled: false" }}
{{- end }}
{{- end }}
{{- if and .Values.server.ingress.enabled (not .Values.server.externalNames) }}
{{- fail "server.externalNames: name at least one (the Ingress host, also in the server certificate) when server.ingress.enabled is true" }}
{{- end }}
{{- if and .Values.server.enabled .Values.job.submit (not .Values.sites) (not (int .Values.job.nClients)) }}
{{- fail "job.submit: true with sites: [] and job.nClients: 0 submits a job for no site; set job.nClients to the number of sites that will connect, or job.submit: false" }}
{{- end }}
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
{{- include "fl.validateImage" (dict "where" "image.server" "image" .Values.image.server) }}
{{- include "fl.validatePodLabels" (dict "where" "server.podLabels" "labels" .Values.server.podLabels) }}
{{- include "fl.validateImage" (dict "where" "image.site" "image" .Values.image.site) }}
{{- include "fl.validateTopology" . }}
{{- $siteKeys := concat (list "name") (include "fl.site.settingKeys" . | fromJsonArray) (list "image" "tlsSecret") }}
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
{{- range $key := list "gpus" "nprocPerNode" }}
{{- $count := ternary (index $site $key) (index $.Values.siteDefaults $key) (hasKey $site $key) }}
{{- if not (or (kindIs "float64" $count) (kindIs "int64" $count) (kindIs "int" $count)) }}
{{- fail (printf "sites[%d].%s: %v must be a whole number >= 0" $i $key $count) }}
{{- else if or (lt (float64 $count) 0.0) (ne (float64 (int $count)) (float64 $count)) }}
{{- fail (printf "sites[%d].%s: %v must be a whole number >= 0" $i $key $count) }}
{{- end }}
{{- end }}
{{- $settings := include "fl.site.settings" (dict "root" $ "site" $site) | fromYaml }}
{{- include "fl.validateImage" (dict "where" (printf "sites[%d].image" $i) "image" $settings.image) }}
{{- include "fl.validatePodLabels" (dict "where" (printf "sites[%d].podLabels" $i) "labels" $settings.podLabels) }}
{{- if not (has $settings.launcher (list "process" "kubernetes")) }}
{{- fail (printf "sites[%d].launcher: %v is not allowed (site %s); allowed values: process, kubernetes" $i $settings.launcher $site.name) }}
{{- end }}
{{- range $key, $value := $settings.probes }}
{{- if not (and (or (kindIs "float64" $value) (kindIs "int64" $value) (kindIs "int" $value)) (ge (float64 $value) 1.0)) }}
{{- fail (printf "sites[%d].probes.%s: %v must be a whole number >= 1 (site %s)" $i $key $value $site.name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The keys a site may set besides name, image and tlsSecret, as a JSON list: each defaults to
siteDefaults.<key>. One list for the settings below and for the check of a site's keys.
*/}}
{{- define "fl.site.settingKeys" -}}
{{- toJson (list "gpus" "nprocPerNode" "gpuResource" "launcher" "kubernetesLauncher" "runtimeClassName" "resources" "nodeSelector" "tolerations" "affinity" "podAnnotations" "podLabels" "priorityClassName" "topologySpreadConstraints" "env" "extraArgs" "extraVolumes" "extraVolumeMounts" "noCustomCode" "workspaceSizeLimit" "shmSize" "data" "probes" "terminationGracePeriodSeconds") }}
{{- end }}

{{/*
Merges the map .src into the map .dst in place, key by key at every depth: a key .src sets wins
(an explicit 0, false, "" or [] too), maps on both sides merge, and a key set to null in .src
removes the key from .dst. Renders nothing. Call with (dict "dst" <map, modified> "src" <map>).
*/}}
{{- define "fl.mergeInto" -}}
{{- $dst := .dst }}
{{- range $key, $value := .src }}
{{- if kindIs "invalid" $value }}
{{- $_ := unset $dst $key }}
{{- else if and (kindIs "map" $value) (kindIs "map" (index $dst $key)) }}
{{- include "fl.mergeInto" (dict "dst" (index $dst $key) "src" $value) }}
{{- else }}
{{- $_ := set $dst $key $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Two lists of maps merged by one field (.by, e.g. "name"): the entries of .base whose field no entry of
.over has, then .over. Call with (dict "base" <list> "over" <list> "by" <field>); returns a JSON list.
*/}}
{{- define "fl.mergeListBy" -}}
{{- $by := .by }}
{{- $over := default (list) .over }}
{{- $overKeys := list }}
{{- range $over }}{{ $overKeys = append $overKeys (index . $by) }}{{ end }}
{{- $out := list }}
{{- range (default (list) .base) }}
{{- if not (has (index . $by) $overKeys) }}{{ $out = append $out . }}{{ end }}
{{- end }}
{{- toJson (concat $out $over) }}
{{- end }}

{{/*
A site's effective settings: for every key, siteDefaults (image: the top-level image.site) with the
site's own value over it. Maps (resources, probes, nodeSelector, podAnnotations, podLabels, affinity,
data, image) merge key by key at every depth, so a site that sets one key keeps the others; other
values the site sets replace the default (an explicit 0, false, "" or [] too); env and extraVolumes
merge by name and extraVolumeMounts by mountPath, the site's entries last. Call with
(dict "root" $ "site" <the site's map>); returns YAML.
*/}}
{{- define "fl.site.settings" -}}
{{- $defaults := deepCopy .root.Values.siteDefaults }}
{{- $_ := set $defaults "image" (deepCopy .root.Values.image.site) }}
{{- $site := .site }}
{{- $out := dict "name" $site.name "tlsSecret" (default "" $site.tlsSecret) }}
{{- range $key := concat (include "fl.site.settingKeys" .root | fromJsonArray) (list "image") }}
{{- $default := index $defaults $key }}
{{- $own := index $site $key }}
{{- if not (hasKey $site $key) }}
{{- $_ := set $out $key $default }}
{{- else if and (kindIs "map" $default) (kindIs "map" $own) }}
{{- include "fl.mergeInto" (dict "dst" $default "src" $own) }}
{{- $_ := set $out $key $default }}
{{- else }}
{{- $_ := set $out $key $own }}
{{- end }}
{{- end }}
{{- range $key, $by := dict "env" "name" "extraVolumes" "name" "extraVolumeMounts" "mountPath" }}
{{- $_ := set $out $key (include "fl.mergeListBy" (dict "base" (index $defaults $key) "over" (index $site $key) "by" $by) | fromJsonArray) }}
{{- end }}
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

{{/*
The TLS material of tls.mode "generate", made once per render and kept in .Values.__flGeneratedTLS,
so that the Secrets and the pods' checksum/tls annotations see the same certificates:
{ca: {secret, crt, key}, participants: [{secret, cn, role, spec, data: {ca.crt, tls.crt, tls.key}}]}
(base64). On upgrade, `lookup` finds the Secrets of the previous install and keeps them: the CA
always, a participant's certificate while it was signed by that CA for the same subject and names.
(`helm template`, --dry-run and Argo CD cannot look up, so they get fresh material on every render.)
Helm's genSignedCert sets only the subject CN, not the OU that holds the role in fl provision's
certificates; the role goes into a DNS SAN "<role>.role.fl.invalid" instead (see README.md).
Renders nothing; call with the root context.
*/}}
{{- define "fl.tls.generated" -}}
{{- if not (hasKey .Values "__flGeneratedTLS") }}
{{- $days := int .Values.tls.generate.days }}
{{- $caName := include "fl.tls.caSecretName" . }}
{{- $ca := dict }}
{{- $previousCA := lookup "v1" "Secret" .Release.Namespace $caName }}
{{- if and $previousCA (hasKey (default (dict) $previousCA.data) "ca.crt") (hasKey (default (dict) $previousCA.data) "ca.key") }}
{{- $ca = buildCustomCert (index $previousCA.data "ca.crt") (index $previousCA.data "ca.key") }}
{{- else }}
{{- $ca = genCA (printf "%s fl project CA" (include "fl.fullname" .)) $days }}
{{- end }}
{{- $caCrt := $ca.Cert | b64enc }}
{{- $wanted := list }}
{{- $wanted = append $wanted (dict
    "secret" (include "fl.tls.serverSecretName" .)
    "cn" .Values.server.name "role" "server"
    "ips" (uniq (concat (list "127.0.0.1") .Values.tls.generate.serverIPs))
    "dns" (include "fl.tls.serverDnsNames" . | fromJsonArray)) }}
{{- $wanted = append $wanted (dict
    "secret" (include "fl.tls.adminSecretName" .)
    "cn" .Values.admin.name "role" "admin"
    "ips" (list) "dns" (list (include "fl.tls.roleSAN" "admin"))) }}
{{- range .Values.sites }}
{{- $wanted = append $wanted (dict
    "secret" (include "fl.tls.siteSecretName" (dict "root" $ "site" .))
    "cn" .name "role" "site"
    "ips" (list) "dns" (list (include "fl.tls.roleSAN" "site"))) }}
{{- end }}
{{- $participants := list }}
{{- range $wanted }}
{{- $spec := printf "cn=%s role=%s dns=%s ips=%s" .cn .role (join "," .dns) (join "," .ips) | sha256sum }}
{{- $previous := lookup "v1" "Secret" $.Release.Namespace .secret }}
{{- $data := dict }}
{{- if and $previous $previous.data $previous.metadata.annotations
      (eq (index $previous.metadata.annotations "fl/tls-spec" | default "") $spec)
      (eq (index $previous.data "ca.crt" | default "") $caCrt)
      (hasKey $previous.data "tls.crt") (hasKey $previous.data "tls.key") }}
{{- $data = dict "ca.crt" $caCrt "tls.crt" (index $previous.data "tls.crt") "tls.key" (index $previous.data "tls.key") }}
{{- else }}
{{- $cert := genSignedCert .cn .ips .dns $days $ca }}
{{- $data = dict "ca.crt" $caCrt "tls.crt" ($cert.Cert | b64enc) "tls.key" ($cert.Key | b64enc) }}
{{- end }}
{{- $participants = append $participants (dict "secret" .secret "cn" .cn "role" .role "spec" $spec "data" $data) }}
{{- end }}
{{- $_ := set .Values "__flGeneratedTLS" (dict
    "ca" (dict "secret" $caName "crt" $caCrt "key" ($ca.Key | b64enc))
    "participants" $participants) }}
{{- end }}
{{- end }}

{{/*
The checksum/tls annotation's value for a pod that mounts the TLS Secret .secret: the sha256 of the
Secret's data, so that a re-issued certificate rolls exactly the pods that use it. Generated mode:
of the material this render writes; existing mode: of the Secret `lookup` finds (empty, and no
annotation, where lookup cannot run: helm template, Argo CD). Call with (dict "root" $ "secret" name).
*/}}
{{- define "fl.tls.checksum" -}}
{{- if eq .root.Values.tls.mode "generate" }}
{{- include "fl.tls.generated" .root }}
{{- range (index .root.Values "__flGeneratedTLS").participants }}
{{- if eq .secret $.secret }}{{ toJson .data | sha256sum }}{{ end }}
{{- end }}
{{- else }}
{{- $found := lookup "v1" "Secret" .root.Release.Namespace .secret }}
{{- if and $found $found.data }}{{ toJson $found.data | sha256sum }}{{ end }}
{{- end }}
{{- end }}

{{/*
A pod's annotations: the given ones (podAnnotations) plus checksum/tls of the TLS Secret it mounts.
Call with (dict "root" $ "annotations" <map> "secret" <TLS Secret name>); returns YAML, or nothing.
*/}}
{{- define "fl.podAnnotations" -}}
{{- $out := deepCopy (default (dict) .annotations) }}
{{- $checksum := include "fl.tls.checksum" (dict "root" .root "secret" .secret) }}
{{- if $checksum }}{{ $_ := set $out "checksum/tls" $checksum }}{{ end }}
{{- if .root.Values.metrics.enabled }}
{{- $_ := set $out "prometheus.io/scrape" "true" }}
{{- $_ := set $out "prometheus.io/port" (toString (int .root.Values.metrics.port)) }}
{{- $_ := set $out "prometheus.io/path" "/metrics" }}
{{- end }}
{{- with $out }}{{ toYaml . }}{{ end }}
{{- end }}

{{/*
The PodDisruptionBudget API: policy/v1 where the cluster serves it (Kubernetes 1.21 and later),
else policy/v1beta1 (1.20). `helm template` claims both API groups, so its --kube-version decides.
*/}}
{{- define "fl.pdb.apiVersion" -}}
{{- if and (.Capabilities.APIVersions.Has "policy/v1") (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version) }}
{{- print "policy/v1" }}
{{- else }}
{{- print "policy/v1beta1" }}
{{- end }}
{{- end }}

{{/*
The daemons' metrics flags (fl server|site --metrics-port/--metrics-host) when metrics are enabled.
*/}}
{{- define "fl.metrics.args" -}}
{{- if .Values.metrics.enabled -}}
- --metrics-port
- {{ int .Values.metrics.port | quote }}
- --metrics-host
- 0.0.0.0
{{- end }}
{{- end }}

{{/*
The "metrics" container port when metrics are enabled.
*/}}
{{- define "fl.metrics.containerPort" -}}
{{- if .Values.metrics.enabled -}}
- name: metrics
  containerPort: {{ int .Values.metrics.port }}
  protocol: TCP
{{- end }}
{{- end }}

{{/*
Whether to render the Prometheus Operator objects of kind .kind: enabled, and the API served or forced.
*/}}
{{- define "fl.metrics.monitor" -}}
{{- $m := .root.Values.metrics }}
{{- if and $m.enabled $m.serviceMonitor.enabled (or $m.serviceMonitor.force (.root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" .kind))) }}true{{ end }}
{{- end }}

{{/*
NetworkPolicy ingress rule that lets scrapers (metrics.from; empty: any peer) reach the metrics port.
*/}}
{{- define "fl.metrics.ingress" -}}
{{- if .Values.metrics.enabled -}}
- ports:
    - protocol: TCP
      port: {{ int .Values.metrics.port }}
  {{- with .Values.metrics.from }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
Whether any site launches its jobs as Kubernetes pods ("true" or empty): the launcher's
ServiceAccount, Role and RoleBinding are rendered only then.
*/}}
{{- define "fl.launcher.used" -}}
{{- range $entry := .Values.sites }}
{{- $site := include "fl.site.settings" (dict "root" $ "site" $entry) | fromYaml }}
{{- if eq $site.launcher "kubernetes" }}true{{ end }}
{{- end }}
{{- end }}

{{/*
The launcher's ServiceAccount (the site pods that create job pods), and its Role and RoleBinding.
*/}}
{{- define "fl.launcher.name" -}}
{{- printf "%s-launcher" (include "fl.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A site's job pods, as fl.site.kube_launch's launcher config (JSON): the site's image, GPUs,
resources, scheduling, data volume and env; the release's secure defaults; labels naming the
release. Call with (dict "root" $ "site" <the site's settings>).
*/}}
{{- define "fl.launcher.config" -}}
{{- $root := .root }}
{{- $site := .site }}
{{- $labels := include "fl.selectorLabels" $root | fromYaml }}
{{- $_ := set $labels "app.kubernetes.io/component" "job" }}
{{- $labels = merge $labels (default (dict) $site.podLabels) }}
{{- $config := dict
  "image" (include "fl.image" (dict "root" $root "image" $site.image))
  "imagePullPolicy" $site.image.pullPolicy
  "imagePullSecrets" (default (list) $root.Values.imagePullSecrets)
  "serviceAccountName" (include "fl.serviceAccountName" $root)
  "namespace" $root.Release.Namespace
  "gpus" (int $site.gpus)
  "gpuResource" $site.gpuResource
  "resources" (default (dict) $site.resources)
  "nodeSelector" (default (dict) $site.nodeSelector)
  "tolerations" (default (list) $site.tolerations)
  "affinity" (default (dict) $site.affinity)
  "runtimeClassName" (default "" $site.runtimeClassName)
  "priorityClassName" (default "" $site.priorityClassName)
  "env" (default (list) $site.env)
  "labels" $labels
  "podSecurityContext" $root.Values.podSecurityContext
  "containerSecurityContext" $root.Values.containerSecurityContext
  "shmSize" (toString (default "" $site.shmSize))
  "scheduleTimeoutSeconds" (int $site.kubernetesLauncher.scheduleTimeoutSeconds)
  "pendingLogSeconds" (int $site.kubernetesLauncher.pendingLogSeconds)
  "connectTimeoutSeconds" (int $site.kubernetesLauncher.connectTimeoutSeconds) }}
{{- if $site.data }}
{{- $_ := set $config "volumes" (list (merge (dict "name" "data") (omit $site.data.volume "name"))) }}
{{- $_ := set $config "volumeMounts" (list (dict "name" "data" "mountPath" $site.data.mountPath "readOnly" (ternary $site.data.readOnly true (hasKey $site.data "readOnly")))) }}
{{- end }}
{{- toPrettyJson $config }}
{{- end }}

{{/*
The site pods' ingress rule for their job pods' connections back to the relay (ephemeral ports).
*/}}
{{- define "fl.networkPolicy.fromJobPods" -}}
- from:
    - podSelector:
        matchLabels:
          {{- include "fl.selectorLabels" . | nindent 10 }}
          app.kubernetes.io/component: job
{{- end }}
