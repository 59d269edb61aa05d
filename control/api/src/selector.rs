//! Label and field selectors: parsed from the `labelSelector` / `fieldSelector` query strings
//! kubectl sends (`-l`, `--field-selector`), or built from a `metav1.LabelSelector` in an
//! object, and matched against objects as JSON.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::names;
use crate::registry::Resource;
use crate::status::{ApiError, Cause};

/// How one label requirement compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Equals,
    NotEquals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    GreaterThan,
    LessThan,
}

/// One term of a label selector, e.g. `tier in (web,api)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: BTreeSet<String>,
}

impl Requirement {
    fn matches(&self, labels: Option<&Value>) -> bool {
        let value = labels
            .and_then(|l| l.get(&self.key))
            .and_then(Value::as_str);
        match (self.op, value) {
            (Op::Exists, v) => v.is_some(),
            (Op::DoesNotExist, v) => v.is_none(),
            (Op::Equals | Op::In, Some(v)) => self.values.contains(v),
            (Op::NotEquals | Op::NotIn, Some(v)) => !self.values.contains(v),
            (Op::NotEquals | Op::NotIn, None) => true,
            (Op::GreaterThan | Op::LessThan, Some(v)) => {
                let (Ok(have), Some(Ok(want))) = (
                    v.parse::<i64>(),
                    self.values.iter().next().map(|w| w.parse::<i64>()),
                ) else {
                    return false;
                };
                if self.op == Op::GreaterThan {
                    have > want
                } else {
                    have < want
                }
            }
            (Op::Equals | Op::In | Op::GreaterThan | Op::LessThan, None) => false,
        }
    }
}

/// A label selector: all requirements must hold. Empty selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    In,
    NotIn,
    Open,
    Close,
    Comma,
    End,
}

impl Token {
    fn show(&self) -> String {
        match self {
            Token::Ident(s) => s.clone(),
            Token::Not => "!".into(),
            Token::Eq => "=".into(),
            Token::DoubleEq => "==".into(),
            Token::NotEq => "!=".into(),
            Token::Gt => ">".into(),
            Token::Lt => "<".into(),
            Token::In => "in".into(),
            Token::NotIn => "notin".into(),
            Token::Open => "(".into(),
            Token::Close => ")".into(),
            Token::Comma => ",".into(),
            Token::End => "EOS".into(),
        }
    }
}

fn is_special(c: char) -> bool {
    matches!(c, '!' | '=' | '(' | ')' | ',' | '<' | '>')
}

fn lex(input: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            '!' if chars.peek() == Some(&'=') => {
                chars.next();
                Token::NotEq
            }
            '!' => Token::Not,
            '=' if chars.peek() == Some(&'=') => {
                chars.next();
                Token::DoubleEq
            }
            '=' => Token::Eq,
            '(' => Token::Open,
            ')' => Token::Close,
            ',' => Token::Comma,
            '>' => Token::Gt,
            '<' => Token::Lt,
            c => {
                let mut word = c.to_string();
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || is_special(n) {
                        break;
                    }
                    word.push(n);
                    chars.next();
                }
                match word.as_str() {
                    "in" => Token::In,
                    "notin" => Token::NotIn,
                    _ => Token::Ident(word),
                }
            }
        };
        tokens.push(token);
    }
    tokens.push(Token::End);
    tokens
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        self.tokens.get(self.pos).unwrap_or(&Token::End)
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        self.pos += 1;
        t
    }

    fn expect_ident(&mut self, what: &str) -> Result<String, String> {
        match self.next() {
            Token::Ident(s) => Ok(s),
            // `in`/`notin` are valid keys and values when they stand where an identifier goes.
            Token::In => Ok("in".into()),
            Token::NotIn => Ok("notin".into()),
            t => Err(format!("found '{}', expected: {what}", t.show())),
        }
    }

    fn requirement(&mut self) -> Result<Requirement, String> {
        if *self.peek() == Token::Not {
            self.next();
            let key = self.expect_ident("identifier after '!'")?;
            return Requirement::new(key, Op::DoesNotExist, BTreeSet::new());
        }
        let key = self.expect_ident("identifier")?;
        let op = match self.peek() {
            Token::Comma | Token::End => {
                return Requirement::new(key, Op::Exists, BTreeSet::new());
            }
            Token::Eq | Token::DoubleEq => Op::Equals,
            Token::NotEq => Op::NotEquals,
            Token::In => Op::In,
            Token::NotIn => Op::NotIn,
            Token::Gt => Op::GreaterThan,
            Token::Lt => Op::LessThan,
            t => {
                return Err(format!(
                    "found '{}', expected: '=', '!=', '==', 'in', notin'",
                    t.show()
                ));
            }
        };
        self.next();
        let values = match op {
            Op::In | Op::NotIn => self.value_set()?,
            _ => {
                // `key=` compares with the empty value.
                let value = match self.peek() {
                    Token::Comma | Token::End => String::new(),
                    _ => self.expect_ident("identifier")?,
                };
                BTreeSet::from([value])
            }
        };
        Requirement::new(key, op, values)
    }

    fn value_set(&mut self) -> Result<BTreeSet<String>, String> {
        match self.next() {
            Token::Open => {}
            t => return Err(format!("found '{}', expected: '('", t.show())),
        }
        let mut values = BTreeSet::new();
        if *self.peek() == Token::Close {
            self.next();
            return Ok(values);
        }
        loop {
            values.insert(self.expect_ident("identifier")?);
            match self.next() {
                Token::Comma => {}
                Token::Close => return Ok(values),
                t => return Err(format!("found '{}', expected: ',' or ')'", t.show())),
            }
        }
    }
}

impl Requirement {
    /// Checks key and values the way `labels.NewRequirement` does.
    fn new(key: String, op: Op, values: BTreeSet<String>) -> Result<Self, String> {
        if let Some(e) = names::qualified_name(&key).first() {
            return Err(format!("key: Invalid value: {key:?}: {e}"));
        }
        match op {
            Op::In | Op::NotIn if values.is_empty() => {
                return Err(
                    "values: Invalid value: []: for 'in', 'notin' operators, values set can't be empty"
                        .into(),
                );
            }
            Op::Exists | Op::DoesNotExist if !values.is_empty() => {
                return Err(
                    "values: Invalid value: values set must be empty for exists and does not exist"
                        .into(),
                );
            }
            Op::GreaterThan | Op::LessThan => {
                if let Some(v) = values.iter().find(|v| v.parse::<i64>().is_err()) {
                    return Err(format!(
                        "values[0]: Invalid value: {v:?}: for 'Gt', 'Lt' operators, the value must be an integer"
                    ));
                }
            }
            _ => {}
        }
        for (i, v) in values.iter().enumerate() {
            if let Some(e) = names::label_value(v).first() {
                return Err(format!("values[{i}][{key}]: Invalid value: {v:?}: {e}"));
            }
        }
        Ok(Self { key, op, values })
    }
}

impl LabelSelector {
    /// Everything matches.
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Parses the `labelSelector` query parameter (`a=b,c!=d,e in (f,g),!h`). A malformed
    /// selector is a 400 naming the problem.
    pub fn parse(input: &str) -> Result<Self, ApiError> {
        let mut parser = Parser {
            tokens: lex(input),
            pos: 0,
        };
        let mut requirements = Vec::new();
        if *parser.peek() == Token::End {
            return Ok(Self::default());
        }
        loop {
            let req = parser.requirement().map_err(|e| {
                ApiError::bad_request(format!(
                    "unable to parse requirement: {e} (label selector {input:?})"
                ))
            })?;
            requirements.push(req);
            match parser.next() {
                Token::Comma => {}
                Token::End => return Ok(Self { requirements }),
                t => {
                    return Err(ApiError::bad_request(format!(
                        "unable to parse requirement: found '{}', expected: ',' or 'end of string' (label selector {input:?})",
                        t.show()
                    )));
                }
            }
        }
    }

    /// Builds a selector from a `metav1.LabelSelector` (`matchLabels` and `matchExpressions`)
    /// as controllers and validation need it. `path` prefixes the field paths of the causes.
    pub fn from_label_selector(selector: &Value, path: &str) -> Result<Self, Vec<Cause>> {
        let mut requirements = Vec::new();
        let mut causes = Vec::new();
        if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
            for (key, value) in labels {
                let value = value.as_str().unwrap_or_default();
                match Requirement::new(key.clone(), Op::Equals, BTreeSet::from([value.into()])) {
                    Ok(r) => requirements.push(r),
                    Err(e) => causes.push(Cause::invalid(
                        &format!("{path}.matchLabels"),
                        &Value::String(format!("{key}={value}")),
                        &e,
                    )),
                }
            }
        }
        let exprs = selector.get("matchExpressions").and_then(Value::as_array);
        for (i, expr) in exprs.into_iter().flatten().enumerate() {
            let field = format!("{path}.matchExpressions[{i}]");
            let key = expr.get("key").and_then(Value::as_str).unwrap_or_default();
            let operator = expr
                .get("operator")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let op = match operator {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    causes.push(Cause::not_supported(
                        &format!("{field}.operator"),
                        &Value::String(other.into()),
                        &["In", "NotIn", "Exists", "DoesNotExist"],
                    ));
                    continue;
                }
            };
            let values = expr
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
            match Requirement::new(key.to_string(), op, values) {
                Ok(r) => requirements.push(r),
                Err(e) => causes.push(Cause::invalid(&field, expr, &e)),
            }
        }
        if causes.is_empty() {
            Ok(Self { requirements })
        } else {
            Err(causes)
        }
    }

    /// Whether a map of labels (a JSON object, or `None` for no labels) satisfies the selector.
    pub fn matches_labels(&self, labels: Option<&Value>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether an object's `metadata.labels` satisfy the selector.
    pub fn matches(&self, obj: &Value) -> bool {
        self.matches_labels(obj.pointer("/metadata/labels"))
    }
}

/// One `field=value` or `field!=value` term of a field selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    pub field: String,
    pub value: String,
    pub negated: bool,
}

/// A field selector, checked against the fields Kubernetes supports for the resource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    pub requirements: Vec<FieldRequirement>,
}

/// The JSON pointer behind each selectable field of a resource, besides `metadata.name` and
/// `metadata.namespace`, which every resource supports.
fn field_pointer(res: &Resource, field: &str) -> Option<&'static str> {
    let p = match (res.group, res.plural, field) {
        (_, _, "metadata.name") => "/metadata/name",
        (_, _, "metadata.namespace") => "/metadata/namespace",
        ("", "pods", "spec.nodeName") => "/spec/nodeName",
        ("", "pods", "spec.restartPolicy") => "/spec/restartPolicy",
        ("", "pods", "spec.schedulerName") => "/spec/schedulerName",
        ("", "pods", "spec.serviceAccountName") => "/spec/serviceAccountName",
        ("", "pods", "spec.hostNetwork") => "/spec/hostNetwork",
        ("", "pods", "status.phase") => "/status/phase",
        ("", "pods", "status.podIP") => "/status/podIP",
        ("", "pods", "status.nominatedNodeName") => "/status/nominatedNodeName",
        ("", "events", "involvedObject.kind") => "/involvedObject/kind",
        ("", "events", "involvedObject.namespace") => "/involvedObject/namespace",
        ("", "events", "involvedObject.name") => "/involvedObject/name",
        ("", "events", "involvedObject.uid") => "/involvedObject/uid",
        ("", "events", "involvedObject.apiVersion") => "/involvedObject/apiVersion",
        ("", "events", "involvedObject.resourceVersion") => "/involvedObject/resourceVersion",
        ("", "events", "involvedObject.fieldPath") => "/involvedObject/fieldPath",
        ("", "events", "reason") => "/reason",
        ("", "events", "reportingComponent") => "/reportingComponent",
        ("", "events", "source") => "/source/component",
        ("", "events", "type") => "/type",
        ("", "secrets", "type") => "/type",
        ("", "nodes", "spec.unschedulable") => "/spec/unschedulable",
        ("", "namespaces", "status.phase") => "/status/phase",
        ("apps", "replicasets", "status.replicas") => "/status/replicas",
        _ => return None,
    };
    Some(p)
}

/// The string a field compares as: missing strings are empty, missing booleans `false`
/// (`spec.hostNetwork=false` selects pods that never set it), numbers in decimal.
fn field_string(obj: &Value, field: &str, pointer: &str) -> String {
    match obj.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ if matches!(field, "spec.hostNetwork" | "spec.unschedulable") => "false".into(),
        _ if field == "status.replicas" => "0".into(),
        _ => String::new(),
    }
}

/// Splits on unescaped `sep`, keeping escapes for [`unescape`].
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let last = parts.last_mut();
                if let Some(last) = last {
                    last.push('\\');
                    if let Some(n) = chars.next() {
                        last.push(n);
                    }
                }
            }
            c if c == sep => parts.push(String::new()),
            c => {
                if let Some(last) = parts.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    parts
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n @ ('\\' | ',' | '=')) => out.push(n),
                Some(n) => return Err(format!("invalid escape sequence: \\{n}")),
                None => return Err("unterminated escape sequence".into()),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Finds the first unescaped operator in a term.
fn split_term(term: &str) -> Option<(&str, bool, &str)> {
    let bytes = term.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                return Some((&term[..i], true, &term[i + 2..]));
            }
            b'=' if bytes.get(i + 1) == Some(&b'=') => {
                return Some((&term[..i], false, &term[i + 2..]));
            }
            b'=' => return Some((&term[..i], false, &term[i + 1..])),
            _ => i += 1,
        }
    }
    None
}

impl FieldSelector {
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Parses the `fieldSelector` query parameter for `res`. An unknown field is a 400
    /// `field label not supported: <field>`, as Kubernetes answers.
    pub fn parse(res: &Resource, input: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        if input.trim().is_empty() {
            return Ok(Self::default());
        }
        for term in split_unescaped(input, ',') {
            let Some((field, negated, value)) = split_term(&term) else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{input}'; can't understand '{term}'"
                )));
            };
            let field = field.trim();
            if field_pointer(res, field).is_none() {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            let value = unescape(value).map_err(|e| {
                ApiError::bad_request(format!("invalid field selector {input:?}: {e}"))
            })?;
            requirements.push(FieldRequirement {
                field: field.to_string(),
                value,
                negated,
            });
        }
        Ok(Self { requirements })
    }

    /// Whether `obj` (of the resource the selector was parsed for) satisfies every term.
    pub fn matches(&self, res: &Resource, obj: &Value) -> bool {
        self.requirements.iter().all(|r| {
            let Some(pointer) = field_pointer(res, &r.field) else {
                return false;
            };
            (field_string(obj, &r.field, pointer) == r.value) != r.negated
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::find_by_name;
    use serde_json::json;

    fn pod(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "default", "labels": labels}})
    }

    #[test]
    fn parses_every_kubectl_operator() {
        let sel = LabelSelector::parse(
            "app=web, tier==front,env!=prod,zone in (a, b),track notin (canary),ready,!legacy",
        )
        .expect("valid selector");
        assert_eq!(sel.requirements.len(), 7);
        assert_eq!(sel.requirements[3].op, Op::In);
        assert_eq!(sel.requirements[6].op, Op::DoesNotExist);
        let good = pod(json!({"app": "web", "tier": "front", "zone": "b", "ready": ""}));
        assert!(sel.matches(&good));
        let mut bad = good.clone();
        bad["metadata"]["labels"]["legacy"] = json!("1");
        assert!(!sel.matches(&bad));
        let mut bad = good.clone();
        bad["metadata"]["labels"]["zone"] = json!("c");
        assert!(!sel.matches(&bad));
        let mut bad = good;
        bad["metadata"]["labels"]["env"] = json!("prod");
        assert!(!sel.matches(&bad));
    }

    #[test]
    fn empty_and_gt_lt_selectors() {
        assert!(LabelSelector::parse("").expect("empty").matches(&json!({})));
        let sel = LabelSelector::parse("gen>2,gen<5").expect("gt/lt");
        assert!(sel.matches(&pod(json!({"gen": "3"}))));
        assert!(!sel.matches(&pod(json!({"gen": "5"}))));
        assert!(!sel.matches(&pod(json!({}))));
        let eq_empty = LabelSelector::parse("a=").expect("empty value");
        assert!(eq_empty.matches(&pod(json!({"a": ""}))));
    }

    #[test]
    fn malformed_label_selectors_are_400_with_reason() {
        for (input, needle) in [
            ("a in b", "expected: '('"),
            ("a in ()", "values set can't be empty"),
            ("a=b c", "expected: ',' or 'end of string'"),
            ("=b", "found '=', expected: identifier"),
            ("a b=c", "found 'b', expected: '='"),
            ("a=b d", "found 'd'"),
            ("bad key!=1", "found 'key'"),
            ("a=b/c", "values[0][a]: Invalid value: \"b/c\""),
            ("-x=1", "key: Invalid value: \"-x\""),
            ("a>b", "must be an integer"),
            ("a in (x", "expected: ',' or ')'"),
        ] {
            let err = LabelSelector::parse(input).expect_err(input);
            assert_eq!(err.code, 400, "{input}");
            assert!(err.message.contains(needle), "{input}: {}", err.message);
        }
    }

    #[test]
    fn metav1_label_selectors() {
        let sel = LabelSelector::from_label_selector(
            &json!({"matchLabels": {"app": "web"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                         {"key": "old", "operator": "DoesNotExist"}]}),
            "spec.selector",
        )
        .expect("valid");
        assert!(sel.matches(&pod(json!({"app": "web", "tier": "a"}))));
        assert!(!sel.matches(&pod(json!({"app": "web", "tier": "a", "old": "x"}))));
        assert!(!sel.matches(&pod(json!({"app": "api", "tier": "a"}))));

        let causes = LabelSelector::from_label_selector(
            &json!({"matchLabels": {"app": "a b"},
                    "matchExpressions": [{"key": "t", "operator": "Within", "values": ["a"]},
                                         {"key": "u", "operator": "In", "values": []}]}),
            "spec.selector",
        )
        .expect_err("invalid");
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.selector.matchLabels",
                "spec.selector.matchExpressions[0].operator",
                "spec.selector.matchExpressions[1]"
            ]
        );
    }

    #[test]
    fn field_selectors_per_kind() {
        let pods = find_by_name("pods").expect("pods");
        let sel = FieldSelector::parse(
            pods,
            "spec.nodeName=n1,status.phase!=Failed,metadata.namespace==default",
        )
        .expect("valid");
        let pod = json!({"metadata": {"name": "p", "namespace": "default"},
                         "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        assert!(sel.matches(pods, &pod));
        let unbound = FieldSelector::parse(pods, "spec.nodeName=").expect("empty value");
        assert!(!unbound.matches(pods, &pod));
        assert!(unbound.matches(pods, &json!({"spec": {}})));
        let host = FieldSelector::parse(pods, "spec.hostNetwork=false").expect("bool");
        assert!(host.matches(pods, &pod));

        let err = FieldSelector::parse(pods, "spec.foo=x").expect_err("unsupported");
        assert_eq!(err.code, 400);
        assert_eq!(err.message, "field label not supported: spec.foo");
        let secrets = find_by_name("secrets").expect("secrets");
        assert!(FieldSelector::parse(secrets, "type=Opaque").is_ok());
        let nodes = find_by_name("nodes").expect("nodes");
        let unsched = FieldSelector::parse(nodes, "spec.unschedulable=false").expect("node");
        assert!(unsched.matches(nodes, &json!({"spec": {}})));
        let events = find_by_name("events").expect("events");
        let ev = FieldSelector::parse(events, "involvedObject.name=a\\,b").expect("escaped");
        assert!(ev.matches(events, &json!({"involvedObject": {"name": "a,b"}})));
        assert!(FieldSelector::parse(pods, "nonsense").is_err());
    }
}
