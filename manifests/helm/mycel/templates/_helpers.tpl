{{- /*
Template syntax this chart uses, and the only syntax it may use.

The chart is checked without the helm binary: tests/tests/manifests.rs renders it with a
small renderer that understands exactly the constructs below and fails on anything
else, so that the chart cannot drift into syntax the check does not cover. To use more
of Helm's language, teach that renderer first.

  {{ .Values.a.b }}  {{ .Release.Name }}  {{ .Release.Namespace }}
  {{ .Chart.Name }}  {{ .Chart.Version }}  {{ .Chart.AppVersion }}
                       values; a missing key is an error, not an empty string
  {{ . }}  {{ $.Values.x }}
                       the current value (inside `with`) and the top level
  {{ "text" }}  {{ 12 }}
                       string and integer literals
  {{ X | quote }}  {{ quote X }}
  {{ toYaml X }}  {{ indent N X }}  {{ nindent N X }}
  {{ include "name" X }}
                       functions; a pipe passes its value as the last argument
  {{ if X }} ... {{ end }}  {{ with X }} ... {{ end }}
                       false, 0, "", empty lists and maps, and null are false
  {{ define "name" }} ... {{ end }}
                       only in files starting with `_`
  {{- ... -}}          whitespace trimming, as in Go templates
  comments             opened by a brace pair with slash-star, closed by star-slash
                       and a brace pair, as this one
*/ -}}

{{- /* Labels every object of the chart carries. */ -}}
{{- define "mycel.labels" -}}
app.kubernetes.io/name: mycel
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: mycel
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- /* The DaemonSet's selector: fixed for the life of the DaemonSet, so no version. */ -}}
{{- define "mycel.selectorLabels" -}}
app.kubernetes.io/name: mycel
app.kubernetes.io/component: agent
{{- end }}

{{- /* Labels of the identity server's objects. */ -}}
{{- define "mycel.identityLabels" -}}
app.kubernetes.io/name: mycel
app.kubernetes.io/component: identity-server
app.kubernetes.io/part-of: mycel
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- /* The identity server's selector. */ -}}
{{- define "mycel.identitySelectorLabels" -}}
app.kubernetes.io/name: mycel
app.kubernetes.io/component: identity-server
{{- end }}
