//! Reading manifests for `apply -f` and `delete -f`: files, directories (their `.yaml`,
//! `.yml` and `.json` files, sorted) or stdin, each holding one or more YAML documents or
//! `List` objects.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;
use weir_api::{Resource, registry};

use super::Ctx;

/// One object from a manifest and where it came from.
pub struct Manifest {
    pub source: String,
    pub obj: Value,
}

impl Manifest {
    /// The object's resource, namespace (its own, else the default) and name.
    pub fn locate(&self, ctx: &Ctx) -> anyhow::Result<(&'static Resource, String, String)> {
        let api_version = self.obj["apiVersion"].as_str().unwrap_or_default();
        let kind = self.obj["kind"].as_str().unwrap_or_default();
        let name = self.obj["metadata"]["name"].as_str().unwrap_or_default();
        let res = registry::find_kind(api_version, kind).ok_or_else(|| {
            anyhow::anyhow!(
                "resource mapping not found for name: {name:?} namespace: {:?} from {:?}: no matches for kind {kind:?} in version {api_version:?}",
                self.obj["metadata"]["namespace"].as_str().unwrap_or_default(),
                self.source
            )
        })?;
        if name.is_empty() {
            anyhow::bail!(
                "error validating {:?}: metadata.name is required for {kind}",
                self.source
            );
        }
        let namespace = match self.obj["metadata"]["namespace"].as_str() {
            Some(ns) if ctx.namespace_flag && ns != ctx.namespace => anyhow::bail!(
                "the namespace from the provided object {ns:?} does not match the namespace {:?}. You must pass '--namespace={ns}' to perform this operation.",
                ctx.namespace
            ),
            Some(ns) if !ns.is_empty() => ns.to_string(),
            _ => ctx.namespace.clone(),
        };
        Ok((res, namespace, name.to_string()))
    }
}

/// Reads every object from `paths` in order.
pub fn load(paths: &[PathBuf]) -> anyhow::Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading manifests from stdin")?;
            parse(&text, "STDIN", &mut out)?;
        } else if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading directory {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                })
                .collect();
            files.sort();
            for file in files {
                read_file(&file, &mut out)?;
            }
        } else {
            read_file(path, &mut out)?;
        }
    }
    if out.is_empty() {
        anyhow::bail!("no objects passed to apply");
    }
    Ok(out)
}

fn read_file(path: &Path, out: &mut Vec<Manifest>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("the path {:?} does not exist or is unreadable", path))?;
    parse(&text, &path.display().to_string(), out)
}

/// Parses every YAML document in `text` (JSON is YAML too); empty documents are skipped and
/// `List` objects contribute their items.
fn parse(text: &str, source: &str, out: &mut Vec<Manifest>) -> anyhow::Result<()> {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc)
            .with_context(|| format!("error parsing {source} (document {}):", i + 1))?;
        push(value, source, out)?;
    }
    Ok(())
}

fn push(value: Value, source: &str, out: &mut Vec<Manifest>) -> anyhow::Result<()> {
    match value {
        Value::Null => Ok(()),
        Value::Object(ref map)
            if map
                .get("kind")
                .and_then(Value::as_str)
                .is_some_and(|k| k.ends_with("List"))
                && map.contains_key("items") =>
        {
            let items = map
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in items {
                push(item, source, out)?;
            }
            Ok(())
        }
        Value::Object(ref map) if map.contains_key("kind") && map.contains_key("apiVersion") => {
            out.push(Manifest {
                source: source.to_string(),
                obj: value,
            });
            Ok(())
        }
        _ => anyhow::bail!("error validating {source:?}: an object needs apiVersion and kind"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_lists_and_empty_documents() {
        let text = "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\n# only a comment\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata:\n    name: c\n";
        let mut out = Vec::new();
        parse(text, "m.yaml", &mut out).expect("parses");
        let kinds: Vec<&str> = out.iter().filter_map(|m| m.obj["kind"].as_str()).collect();
        assert_eq!(kinds, ["Namespace", "ConfigMap"]);
    }

    #[test]
    fn malformed_yaml_names_the_file_and_position() {
        let mut out = Vec::new();
        let err = parse("kind: v1\n  bad: [\n", "m.yaml", &mut out).expect_err("bad yaml");
        let msg = format!("{err:#}");
        assert!(msg.contains("m.yaml"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        let err = parse("name: x\n", "m.yaml", &mut out).expect_err("no kind");
        assert!(err.to_string().contains("needs apiVersion and kind"));
    }

    #[test]
    fn directories_are_read_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("b.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("a.json"),
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"}}"#,
        )
        .expect("write");
        std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
        let out = load(&[dir.path().to_path_buf()]).expect("loads");
        let names: Vec<&str> = out
            .iter()
            .filter_map(|m| m.obj["metadata"]["name"].as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(load(&[dir.path().join("missing.yaml")]).is_err());
    }
}
