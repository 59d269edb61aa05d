//! The built-in client: `weir apply|get|delete|describe|scale`, a kubectl subset over the
//! Kubernetes API with kube-rs, so a weir cluster is usable without kubectl. Output follows
//! kubectl's (`deployment.apps/web created`, `Error from server (NotFound): …`).

mod apply;
mod describe;
mod get;
mod manifest;

use std::path::PathBuf;

use anyhow::Context;
use http::{Method, Request};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;
use weir_api::{Resource, registry};

/// Connection and namespace flags every client command takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Target {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the request (default: the kubeconfig context's, else `default`).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {
    /// Create or update objects from files, directories or stdin (`-f -`), like `kubectl apply`.
    Apply(apply::ApplyArgs),
    /// List objects or show one, as a table or as YAML/JSON.
    Get(get::GetArgs),
    /// Delete objects by name or as listed in files.
    Delete(DeleteArgs),
    /// Show one object in detail, with its events.
    Describe(describe::DescribeArgs),
    /// Set the replica count of a Deployment or ReplicaSet through its `scale` subresource.
    Scale(ScaleArgs),
}

#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    target: Target,
    /// Files or directories with the objects to delete (`-` for stdin).
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// Resource type and name, e.g. `deployment web` or `deployment/web`.
    args: Vec<String>,
    /// Do not report objects that do not exist.
    #[arg(long)]
    ignore_not_found: bool,
    /// Wait until the objects are gone (finalizers done) before returning.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    wait: bool,
    /// How long to wait for deletion, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct ScaleArgs {
    #[command(flatten)]
    target: Target,
    /// `deployment/web`, or `deployment web`.
    args: Vec<String>,
    /// The new number of replicas.
    #[arg(long)]
    replicas: u32,
}

/// Runs one client command. `kubeconfig` is used when the command has no `--kubeconfig`.
/// Failures are printed the way kubectl prints them and the process exits with status 1;
/// an error is returned only when no connection could be set up.
pub async fn run(cmd: ClientCommand, kubeconfig: Option<PathBuf>) -> anyhow::Result<()> {
    let target = match &cmd {
        ClientCommand::Apply(a) => &a.target,
        ClientCommand::Get(a) => &a.target,
        ClientCommand::Delete(a) => &a.target,
        ClientCommand::Describe(a) => &a.target,
        ClientCommand::Scale(a) => &a.target,
    };
    let ctx = Ctx::connect(target, kubeconfig).await?;
    let outcome = match cmd {
        ClientCommand::Apply(args) => apply::apply(&ctx, args).await,
        ClientCommand::Get(args) => get::get(&ctx, args).await,
        ClientCommand::Delete(args) => delete(&ctx, args).await,
        ClientCommand::Describe(args) => describe::describe(&ctx, args).await,
        ClientCommand::Scale(args) => scale(&ctx, args).await,
    };
    match outcome {
        Ok(0) => Ok(()),
        // Each failure was reported as kubectl reports it; only the exit status is left.
        Ok(_) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1)
        }
    }
}

/// A connected client plus the namespace requests default to.
pub(crate) struct Ctx {
    client: kube::Client,
    namespace: String,
    /// Whether `-n` was given, so objects naming another namespace are an error.
    namespace_flag: bool,
}

/// `application/json` Accept plus the server-side Table kubectl asks for.
const TABLE_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

impl Ctx {
    async fn connect(target: &Target, kubeconfig: Option<PathBuf>) -> anyhow::Result<Self> {
        let config = match target.kubeconfig.clone().or(kubeconfig) {
            Some(path) => {
                let kc = Kubeconfig::read_from(&path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("loading kubeconfig {}", path.display()))?
            }
            None => kube::Config::infer()
                .await
                .context("no kubeconfig found: pass --kubeconfig or set $KUBECONFIG")?,
        };
        let default_ns = config.default_namespace.clone();
        let client = kube::Client::try_from(config).context("building the API client")?;
        Ok(Self {
            client,
            namespace: target.namespace.clone().unwrap_or(default_ns),
            namespace_flag: target.namespace.is_some(),
        })
    }

    /// Sends one request; a JSON body is sent with `content_type`.
    async fn request(
        &self,
        method: Method,
        url: &str,
        body: Option<(&Value, &str)>,
        accept: &str,
    ) -> Result<Value, kube::Error> {
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .header(http::header::ACCEPT, accept);
        let bytes = match body {
            Some((value, content_type)) => {
                req = req.header(http::header::CONTENT_TYPE, content_type);
                serde_json::to_vec(value).map_err(kube::Error::SerdeError)?
            }
            None => Vec::new(),
        };
        let req = req.body(bytes).map_err(kube::Error::HttpError)?;
        let text = self.client.request_text(req).await?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(kube::Error::SerdeError)
    }

    async fn get(&self, url: &str) -> Result<Value, kube::Error> {
        self.request(Method::GET, url, None, "application/json")
            .await
    }
}

/// Percent-encodes a path segment or query value.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URL of a collection (`name` None) or object, optionally a subresource.
fn url(res: &Resource, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>) -> String {
    let mut u = if res.group.is_empty() {
        format!("/api/{}", res.version)
    } else {
        format!("/apis/{}/{}", res.group, res.version)
    };
    if let (true, Some(ns)) = (res.namespaced, namespace) {
        u.push_str(&format!("/namespaces/{}", enc(ns)));
    }
    u.push('/');
    u.push_str(res.plural);
    for part in [name, sub].into_iter().flatten() {
        u.push('/');
        u.push_str(&enc(part));
    }
    u
}

/// `deployment.apps` or `service`: how kubectl names a resource in its messages.
fn kind_group(res: &Resource) -> String {
    let kind = res.kind.to_ascii_lowercase();
    if res.group.is_empty() {
        kind
    } else {
        format!("{kind}.{}", res.group)
    }
}

/// The resource a user means, or the error kubectl prints for an unknown one.
fn resource(name: &str) -> anyhow::Result<&'static Resource> {
    registry::find_by_name(name)
        .ok_or_else(|| anyhow::anyhow!("the server doesn't have a resource type \"{name}\""))
}

/// Splits `kind/name` or `kind name` arguments into a resource and a name.
fn resource_and_name(args: &[String]) -> anyhow::Result<(&'static Resource, String)> {
    match args {
        [one] if one.contains('/') => {
            let (kind, name) = one.split_once('/').unwrap_or_default();
            Ok((resource(kind)?, name.to_string()))
        }
        [kind, name] => Ok((resource(kind)?, name.clone())),
        _ => anyhow::bail!("expected <resource>/<name> or <resource> <name>"),
    }
}

/// Prints an API error like kubectl: `Error from server (NotFound): pods "x" not found`,
/// and validation errors as `The Service "x" is invalid: <field>: <problem>` (one bullet per
/// cause when there are several).
fn report(err: &kube::Error) {
    match err {
        kube::Error::Api(status)
            if status.reason == "Invalid"
                && status
                    .details
                    .as_ref()
                    .is_some_and(|d| !d.causes.is_empty()) =>
        {
            let details = status
                .details
                .as_ref()
                .map(|d| (d.kind.as_str(), d.name.as_str(), &d.causes));
            if let Some((kind, name, causes)) = details {
                let lines: Vec<String> = causes
                    .iter()
                    .map(|c| {
                        if c.field.is_empty() {
                            c.message.clone()
                        } else {
                            format!("{}: {}", c.field, c.message)
                        }
                    })
                    .collect();
                if let [one] = lines.as_slice() {
                    eprintln!("The {kind} {name:?} is invalid: {one}");
                } else {
                    eprintln!("The {kind} {name:?} is invalid: ");
                    for line in lines {
                        eprintln!("* {line}");
                    }
                }
            }
        }
        kube::Error::Api(status) => {
            let reason = if status.reason.is_empty() {
                "Unknown"
            } else {
                status.reason.as_str()
            };
            eprintln!("Error from server ({reason}): {}", status.message);
        }
        other => eprintln!("error: {other}"),
    }
}

fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == 404)
}

async fn delete(ctx: &Ctx, args: DeleteArgs) -> anyhow::Result<usize> {
    let mut targets = Vec::new();
    if !args.files.is_empty() {
        for m in manifest::load(&args.files)? {
            let (res, ns, name) = m.locate(ctx)?;
            targets.push((res, ns, name));
        }
    } else {
        let (res, name) = resource_and_name(&args.args)?;
        targets.push((res, ctx.namespace.clone(), name));
    }
    let mut failures = 0;
    let mut deleted = Vec::new();
    for (res, ns, name) in targets {
        let u = url(res, Some(&ns), Some(&name), None);
        match ctx
            .request(Method::DELETE, &u, None, "application/json")
            .await
        {
            Ok(_) => {
                println!("{} {name:?} deleted", kind_group(res));
                deleted.push((res, u, name));
            }
            Err(e) if is_not_found(&e) && args.ignore_not_found => {}
            Err(e) => {
                report(&e);
                failures += 1;
            }
        }
    }
    if args.wait {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(args.timeout);
        for (res, u, name) in deleted {
            loop {
                match ctx.get(&u).await {
                    Err(e) if is_not_found(&e) => break,
                    _ if tokio::time::Instant::now() >= deadline => {
                        eprintln!(
                            "error: timed out waiting for the condition on {}/{name}",
                            res.plural
                        );
                        failures += 1;
                        break;
                    }
                    _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
                }
            }
        }
    }
    Ok(failures)
}

async fn scale(ctx: &Ctx, args: ScaleArgs) -> anyhow::Result<usize> {
    let (res, name) = resource_and_name(&args.args)?;
    if !res.has_subresource("scale") {
        anyhow::bail!(
            "{} cannot be scaled: it has no scale subresource",
            res.plural
        );
    }
    let u = url(res, Some(&ctx.namespace), Some(&name), Some("scale"));
    let patch = serde_json::json!({"spec": {"replicas": args.replicas}});
    let body = (&patch, "application/merge-patch+json");
    match ctx
        .request(Method::PATCH, &u, Some(body), "application/json")
        .await
    {
        Ok(_) => {
            println!("{}/{name} scaled", kind_group(res));
            Ok(0)
        }
        Err(e) => {
            report(&e);
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_names_follow_kubernetes_paths() {
        let deploy = resource("deploy").expect("deploy");
        assert_eq!(
            url(deploy, Some("default"), Some("web"), Some("scale")),
            "/apis/apps/v1/namespaces/default/deployments/web/scale"
        );
        let nodes = resource("nodes").expect("nodes");
        assert_eq!(url(nodes, Some("default"), None, None), "/api/v1/nodes");
        let pods = resource("po").expect("pods");
        assert_eq!(url(pods, None, None, None), "/api/v1/pods");
        assert_eq!(kind_group(deploy), "deployment.apps");
        assert_eq!(kind_group(pods), "pod");
        assert_eq!(enc("app in (a,b)"), "app%20in%20%28a%2Cb%29");
        let (res, name) = resource_and_name(&["deploy/web".into()]).expect("split");
        assert_eq!((res.kind, name.as_str()), ("Deployment", "web"));
        assert!(resource("widgets").is_err());
    }
}
