//! `weir describe`: one object as aligned `Key:  value` lines the way `kubectl describe`
//! lays them out, with kind-specific summaries for Pods, Services, Deployments,
//! ReplicaSets, Secrets and ConfigMaps, a generic spec/status rendering otherwise, and the
//! object's events.

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use super::apply::LAST_APPLIED;
use super::{Ctx, Target, enc, report, resource_and_name, url};

#[derive(clap::Args, Debug)]
pub struct DescribeArgs {
    #[command(flatten)]
    pub target: Target,
    /// `deployment/web`, or `deployment web`.
    args: Vec<String>,
}

enum Line {
    /// `Key:  value`, keys of one level aligned together; an empty value is a title.
    Kv(usize, String, String),
    /// A further value of the key above, aligned under its value.
    More(usize, String),
    /// Text at an indent, not aligned.
    Raw(usize, String),
}

#[derive(Default)]
struct Out {
    lines: Vec<Line>,
}

impl Out {
    fn kv(&mut self, level: usize, key: &str, value: impl Into<String>) {
        self.lines
            .push(Line::Kv(level, key.to_string(), value.into()));
    }

    /// A section title (`Containers:`) with nothing after it.
    fn title(&mut self, level: usize, key: &str) {
        self.kv(level, key, "");
    }

    fn raw(&mut self, level: usize, text: impl Into<String>) {
        self.lines.push(Line::Raw(level, text.into()));
    }

    fn render(&self) -> String {
        let mut width = std::collections::BTreeMap::new();
        for line in &self.lines {
            if let Line::Kv(level, key, value) = line
                && !value.is_empty()
            {
                let w = width.entry(*level).or_insert(0);
                *w = (*w).max(key.len() + 1);
            }
        }
        let mut out = String::new();
        for line in &self.lines {
            let text = match line {
                Line::Kv(level, key, value) if value.is_empty() => {
                    format!("{}{key}:", "  ".repeat(*level))
                }
                Line::Kv(level, key, value) => {
                    let w = width.get(level).copied().unwrap_or(0);
                    format!("{}{:<w$}  {value}", "  ".repeat(*level), format!("{key}:"))
                }
                Line::More(level, value) => {
                    let w = width.get(level).copied().unwrap_or(0) + 2;
                    format!("{}{:<w$}{value}", "  ".repeat(*level), "")
                }
                Line::Raw(level, text) => format!("{}{text}", "  ".repeat(*level)),
            };
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

pub async fn describe(ctx: &Ctx, args: DescribeArgs) -> anyhow::Result<usize> {
    let (res, name) = resource_and_name(&args.args)?;
    let obj = match ctx
        .get(&url(res, Some(&ctx.namespace), Some(&name), None))
        .await
    {
        Ok(obj) => obj,
        Err(e) => {
            report(&e);
            return Ok(1);
        }
    };
    let mut out = Out::default();
    out.kv(0, "Name", s(&obj, "/metadata/name"));
    if res.namespaced {
        out.kv(0, "Namespace", s(&obj, "/metadata/namespace"));
    }
    map_lines(&mut out, "Labels", obj.pointer("/metadata/labels"), "=");
    let mut annotations = obj
        .pointer("/metadata/annotations")
        .cloned()
        .unwrap_or(Value::Null);
    if let Some(a) = annotations.as_object_mut() {
        a.remove(LAST_APPLIED);
    }
    map_lines(&mut out, "Annotations", Some(&annotations), ": ");
    out.kv(
        0,
        "CreationTimestamp",
        timestamp(s(&obj, "/metadata/creationTimestamp")),
    );
    match res.kind {
        "Pod" => pod(&mut out, &obj),
        "Service" => service(&mut out, &obj),
        "Deployment" | "ReplicaSet" => workload(&mut out, &obj, res.kind),
        "Secret" => {
            out.kv(0, "Type", s(&obj, "/type"));
            out.title(0, "Data");
            out.raw(0, "====");
            for (k, v) in obj["data"].as_object().into_iter().flatten() {
                let len = v.as_str().map_or(0, |b| {
                    (b.len() / 4 * 3).saturating_sub(b.matches('=').count())
                });
                out.kv(0, k, format!("{len} bytes"));
            }
        }
        "ConfigMap" => {
            out.title(0, "Data");
            out.raw(0, "====");
            for (k, v) in obj["data"].as_object().into_iter().flatten() {
                out.title(0, k);
                out.raw(0, "----");
                out.raw(0, v.as_str().unwrap_or_default());
            }
        }
        _ => {
            for (key, title) in [("spec", "Spec"), ("status", "Status")] {
                if let Some(v) = obj.get(key) {
                    out.title(0, title);
                    tree(&mut out, 1, v);
                }
            }
        }
    }
    events(ctx, &mut out, &obj).await;
    print!("{}", out.render());
    Ok(0)
}

fn s<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn or_none(v: &str) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v.into()
    }
}

/// `Mon, 02 Jan 2006 15:04:05 -0700`, kubectl's timestamp format.
fn timestamp(rfc3339: &str) -> String {
    rfc3339
        .parse::<Timestamp>()
        .map(|t| t.strftime("%a, %d %b %Y %H:%M:%S %z").to_string())
        .unwrap_or_else(|_| or_none(rfc3339))
}

/// kubectl's short ages: `45s`, `3m12s`, `25m`, `5h3m`, `30h`, `3d4h`, `12d`.
fn age(since: &str) -> String {
    let Ok(t) = since.parse::<Timestamp>() else {
        return "<unknown>".into();
    };
    let secs = Timestamp::now()
        .as_second()
        .saturating_sub(t.as_second())
        .max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    match secs {
        _ if secs < 120 => format!("{secs}s"),
        _ if m < 10 && secs % 60 != 0 => format!("{m}m{}s", secs % 60),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 && m % 60 != 0 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if d < 8 && h % 24 != 0 => format!("{d}d{}h", h % 24),
        _ => format!("{d}d"),
    }
}

/// `Labels:  a=b` with further entries on following lines, `<none>` when empty.
fn map_lines(out: &mut Out, key: &str, map: Option<&Value>, sep: &str) {
    let entries: Vec<String> = map
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            format!(
                "{k}{sep}{}",
                v.as_str().map_or_else(|| v.to_string(), str::to_string)
            )
        })
        .collect();
    match entries.split_first() {
        None => out.kv(0, key, "<none>"),
        Some((first, rest)) => {
            out.kv(0, key, first.clone());
            for e in rest {
                out.lines.push(Line::More(0, e.clone()));
            }
        }
    }
}

fn capitalised(key: &str) -> String {
    let mut chars = key.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

/// Any JSON under a title, nested by indentation.
fn tree(out: &mut Out, level: usize, v: &Value) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::Object(_) | Value::Array(_) => {
                        out.title(level, &capitalised(k));
                        tree(out, level + 1, v);
                    }
                    Value::String(s) => out.kv(level, &capitalised(k), or_none(s)),
                    other => out.kv(level, &capitalised(k), other.to_string()),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(_) | Value::Array(_) => tree(out, level, item),
                    Value::String(s) => out.raw(level, s.clone()),
                    other => out.raw(level, other.to_string()),
                }
            }
        }
        Value::String(s) => out.raw(level, s.clone()),
        other => out.raw(level, other.to_string()),
    }
}

fn selector_string(sel: Option<&Value>) -> String {
    let labels = sel.and_then(|s| s.get("matchLabels").or(Some(s)));
    let parts: Vec<String> = labels
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}={v}")))
        .collect();
    or_none(&parts.join(","))
}

fn containers(out: &mut Out, level: usize, spec: &Value) {
    out.title(level, "Containers");
    for c in spec["containers"].as_array().into_iter().flatten() {
        out.title(level + 1, s(c, "/name"));
        out.kv(level + 2, "Image", s(c, "/image"));
        let ports: Vec<String> = c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}/{}",
                    p["containerPort"],
                    p["protocol"].as_str().unwrap_or("TCP")
                )
            })
            .collect();
        out.kv(level + 2, "Port", or_none(&ports.join(", ")));
        let env: Vec<String> = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| format!("{}={}", s(e, "/name"), s(e, "/value")))
            .collect();
        if env.is_empty() {
            out.kv(level + 2, "Environment", "<none>");
        } else {
            out.title(level + 2, "Environment");
            for e in env {
                out.raw(level + 3, e);
            }
        }
    }
}

fn conditions(out: &mut Out, obj: &Value) {
    let Some(conds) = obj.pointer("/status/conditions").and_then(Value::as_array) else {
        return;
    };
    out.title(0, "Conditions");
    out.raw(1, format!("{:<16}{:<8}{}", "Type", "Status", "Reason"));
    out.raw(1, format!("{:<16}{:<8}{}", "----", "------", "------"));
    for c in conds {
        out.raw(
            1,
            format!(
                "{:<16}{:<8}{}",
                s(c, "/type"),
                s(c, "/status"),
                or_none(s(c, "/reason"))
            ),
        );
    }
}

fn pod(out: &mut Out, obj: &Value) {
    out.kv(0, "Node", or_none(s(obj, "/spec/nodeName")));
    out.kv(0, "Status", or_none(s(obj, "/status/phase")));
    out.kv(0, "IP", or_none(s(obj, "/status/podIP")));
    containers(out, 0, &obj["spec"]);
    conditions(out, obj);
}

fn service(out: &mut Out, obj: &Value) {
    let spec = &obj["spec"];
    out.kv(0, "Selector", selector_string(spec.get("selector")));
    out.kv(0, "Type", s(spec, "/type"));
    out.kv(0, "IP", or_none(s(spec, "/clusterIP")));
    for p in spec["ports"].as_array().into_iter().flatten() {
        let name = or_none(s(p, "/name"));
        let proto = p["protocol"].as_str().unwrap_or("TCP");
        out.kv(0, "Port", format!("{name}  {}/{proto}", p["port"]));
        let target = match &p["targetPort"] {
            Value::String(t) => t.clone(),
            other => other.to_string(),
        };
        out.kv(0, "TargetPort", format!("{target}/{proto}"));
        if let Some(np) = p.get("nodePort") {
            out.kv(0, "NodePort", format!("{name}  {np}/{proto}"));
        }
    }
    out.kv(0, "Session Affinity", s(spec, "/sessionAffinity"));
}

fn workload(out: &mut Out, obj: &Value, kind: &str) {
    let spec = &obj["spec"];
    let status = &obj["status"];
    out.kv(0, "Selector", selector_string(spec.get("selector")));
    let n = |v: &Value| v.as_i64().unwrap_or(0);
    if kind == "Deployment" {
        out.kv(
            0,
            "Replicas",
            format!(
                "{} desired | {} updated | {} total | {} available | {} unavailable",
                n(&spec["replicas"]),
                n(&status["updatedReplicas"]),
                n(&status["replicas"]),
                n(&status["availableReplicas"]),
                n(&status["unavailableReplicas"])
            ),
        );
        out.kv(0, "StrategyType", s(spec, "/strategy/type"));
        out.kv(
            0,
            "MinReadySeconds",
            n(&spec["minReadySeconds"]).to_string(),
        );
        if let Some(r) = spec.pointer("/strategy/rollingUpdate") {
            let v = |k: &str| match &r[k] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.kv(
                0,
                "RollingUpdateStrategy",
                format!(
                    "{} max unavailable, {} max surge",
                    v("maxUnavailable"),
                    v("maxSurge")
                ),
            );
        }
    } else {
        out.kv(
            0,
            "Replicas",
            format!(
                "{} current / {} desired",
                n(&status["replicas"]),
                n(&spec["replicas"])
            ),
        );
    }
    out.title(0, "Pod Template");
    let labels: Vec<String> = spec
        .pointer("/template/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    out.kv(1, "Labels", or_none(&labels.join(",")));
    containers(
        out,
        1,
        spec.pointer("/template/spec").unwrap_or(&Value::Null),
    );
    conditions(out, obj);
}

async fn events(ctx: &Ctx, out: &mut Out, obj: &Value) {
    let ns = s(obj, "/metadata/namespace");
    let selector = format!(
        "involvedObject.name={},involvedObject.namespace={ns},involvedObject.uid={}",
        s(obj, "/metadata/name"),
        s(obj, "/metadata/uid")
    );
    let ns = if ns.is_empty() { "default" } else { ns };
    let u = format!(
        "/api/v1/namespaces/{}/events?fieldSelector={}",
        enc(ns),
        enc(&selector)
    );
    let items = ctx
        .get(&u)
        .await
        .ok()
        .and_then(|list| list["items"].as_array().cloned())
        .unwrap_or_default();
    if items.is_empty() {
        out.kv(0, "Events", "<none>");
        return;
    }
    out.title(0, "Events");
    let rows: Vec<[String; 5]> = items
        .iter()
        .map(|e| {
            let when = [
                s(e, "/lastTimestamp"),
                s(e, "/eventTime"),
                s(e, "/metadata/creationTimestamp"),
            ]
            .into_iter()
            .find(|t| !t.is_empty())
            .unwrap_or_default();
            let from = [s(e, "/source/component"), s(e, "/reportingComponent")]
                .into_iter()
                .find(|t| !t.is_empty())
                .unwrap_or_default();
            [
                s(e, "/type").into(),
                s(e, "/reason").into(),
                age(when),
                from.into(),
                s(e, "/message").into(),
            ]
        })
        .collect();
    let header = ["Type", "Reason", "Age", "From", "Message"];
    let widths: Vec<usize> = (0..5)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
                .max(header[i].len())
        })
        .collect();
    let line = |cells: [&str; 5]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 4 {
                    c.to_string()
                } else {
                    format!("{c:<w$}", w = widths[i] + 2)
                }
            })
            .collect::<String>()
    };
    out.raw(1, line(header));
    out.raw(1, line(["----", "------", "----", "----", "-------"]));
    for r in &rows {
        out.raw(1, line([&r[0], &r[1], &r[2], &r[3], &r[4]]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_align_per_level_and_empty_maps_say_none() {
        let mut out = Out::default();
        out.kv(0, "Name", "web");
        out.kv(0, "Namespace", "default");
        map_lines(&mut out, "Labels", Some(&json!({"a": "1", "b": "2"})), "=");
        map_lines(&mut out, "Annotations", Some(&json!({})), ": ");
        assert_eq!(
            out.render(),
            "Name:         web\nNamespace:    default\nLabels:       a=1\n              b=2\nAnnotations:  <none>\n"
        );
    }

    #[test]
    fn timestamps_and_ages_like_kubectl() {
        assert_eq!(
            timestamp("2026-11-22T05:39:11Z"),
            "Sun, 22 Nov 2026 05:39:11 +0000"
        );
        assert_eq!(timestamp(""), "<none>");
        let ago = |secs: i64| {
            let t = Timestamp::from_second(Timestamp::now().as_second() - secs).expect("valid");
            age(&t.to_string())
        };
        assert_eq!(ago(45), "45s");
        assert_eq!(ago(192), "3m12s");
        assert_eq!(ago(25 * 60), "25m");
        assert_eq!(ago(30 * 3600), "30h");
        assert_eq!(ago(12 * 86400), "12d");
    }
}
