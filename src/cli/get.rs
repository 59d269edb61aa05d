//! `weir get`: asks the server for a `meta.k8s.io/v1 Table` as kubectl does and prints its
//! columns (priority > 0 columns only with `-o wide`), or prints objects as YAML or JSON.

use serde_json::{Value, json};

use weir_api::{Resource, registry};

use super::{Ctx, TABLE_ACCEPT, Target, enc, kind_group, report, resource, url};

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    pub target: Target,
    /// Resource type (`pods`, `svc`, `deployments.apps`, …), or `type/name`.
    resource: String,
    /// Name of one object.
    name: Option<String>,
    /// List across all namespaces.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Label selector, e.g. `app=web,tier in (front,back)`.
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// Field selector, e.g. `spec.nodeName=node-1`.
    #[arg(long)]
    field_selector: Option<String>,
    /// Output format: wide, yaml or json (default: a table).
    #[arg(short = 'o', long, value_parser = ["wide", "yaml", "json"])]
    output: Option<String>,
}

pub async fn get(ctx: &Ctx, args: GetArgs) -> anyhow::Result<usize> {
    if args.resource == "all" {
        let all = registry::all()
            .iter()
            .filter(|r| r.categories.contains(&"all"));
        return get_many(ctx, &args, all.collect()).await;
    }
    if args.resource.contains(',') && args.name.is_none() {
        let many = args
            .resource
            .split(',')
            .map(resource)
            .collect::<Result<_, _>>()?;
        return get_many(ctx, &args, many).await;
    }
    let (res, name) = match (args.resource.split_once('/'), &args.name) {
        (Some((kind, name)), None) => (resource(kind)?, Some(name.to_string())),
        _ => (resource(&args.resource)?, args.name.clone()),
    };
    let namespace = (!args.all_namespaces || name.is_some()).then_some(ctx.namespace.as_str());
    let u = url(res, namespace, name.as_deref(), None) + &query(&args);
    let output = args.output.as_deref();
    let table = !matches!(output, Some("yaml" | "json"));
    let accept = if table {
        TABLE_ACCEPT
    } else {
        "application/json"
    };
    let body = match ctx.request(http::Method::GET, &u, None, accept).await {
        Ok(body) => body,
        Err(e) => {
            report(&e);
            return Ok(1);
        }
    };
    if !table {
        let doc = if name.is_some() {
            body
        } else {
            as_list(body, &res.api_version(), res.kind)
        };
        let text = if output == Some("json") {
            serde_json::to_string_pretty(&doc)? + "\n"
        } else {
            serde_yaml::to_string(&doc)?
        };
        print!("{text}");
        return Ok(0);
    }
    let with_ns = args.all_namespaces && res.namespaced && name.is_none();
    let rows = body["rows"].as_array().map_or(0, Vec::len);
    if rows == 0 && name.is_none() {
        match namespace {
            Some(ns) if res.namespaced => eprintln!("No resources found in {ns} namespace."),
            _ => eprintln!("No resources found"),
        }
        return Ok(0);
    }
    print!("{}", render_table(&body, output == Some("wide"), with_ns));
    Ok(0)
}

/// `?labelSelector=…&fieldSelector=…`, or nothing.
fn query(args: &GetArgs) -> String {
    let mut query = Vec::new();
    if let Some(sel) = &args.selector {
        query.push(format!("labelSelector={}", enc(sel)));
    }
    if let Some(sel) = &args.field_selector {
        query.push(format!("fieldSelector={}", enc(sel)));
    }
    if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    }
}

/// `get all` and `get svc,deploy`: one table per type that has objects, names prefixed
/// with the type (`deployment.apps/web`), as kubectl prints them.
async fn get_many(
    ctx: &Ctx,
    args: &GetArgs,
    resources: Vec<&'static Resource>,
) -> anyhow::Result<usize> {
    if matches!(args.output.as_deref(), Some("yaml" | "json")) {
        anyhow::bail!("-o yaml|json needs a single resource type");
    }
    let namespace = (!args.all_namespaces).then_some(ctx.namespace.as_str());
    let mut tables = Vec::new();
    for res in resources {
        let u = url(res, namespace, None, None) + &query(args);
        let mut table = match ctx.request(http::Method::GET, &u, None, TABLE_ACCEPT).await {
            Ok(t) => t,
            Err(e) => {
                report(&e);
                return Ok(1);
            }
        };
        let prefix = kind_group(res);
        let rows = table["rows"]
            .as_array_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        if rows.is_empty() {
            continue;
        }
        table["rows"] = rows
            .into_iter()
            .map(|mut row| {
                if let Some(Value::String(name)) = row.pointer_mut("/cells/0") {
                    *name = format!("{prefix}/{name}");
                }
                row
            })
            .collect();
        tables.push(render_table(
            &table,
            args.output.as_deref() == Some("wide"),
            args.all_namespaces,
        ));
    }
    if tables.is_empty() {
        match namespace {
            Some(ns) => eprintln!("No resources found in {ns} namespace."),
            None => eprintln!("No resources found"),
        }
    }
    print!("{}", tables.join("\n"));
    Ok(0)
}

/// A typed list as kubectl prints it: `kind: List` with each item's apiVersion/kind set.
fn as_list(list: Value, api_version: &str, kind: &str) -> Value {
    let items: Vec<Value> = list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut item| {
            item["apiVersion"] = json!(api_version);
            item["kind"] = json!(kind);
            item
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}})
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "<none>".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Aligned columns with three spaces between them, upper-case headers, as kubectl prints.
fn render_table(table: &Value, wide: bool, with_namespace: bool) -> String {
    let defs = table["columnDefinitions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let shown: Vec<usize> = defs
        .iter()
        .enumerate()
        .filter(|(_, d)| wide || d["priority"].as_i64().unwrap_or(0) == 0)
        .map(|(i, _)| i)
        .collect();
    let mut lines: Vec<Vec<String>> = Vec::new();
    let mut header: Vec<String> = shown
        .iter()
        .map(|&i| defs[i]["name"].as_str().unwrap_or_default().to_uppercase())
        .collect();
    if with_namespace {
        header.insert(0, "NAMESPACE".into());
    }
    lines.push(header);
    for row in table["rows"].as_array().into_iter().flatten() {
        let cells = row["cells"].as_array().cloned().unwrap_or_default();
        let mut line: Vec<String> = shown
            .iter()
            .map(|&i| cells.get(i).map(cell).unwrap_or_default())
            .collect();
        if with_namespace {
            let ns = row["object"]["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default();
            line.insert(0, ns.to_string());
        }
        lines.push(line);
    }
    let columns = lines.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .map(|l| l.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (c, value) in line.iter().enumerate() {
            if c + 1 == line.len() {
                text.push_str(value);
            } else {
                let pad = widths[c] + 3 - value.chars().count();
                text.push_str(value);
                text.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Value {
        json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
               "columnDefinitions": [
                   {"name": "Name", "type": "string", "priority": 0},
                   {"name": "Type", "type": "string", "priority": 0},
                   {"name": "Selector", "type": "string", "priority": 1}],
               "rows": [
                   {"cells": ["kubernetes", "ClusterIP", null], "object": {"metadata": {"namespace": "default"}}},
                   {"cells": ["web-frontend", "NodePort", "app=web"], "object": {"metadata": {"namespace": "shop"}}}]})
    }

    #[test]
    fn tables_print_like_kubectl() {
        assert_eq!(
            render_table(&table(), false, false),
            "NAME           TYPE\nkubernetes     ClusterIP\nweb-frontend   NodePort\n"
        );
        assert_eq!(
            render_table(&table(), true, true),
            "NAMESPACE   NAME           TYPE        SELECTOR\ndefault     kubernetes     ClusterIP   <none>\nshop        web-frontend   NodePort    app=web\n"
        );
    }

    #[test]
    fn lists_get_item_type_meta() {
        let list = as_list(
            json!({"kind": "ServiceList", "items": [{"metadata": {"name": "a"}}]}),
            "v1",
            "Service",
        );
        assert_eq!(list["kind"], "List");
        assert_eq!(list["items"][0]["kind"], "Service");
        assert_eq!(list["items"][0]["apiVersion"], "v1");
    }
}
