//! Kubeconfig files for the cluster's admin: a standalone one in the data dir, and a
//! `weir` cluster/user/context merged into the user's `~/.kube/config` (made current), as
//! `kind` does, so plain `kubectl` works right after `weir up`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_yaml::{Mapping, Value};

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a kubeconfig: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: {what} is not a list")]
    Shape { path: PathBuf, what: &'static str },
}

/// The cluster, user and context one kubeconfig entry names.
pub struct Entry<'a> {
    /// Name of the cluster and the context (`weir`).
    pub name: &'a str,
    pub user: &'a str,
    pub server: &'a str,
    pub ca_pem: &'a str,
    pub token: &'a str,
}

fn yaml(s: &str) -> Value {
    Value::String(s.to_string())
}

fn named(name: &str, key: &str, body: Mapping) -> Value {
    let mut m = Mapping::new();
    m.insert(yaml("name"), yaml(name));
    m.insert(yaml(key), Value::Mapping(body));
    Value::Mapping(m)
}

impl Entry<'_> {
    fn cluster(&self) -> Value {
        let mut c = Mapping::new();
        c.insert(yaml("server"), yaml(self.server));
        c.insert(
            yaml("certificate-authority-data"),
            yaml(&base64::engine::general_purpose::STANDARD.encode(self.ca_pem)),
        );
        named(self.name, "cluster", c)
    }

    fn user_entry(&self) -> Value {
        let mut u = Mapping::new();
        u.insert(yaml("token"), yaml(self.token));
        named(self.user, "user", u)
    }

    fn context(&self) -> Value {
        let mut c = Mapping::new();
        c.insert(yaml("cluster"), yaml(self.name));
        c.insert(yaml("user"), yaml(self.user));
        named(self.name, "context", c)
    }
}

fn empty_config() -> Mapping {
    let mut m = Mapping::new();
    m.insert(yaml("apiVersion"), yaml("v1"));
    m.insert(yaml("kind"), yaml("Config"));
    m.insert(yaml("preferences"), Value::Mapping(Mapping::new()));
    for list in ["clusters", "users", "contexts"] {
        m.insert(yaml(list), Value::Sequence(Vec::new()));
    }
    m
}

/// Insert `item` into the list `key` of `config`, replacing an item of the same name.
fn upsert(
    config: &mut Mapping,
    key: &'static str,
    item: Value,
    path: &Path,
) -> Result<(), KubeconfigError> {
    let list = config
        .entry(yaml(key))
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if list.is_null() {
        *list = Value::Sequence(Vec::new());
    }
    let Value::Sequence(items) = list else {
        return Err(KubeconfigError::Shape {
            path: path.to_path_buf(),
            what: key,
        });
    };
    let name = item.get("name").cloned();
    match items.iter_mut().find(|i| i.get("name") == name.as_ref()) {
        Some(existing) => *existing = item,
        None => items.push(item),
    }
    Ok(())
}

fn write_private(path: &Path, text: &str) -> Result<(), KubeconfigError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| KubeconfigError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("weir-tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)
}

/// Write a kubeconfig holding only `entry` to `path`.
pub fn write(path: &Path, entry: &Entry<'_>) -> Result<(), KubeconfigError> {
    let mut config = empty_config();
    merge(&mut config, entry, path)?;
    write_private(path, &render(&config))
}

/// Merge `entry` into the kubeconfig at `path` (created if missing) and make it the
/// current context. Other clusters, users and contexts are kept.
pub fn merge_into(path: &Path, entry: &Entry<'_>) -> Result<(), KubeconfigError> {
    let mut config = match fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => empty_config(),
        Ok(text) => match serde_yaml::from_str::<Value>(&text) {
            Ok(Value::Mapping(m)) => m,
            Ok(_) => {
                return Err(KubeconfigError::Shape {
                    path: path.to_path_buf(),
                    what: "the document",
                });
            }
            Err(source) => {
                return Err(KubeconfigError::Parse {
                    path: path.to_path_buf(),
                    source,
                });
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => empty_config(),
        Err(source) => {
            return Err(KubeconfigError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    merge(&mut config, entry, path)?;
    write_private(path, &render(&config))
}

fn merge(config: &mut Mapping, entry: &Entry<'_>, path: &Path) -> Result<(), KubeconfigError> {
    upsert(config, "clusters", entry.cluster(), path)?;
    upsert(config, "users", entry.user_entry(), path)?;
    upsert(config, "contexts", entry.context(), path)?;
    config.insert(yaml("current-context"), yaml(entry.name));
    Ok(())
}

fn render(config: &Mapping) -> String {
    serde_yaml::to_string(config).unwrap_or_default()
}

/// `$KUBECONFIG`'s first entry, else `~/.kube/config`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(first) = std::env::var_os("KUBECONFIG")
        .and_then(|v| std::env::split_paths(&v).find(|p| !p.as_os_str().is_empty()))
    {
        return Some(first);
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube").join("config"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(server: &'a str) -> Entry<'a> {
        Entry {
            name: "weir",
            user: "weir-admin",
            server,
            ca_pem: "PEM",
            token: "t0k",
        }
    }

    #[test]
    fn merging_keeps_other_clusters_and_replaces_ours() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config");
        fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: other\n  cluster: {server: https://x}\nusers: []\ncontexts:\n- name: other\n  context: {cluster: other, user: u}\ncurrent-context: other\n",
        )
        .expect("seed");
        merge_into(&path, &entry("https://127.0.0.1:1")).expect("merge");
        merge_into(&path, &entry("https://127.0.0.1:2")).expect("merge again");
        let v: Value =
            serde_yaml::from_str(&fs::read_to_string(&path).expect("read")).expect("yaml");
        assert_eq!(v["current-context"], yaml("weir"));
        let clusters = v["clusters"].as_sequence().expect("clusters");
        assert_eq!(clusters.len(), 2);
        assert_eq!(
            clusters[1]["cluster"]["server"],
            yaml("https://127.0.0.1:2")
        );
        assert_eq!(v["users"][0]["user"]["token"], yaml("t0k"));
        assert_eq!(v["contexts"].as_sequence().map(Vec::len), Some(2));
    }

    #[test]
    fn a_missing_file_is_created_and_garbage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/config");
        merge_into(&path, &entry("https://h")).expect("create");
        assert!(
            fs::read_to_string(&path)
                .expect("read")
                .contains("current-context: weir")
        );
        let bad = dir.path().join("bad");
        fs::write(&bad, "clusters: [\n").expect("seed");
        assert!(matches!(
            merge_into(&bad, &entry("https://h")),
            Err(KubeconfigError::Parse { .. })
        ));
        write(&dir.path().join("kc"), &entry("https://h")).expect("write");
    }
}
