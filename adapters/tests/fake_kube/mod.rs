//! A fake Kubernetes API server for tests: what kube-rs calls for namespaced Pods (and their
//! logs), Services, Secrets and NetworkPolicies, in the real wire format. Objects come back
//! with `metadata.uid`, `resourceVersion` and `creationTimestamp`; errors are real `Status`
//! objects (`kind: Status`, `status: Failure`, `reason`, `code`, `details`). Names are validated
//! as the API server does (422 Invalid), so a test sees what a cluster would refuse.
//!
//! A test reads what was sent ([`FakeKube::requests`]) and stored ([`FakeKube::object`]),
//! moves a Pod along ([`FakeKube::set_pod_status`]), gives it output ([`FakeKube::set_pod_logs`]),
//! and makes requests fail ([`FakeKube::fail`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// One request as the server saw it, and the status it answered.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
    pub status: u16,
}

/// A request the server refuses: `method` on `resource` (plural, `pods`) answers `code`.
#[derive(Debug, Clone)]
struct Failure {
    method: Method,
    resource: String,
    code: u16,
}

#[derive(Default)]
struct Store {
    /// (resource, namespace, name) → the stored object.
    objects: BTreeMap<(String, String, String), Value>,
    logs: HashMap<(String, String), String>,
    requests: Vec<Recorded>,
    failures: Vec<Failure>,
    resource_version: u64,
    cluster_ips: u8,
}

type Shared = Arc<Mutex<Store>>;

/// The fake server, listening on 127.0.0.1 until dropped.
pub struct FakeKube {
    pub url: String,
    store: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The resources served: plural → (API prefix, kind, apiVersion, group for messages).
fn resource(plural: &str) -> Option<(&'static str, &'static str, &'static str, &'static str)> {
    match plural {
        "pods" => Some(("/api/v1", "Pod", "v1", "")),
        "services" => Some(("/api/v1", "Service", "v1", "")),
        "secrets" => Some(("/api/v1", "Secret", "v1", "")),
        "networkpolicies" => Some(("/apis/networking.k8s.io/v1", "NetworkPolicy", "networking.k8s.io/v1", "networking.k8s.io")),
        _ => None,
    }
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let store: Shared = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the fake Kubernetes API");
        let url = format!("http://{}", listener.local_addr().expect("the fake's address"));
        let app = axum::Router::new().fallback(handle).with_state(store.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeKube { url, store, task }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.store().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.store().requests.clear();
    }

    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.store().objects.get(&(resource.into(), namespace.into(), name.into())).cloned()
    }

    /// The names of the stored objects of `resource` in `namespace`.
    pub fn names(&self, resource: &str, namespace: &str) -> Vec<String> {
        self.store().objects.keys().filter(|(r, ns, _)| r == resource && ns == namespace).map(|(_, _, name)| name.clone()).collect()
    }

    /// Removes an object behind the client's back (an operator's `kubectl delete`, an eviction).
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) {
        self.store().objects.remove(&(resource.into(), namespace.into(), name.into()));
    }

    /// Replaces a Pod's `status`, as the kubelet would.
    pub fn set_pod_status(&self, namespace: &str, name: &str, status: Value) {
        let mut store = self.store();
        store.resource_version += 1;
        let version = store.resource_version.to_string();
        let pod = store.objects.get_mut(&("pods".into(), namespace.into(), name.into())).expect("set_pod_status: no such pod");
        pod["status"] = status;
        pod["metadata"]["resourceVersion"] = json!(version);
    }

    pub fn set_pod_logs(&self, namespace: &str, name: &str, text: &str) {
        self.store().logs.insert((namespace.into(), name.into()), text.into());
    }

    /// From now on, `method` on `resource` answers `code` with a `Status` (until [`Self::heal`]).
    pub fn fail(&self, method: Method, resource: &str, code: u16) {
        self.store().failures.push(Failure { method, resource: resource.into(), code });
    }

    pub fn heal(&self) {
        self.store().failures.clear();
    }
}

fn status(code: u16, reason: &str, message: String, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    json_response(code, &body)
}

fn json_response(code: u16, body: &Value) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "AlreadyExists",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    }
}

/// Whether `name` is a DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63), and for a
/// Service also a DNS-1035 one (starting with a letter).
fn invalid_name(resource: &str, name: &str) -> Option<String> {
    let chars_ok = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let ends_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric()) && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 63 || !chars_ok || !ends_ok {
        return Some("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".into());
    }
    if resource == "services" && !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Some("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')".into());
    }
    None
}

async fn handle(State(store): State<Shared>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let parsed_body = if body.is_empty() { None } else { serde_json::from_slice::<Value>(&body).ok() };
    let mut store = store.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let response = answer(&mut store, &method, &path, &query, parsed_body.clone(), &body);
    store.requests.push(Recorded { method, path, query, body: parsed_body, status: response.status().as_u16() });
    response
}

fn answer(store: &mut Store, method: &Method, path: &str, query: &str, body: Option<Value>, raw: &Bytes) -> Response {
    // {prefix}/namespaces/{ns}/{resource}[/{name}[/log]]
    let (prefix, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
        ("/api/v1", rest)
    } else if let Some(rest) = path.strip_prefix("/apis/networking.k8s.io/v1/") {
        ("/apis/networking.k8s.io/v1", rest)
    } else {
        return status(404, "NotFound", "the server could not find the requested resource".into(), None);
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let (namespace, plural, name, sub) = match parts.as_slice() {
        ["namespaces", ns, plural] => (*ns, *plural, None, None),
        ["namespaces", ns, plural, name] => (*ns, *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (*ns, *plural, Some(*name), Some(*sub)),
        _ => return status(404, "NotFound", "the server could not find the requested resource".into(), None),
    };
    let Some((served_prefix, kind, api_version, group)) = resource(plural) else {
        return status(404, "NotFound", "the server could not find the requested resource".into(), None);
    };
    if served_prefix != prefix || sub.is_some_and(|s| s != "log" || plural != "pods") {
        return status(404, "NotFound", "the server could not find the requested resource".into(), None);
    }
    if let Some(failure) = store.failures.iter().find(|f| f.method == *method && f.resource == plural) {
        let verb = match (method.as_str(), name) {
            ("POST", _) => "create",
            ("DELETE", _) => "delete",
            ("GET", None) => "list",
            _ => "get",
        };
        let code = failure.code;
        let message = match code {
            403 => format!(
                "{plural} is forbidden: User \"system:serviceaccount:understudy:worker\" cannot {verb} resource \"{plural}\" in API group \"{group}\" in the namespace \"{namespace}\""
            ),
            422 => format!("{kind} \"{}\" is invalid: spec: Invalid value: the fake was told to refuse it", name.unwrap_or("")),
            _ => "Internal error occurred: the fake was told to fail".to_string(),
        };
        return status(code, reason_for(code), message, None);
    }
    let key = |name: &str| (plural.to_string(), namespace.to_string(), name.to_string());
    let not_found =
        |name: &str| status(404, "NotFound", format!("{plural} \"{name}\" not found"), Some(json!({ "name": name, "kind": plural })));
    match (method.as_str(), name, sub) {
        ("POST", None, None) => {
            let Some(mut object) = body else {
                let text = String::from_utf8_lossy(raw);
                return status(400, "BadRequest", format!("the body of the request was in an unknown format: {text}"), None);
            };
            if object["kind"] != kind || object["apiVersion"] != api_version {
                return status(400, "BadRequest", format!("the object is not a {kind} of {api_version}"), None);
            }
            if object["metadata"]["namespace"].as_str().is_some_and(|ns| ns != namespace) {
                return status(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                    None,
                );
            }
            let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
            if let Some(why) = invalid_name(plural, &name) {
                return status(
                    422,
                    "Invalid",
                    format!("{kind} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": {why}"),
                    Some(
                        json!({ "name": name, "kind": kind, "causes": [{ "reason": "FieldValueInvalid", "message": why, "field": "metadata.name" }] }),
                    ),
                );
            }
            if store.objects.contains_key(&key(&name)) {
                return status(
                    409,
                    "AlreadyExists",
                    format!("{plural} \"{name}\" already exists"),
                    Some(json!({ "name": name, "kind": plural })),
                );
            }
            store.resource_version += 1;
            object["metadata"]["namespace"] = json!(namespace);
            object["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
            object["metadata"]["resourceVersion"] = json!(store.resource_version.to_string());
            object["metadata"]["creationTimestamp"] = json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            match plural {
                "pods" => object["status"] = json!({ "phase": "Pending", "qosClass": "Guaranteed" }),
                "services" => {
                    store.cluster_ips = store.cluster_ips.wrapping_add(1);
                    let ip = format!("10.96.0.{}", store.cluster_ips);
                    object["spec"]["clusterIP"] = json!(ip);
                    object["spec"]["clusterIPs"] = json!([ip]);
                    object["status"] = json!({ "loadBalancer": {} });
                }
                _ => {}
            }
            store.objects.insert(key(&name), object.clone());
            json_response(201, &object)
        }
        ("GET", None, None) => {
            let items: Vec<Value> =
                store.objects.iter().filter(|((r, ns, _), _)| r == plural && ns == namespace).map(|(_, o)| o.clone()).collect();
            json_response(
                200,
                &json!({ "kind": format!("{kind}List"), "apiVersion": api_version, "metadata": { "resourceVersion": store.resource_version.to_string() }, "items": items }),
            )
        }
        ("GET", Some(name), None) => match store.objects.get(&key(name)) {
            Some(object) => json_response(200, object),
            None => not_found(name),
        },
        ("GET", Some(name), Some("log")) => {
            let Some(pod) = store.objects.get(&key(name)) else { return not_found(name) };
            if pod["status"]["phase"] == "Pending" {
                let message = format!("container \"app\" in pod \"{name}\" is waiting to start: ContainerCreating");
                return status(400, "BadRequest", message, None);
            }
            let text = store.logs.get(&(namespace.to_string(), name.to_string())).cloned().unwrap_or_default();
            let tail = query.split('&').find_map(|p| p.strip_prefix("tailLines=")).and_then(|n| n.parse::<usize>().ok());
            let lines: Vec<&str> = text.lines().collect();
            let from = tail.map_or(0, |n| lines.len().saturating_sub(n));
            let out: String = lines[from..].iter().map(|l| format!("{l}\n")).collect();
            (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], out).into_response()
        }
        ("DELETE", Some(name), None) => match store.objects.remove(&key(name)) {
            Some(object) => json_response(200, &object),
            None => not_found(name),
        },
        _ => status(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource: {method} {path}"),
            None,
        ),
    }
}
