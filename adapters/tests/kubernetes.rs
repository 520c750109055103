//! The Kubernetes preview runtime against a fake API server that speaks the real wire format
//! (`fake_kube`): what it creates, how it reads a Pod's state, how it stops, what its errors say.

mod fake_kube;

use std::time::Duration;

use axum::http::Method;
use base64::Engine;
use fake_kube::FakeKube;
use secrecy::SecretString;
use serde_json::{json, Value};
use understudy_adapters::preview::kubernetes::{KubernetesConfig, KubernetesRuntime};
use understudy_adapters::preview::runtime::{dns_label, Address, InstanceSpec, InstanceStatus, PreviewRuntime, RuntimeError};
use understudy_adapters::preview::Limits;
use understudy_domain::ids::{DeploymentId, EnvironmentId};

const NS: &str = "previews";
const TOKEN: &str = "tok-live-5f2a9c41e7";
const PASSWORD: &str = "pw-correct-horse-battery";

fn spec(name: &str) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        environment: EnvironmentId(uuid::Uuid::from_u128(0xe1)),
        deployment: DeploymentId(uuid::Uuid::from_u128(0xd1)),
        image: None,
        command: vec!["npm".into(), "start".into()],
        env: vec![("NODE_ENV".into(), "production".into())],
        secrets: vec![("API_TOKEN".into(), SecretString::from(TOKEN)), ("DB_PASSWORD".into(), SecretString::from(PASSWORD))],
        port: 8080,
        health_path: Some("/healthz".into()),
        limits: Limits { memory_bytes: 256 << 20, pids: 256, cpu_millicores: 500, cpu_cap_millicores: Some(2000) },
        workdir: "/app/web".into(),
    }
}

fn runtime(fake: &FakeKube) -> KubernetesRuntime {
    KubernetesRuntime::for_url(&fake.url, KubernetesConfig::new(NS, "registry.example/understudy/node:22")).expect("a runtime for the fake")
}

/// Every place a secret value could leak into: as text and base64-encoded.
fn leaks(text: &str) -> Vec<String> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    [TOKEN.to_string(), PASSWORD.to_string(), b64(TOKEN), b64(PASSWORD)].into_iter().filter(|s| text.contains(s.as_str())).collect()
}

fn labels_of(object: &Value) -> Value {
    object["metadata"]["labels"].clone()
}

#[tokio::test]
async fn start_creates_a_secret_pod_service_and_network_policy_with_labels_limits_and_no_secret_in_the_pod() {
    let fake = FakeKube::start().await;
    let runtime = runtime(&fake);
    let handle = runtime.start(&spec("web-app")).await.expect("start");
    assert_eq!(handle.name, "web-app");

    let posts: Vec<String> = fake.requests().iter().filter(|r| r.method == Method::POST).map(|r| r.path.clone()).collect();
    assert_eq!(
        posts,
        [
            "/api/v1/namespaces/previews/secrets",
            "/api/v1/namespaces/previews/pods",
            "/api/v1/namespaces/previews/services",
            "/apis/networking.k8s.io/v1/namespaces/previews/networkpolicies",
        ],
        "the Secret goes first, so the Pod never waits for it"
    );
    let expected_labels = json!({
        "app.kubernetes.io/managed-by": "understudy",
        "understudy.dev/environment": "00000000-0000-0000-0000-0000000000e1",
        "understudy.dev/deployment": "00000000-0000-0000-0000-0000000000d1",
        "understudy.dev/instance": "web-app",
    });
    for resource in ["pods", "services", "secrets", "networkpolicies"] {
        assert_eq!(fake.names(resource, NS), ["web-app"], "{resource}");
        let object = fake.object(resource, NS, "web-app").expect("stored");
        assert_eq!(labels_of(&object), expected_labels, "{resource}");
    }

    let pod = fake.object("pods", NS, "web-app").expect("the pod");
    let pod_spec = &pod["spec"];
    assert_eq!(pod_spec["automountServiceAccountToken"], false);
    assert_eq!(pod_spec["enableServiceLinks"], false);
    assert_eq!(pod_spec["restartPolicy"], "Never");
    assert_eq!(pod_spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod_spec["securityContext"]["runAsUser"], 1000);
    assert_eq!(pod_spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let containers = pod_spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let app = &containers[0];
    assert_eq!(app["image"], "registry.example/understudy/node:22");
    assert_eq!(app["command"], json!(["npm", "start"]));
    assert_eq!(app["workingDir"], "/app/web");
    assert_eq!(app["ports"], json!([{ "name": "http", "containerPort": 8080, "protocol": "TCP" }]));
    let security = &app["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["privileged"], false);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(app["resources"]["requests"], json!({ "cpu": "500m", "memory": (256u64 << 20).to_string() }));
    assert_eq!(app["resources"]["limits"], json!({ "cpu": "2000m", "memory": (256u64 << 20).to_string() }));
    let mut uncapped = spec("web");
    uncapped.limits.cpu_cap_millicores = None;
    let uncapped = runtime.pod("web-app", &uncapped);
    let resources = uncapped.spec.expect("a pod spec").containers[0].resources.clone().expect("resources");
    assert!(!resources.limits.expect("limits").contains_key("cpu"), "no cap: the pod may use idle CPU");
    assert_eq!(app["readinessProbe"]["httpGet"], json!({ "path": "/healthz", "port": 8080 }));
    assert_eq!(app["volumeMounts"], json!([{ "name": "tmp", "mountPath": "/tmp" }]));
    let env = app["env"].as_array().expect("env");
    let var = |name: &str| env.iter().find(|v| v["name"] == name).cloned().unwrap_or(Value::Null);
    assert_eq!(var("PORT")["value"], "8080");
    assert_eq!(var("NODE_ENV")["value"], "production");
    assert_eq!(var("UNDERSTUDY_DEPLOYMENT_ID")["value"], "00000000-0000-0000-0000-0000000000d1");
    for (name, _) in [("API_TOKEN", TOKEN), ("DB_PASSWORD", PASSWORD)] {
        assert_eq!(
            var(name),
            json!({ "name": name, "valueFrom": { "secretKeyRef": { "name": "web-app", "key": name, "optional": false } } })
        );
    }
    assert!(leaks(&pod.to_string()).is_empty(), "the pod spec holds no secret value: {:?}", leaks(&pod.to_string()));

    // The values are in the Secret, and in no other request.
    let secret = fake.object("secrets", NS, "web-app").expect("the secret");
    let decode = |key: &str| {
        let text = secret["data"][key].as_str().expect("a base64 value");
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(text).expect("base64")).expect("utf-8")
    };
    assert_eq!((decode("API_TOKEN"), decode("DB_PASSWORD")), (TOKEN.to_string(), PASSWORD.to_string()));
    for request in fake.requests().iter().filter(|r| !r.path.ends_with("/secrets")) {
        let body = request.body.as_ref().map(Value::to_string).unwrap_or_default();
        assert!(leaks(&body).is_empty(), "{} {} carries a secret", request.method, request.path);
    }

    let service = fake.object("services", NS, "web-app").expect("the service");
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert_eq!(service["spec"]["selector"], json!({ "understudy.dev/instance": "web-app" }));
    assert_eq!(service["spec"]["ports"], json!([{ "name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP" }]));

    let policy = fake.object("networkpolicies", NS, "web-app").expect("the network policy");
    assert_eq!(policy["spec"]["podSelector"], json!({ "matchLabels": { "understudy.dev/instance": "web-app" } }));
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{ "from": [{ "podSelector": { "matchLabels": { "understudy.dev/role": "proxy" } } }], "ports": [{ "port": 8080, "protocol": "TCP" }] }])
    );
    assert_eq!(policy["spec"]["egress"], json!([]), "no way out, as in the sandbox");
}

#[tokio::test]
async fn an_instance_without_secrets_gets_no_secret_and_the_proxy_namespace_is_selected_when_set() {
    let fake = FakeKube::start().await;
    let mut config = KubernetesConfig::new(NS, "node:22");
    config.proxy_namespace = Some("understudy".into());
    config.read_only_root_filesystem = false;
    let runtime = KubernetesRuntime::for_url(&fake.url, config).expect("runtime");
    let mut plain = spec("plain");
    plain.secrets.clear();
    plain.health_path = None;
    plain.image = Some("ghcr.example/app:abc".into());
    let handle = runtime.start(&plain).await.expect("start");
    assert!(fake.names("secrets", NS).is_empty());
    let pod = fake.object("pods", NS, &handle.name).expect("pod");
    let app = &pod["spec"]["containers"][0];
    assert_eq!(app["image"], "ghcr.example/app:abc", "the spec's image wins over the default");
    assert_eq!(app["readinessProbe"]["tcpSocket"], json!({ "port": 8080 }), "no health path: ready once the port answers");
    assert_eq!(app["securityContext"]["readOnlyRootFilesystem"], false);
    let policy = fake.object("networkpolicies", NS, &handle.name).expect("policy");
    assert_eq!(
        policy["spec"]["ingress"][0]["from"][0],
        json!({
            "podSelector": { "matchLabels": { "understudy.dev/role": "proxy" } },
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "understudy" } },
        })
    );
    runtime.stop(&handle).await.expect("stop");
}

#[tokio::test]
async fn status_follows_the_pod_from_pending_to_running_to_ready_and_a_crash_ends_it() {
    let fake = FakeKube::start().await;
    let runtime = runtime(&fake);
    let handle = runtime.start(&spec("app")).await.expect("start");
    assert_eq!(runtime.status(&handle).await.expect("status"), InstanceStatus::Pending);

    let container = |state: Value, ready: bool| json!({ "name": "app", "ready": ready, "restartCount": 0, "image": "node:22", "imageID": "", "state": state });
    fake.set_pod_status(
        NS,
        "app",
        json!({ "phase": "Pending", "containerStatuses": [container(json!({ "waiting": { "reason": "ContainerCreating" } }), false)] }),
    );
    assert_eq!(runtime.status(&handle).await.expect("status"), InstanceStatus::Pending);
    let running = json!({ "running": { "startedAt": "2026-01-01T00:00:00Z" } });
    fake.set_pod_status(NS, "app", json!({ "phase": "Running", "containerStatuses": [container(running.clone(), false)] }));
    assert_eq!(runtime.status(&handle).await.expect("status"), InstanceStatus::Running);
    fake.set_pod_status(NS, "app", json!({ "phase": "Running", "conditions": [{ "type": "Ready", "status": "True" }], "containerStatuses": [container(running, true)] }));
    assert_eq!(runtime.status(&handle).await.expect("status"), InstanceStatus::Ready);

    let terminated = |code: i32, reason: &str| json!({ "terminated": { "exitCode": code, "reason": reason, "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:00Z" } });
    fake.set_pod_status(NS, "app", json!({ "phase": "Failed", "containerStatuses": [container(terminated(3, "Error"), false)] }));
    assert_eq!(runtime.status(&handle).await.expect("status"), InstanceStatus::Exited(3));
    fake.set_pod_status(NS, "app", json!({ "phase": "Failed", "containerStatuses": [container(terminated(137, "OOMKilled"), false)] }));
    assert!(matches!(runtime.status(&handle).await.expect("status"), InstanceStatus::Failed(r) if r.contains("memory")));
    fake.set_pod_status(
        NS,
        "app",
        json!({ "phase": "Pending", "containerStatuses": [container(json!({ "waiting": { "reason": "ImagePullBackOff", "message": "Back-off pulling image \"node:22\"" } }), false)] }),
    );
    assert!(
        matches!(runtime.status(&handle).await.expect("status"), InstanceStatus::Failed(r) if r.starts_with("ImagePullBackOff: Back-off pulling"))
    );
    fake.set_pod_status(NS, "app", json!({ "phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory." }));
    assert_eq!(
        runtime.status(&handle).await.expect("status"),
        InstanceStatus::Failed("the pod failed: Evicted: The node was low on resource: memory.".into())
    );

    fake.remove("pods", NS, "app");
    assert!(matches!(runtime.status(&handle).await.expect("status"), InstanceStatus::Failed(r) if r.contains("no longer exists")));
}

#[tokio::test]
async fn the_address_is_the_services_dns_name_and_port() {
    let fake = FakeKube::start().await;
    let runtime = runtime(&fake);
    let mut spec = spec("api");
    spec.port = 3000;
    let handle = runtime.start(&spec).await.expect("start");
    assert_eq!(runtime.address(&handle), Address::Tcp("api.previews.svc:3000".into()));
    let service = fake.object("services", NS, "api").expect("the service the address names");
    assert_eq!(service["spec"]["ports"][0]["port"], 3000);
}

#[tokio::test]
async fn stop_deletes_every_object_and_stopping_again_succeeds() {
    let fake = FakeKube::start().await;
    let runtime = runtime(&fake);
    let handle = runtime.start(&spec("app")).await.expect("start");
    let other = runtime.start(&spec("other")).await.expect("start another");
    fake.clear_requests();
    runtime.stop(&handle).await.expect("stop");
    for resource in ["pods", "services", "secrets", "networkpolicies"] {
        assert_eq!(fake.names(resource, NS), [other.name.as_str()], "only the stopped instance's {resource} are gone");
    }
    let deletes: Vec<(String, u16)> =
        fake.requests().iter().filter(|r| r.method == Method::DELETE).map(|r| (r.path.clone(), r.status)).collect();
    assert_eq!(deletes.len(), 4, "{deletes:?}");
    assert!(deletes.iter().all(|(_, status)| *status == 200), "{deletes:?}");

    fake.clear_requests();
    runtime.stop(&handle).await.expect("stopping what is gone succeeds");
    let statuses: Vec<u16> = fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [404, 404, 404, 404], "each delete was answered NotFound and taken as done");
}

#[tokio::test]
async fn a_repeated_start_is_idempotent_and_a_different_spec_under_the_same_name_is_a_conflict() {
    let fake = FakeKube::start().await;
    let runtime = runtime(&fake);
    let first = runtime.start(&spec("app")).await.expect("start");
    let uid = |resource: &str| fake.object(resource, NS, "app").expect("stored")["metadata"]["uid"].clone();
    let uids: Vec<Value> = ["pods", "services", "secrets", "networkpolicies"].iter().map(|r| uid(r)).collect();

    fake.clear_requests();
    let again = runtime.start(&spec("app")).await.expect("a repeated start");
    assert_eq!(again, first);
    let after: Vec<Value> = ["pods", "services", "secrets", "networkpolicies"].iter().map(|r| uid(r)).collect();
    assert_eq!(after, uids, "nothing was created twice");
    let creates: Vec<u16> = fake.requests().iter().filter(|r| r.method == Method::POST).map(|r| r.status).collect();
    assert_eq!(creates, [409, 409, 409, 409], "each create met the object already there");

    let mut changed = spec("app");
    changed.command = vec!["node".into(), "other.js".into()];
    let error = runtime.start(&changed).await.expect_err("a different command under the same name");
    assert!(matches!(&error, RuntimeError::Conflict(m) if m.contains("Pod app in namespace previews")), "{error}");
    let mut new_secret = spec("app");
    new_secret.secrets[0].1 = SecretString::from("tok-rotated-000000");
    let error = runtime.start(&new_secret).await.expect_err("a different secret under the same name");
    assert!(matches!(&error, RuntimeError::Conflict(m) if m.contains("Secret app")), "{error}");
    assert!(!error.to_string().contains("tok-rotated") && leaks(&error.to_string()).is_empty());
    assert_eq!(uid("pods"), uids[0], "the running pod was left alone");
}

#[tokio::test]
async fn api_errors_are_clear_and_name_the_resource_and_namespace() {
    let fake = FakeKube::start().await;
    let runtime = runtime(&fake);

    fake.fail(Method::POST, "secrets", 403);
    let error = runtime.start(&spec("app")).await.expect_err("forbidden");
    let RuntimeError::Forbidden(message) = &error else { panic!("expected Forbidden, got {error:?}") };
    assert!(message.contains("create secret app in namespace previews"), "{message}");
    assert!(message.contains("403 Forbidden"), "{message}");
    assert!(message.contains("grant the runtime's service account `create` on secrets in namespace previews"), "{message}");
    assert!(leaks(message).is_empty());
    assert!(fake.names("pods", NS).is_empty(), "no pod without its secret");

    // A start cut short half-way is completed by the next one.
    fake.heal();
    fake.fail(Method::POST, "networkpolicies", 403);
    let error = runtime.start(&spec("app")).await.expect_err("forbidden");
    assert!(matches!(&error, RuntimeError::Forbidden(m) if m.contains("create networkpolicy app in namespace previews")), "{error}");
    assert_eq!(fake.names("pods", NS), ["app"]);
    fake.heal();
    let handle = runtime.start(&spec("app")).await.expect("the retry completes the instance");
    assert_eq!(fake.names("networkpolicies", NS), ["app"]);

    fake.fail(Method::GET, "pods", 500);
    let error = runtime.status(&handle).await.expect_err("server error");
    assert!(
        matches!(&error, RuntimeError::Unavailable(m) if m.contains("get pod app in namespace previews") && m.contains("500")),
        "{error}"
    );
    fake.heal();

    fake.fail(Method::POST, "pods", 422);
    let error = runtime.start(&spec("other")).await.expect_err("invalid");
    assert!(
        matches!(&error, RuntimeError::Invalid(m) if m.contains("rejected the request to create pod other") && m.contains("Invalid")),
        "{error}"
    );
    fake.heal();

    fake.fail(Method::DELETE, "services", 403);
    let error = runtime.stop(&handle).await.expect_err("forbidden delete");
    assert!(matches!(&error, RuntimeError::Forbidden(m) if m.contains("delete service app in namespace previews")), "{error}");
    fake.heal();

    // Nobody listening: retry later.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let unreachable = KubernetesRuntime::for_url(&format!("http://{closed}"), KubernetesConfig::new(NS, "node:22")).expect("runtime");
    let error =
        tokio::time::timeout(Duration::from_secs(30), unreachable.start(&spec("app"))).await.expect("fails fast").expect_err("unreachable");
    assert!(matches!(&error, RuntimeError::Unavailable(m) if m.contains("create secret app in namespace previews")), "{error}");
}

#[tokio::test]
async fn names_are_normalised_to_dns_1123_labels_the_api_accepts() {
    let fake = FakeKube::start().await;
    let runtime = runtime(&fake);

    // The fake refuses what a cluster refuses, so the normalisation is what makes these pass.
    let raw = kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(
        kube::Client::try_from(kube::Config::new(fake.url.parse().expect("url"))).expect("client"),
        NS,
    );
    let mut service = k8s_openapi::api::core::v1::Service::default();
    service.metadata.name = Some("0190-app".into());
    let refused = raw.create(&Default::default(), &service).await.expect_err("a service name must start with a letter");
    assert!(matches!(&refused, kube::Error::Api(s) if s.code == 422 && s.reason == "Invalid"), "{refused:?}");

    for name in ["PR #42: My_App (Preview)", "0190c4f2-7b1e-7c3d-9a5e-1f2e3d4c5b6a-app", &"very-long-name-".repeat(8)] {
        let handle = runtime.start(&spec(name)).await.unwrap_or_else(|e| panic!("start {name:?}: {e}"));
        assert_eq!(handle.name, dns_label(name));
        assert!(handle.name.len() <= 63, "{}", handle.name);
        for resource in ["pods", "services", "secrets", "networkpolicies"] {
            assert!(fake.object(resource, NS, &handle.name).is_some(), "{resource} {}", handle.name);
        }
        assert_eq!(runtime.start(&spec(name)).await.expect("again").name, handle.name, "the same name gives the same objects");
    }
    assert!(dns_label("PR #42: My_App (Preview)").starts_with("pr-42-my-app-preview-"));
}

#[tokio::test]
async fn logs_are_the_pods_last_lines_with_its_secrets_redacted() {
    let fake = FakeKube::start().await;
    let runtime = runtime(&fake);
    let handle = runtime.start(&spec("app")).await.expect("start");
    fake.set_pod_logs(NS, "app", &format!("booting\nconnecting with {PASSWORD}\nlistening on 8080\n"));
    assert_eq!(runtime.logs(&handle, 2).await.expect("logs of a pod not started yet"), "");
    fake.set_pod_status(NS, "app", json!({ "phase": "Running" }));
    let logs = runtime.logs(&handle, 2).await.expect("logs");
    assert_eq!(logs, "connecting with [redacted]\nlistening on 8080\n");
    let request = fake.requests().into_iter().find(|r| r.path.ends_with("/log")).expect("a log request");
    assert_eq!(request.path, "/api/v1/namespaces/previews/pods/app/log");
    assert!(request.query.contains("container=app") && request.query.contains("tailLines=2"), "{}", request.query);
    runtime.stop(&handle).await.expect("stop");
    assert_eq!(runtime.logs(&handle, 10).await.expect("logs of a stopped instance"), "");

    let handle = runtime.start(&spec("other")).await.expect("start");
    fake.fail(Method::GET, "pods", 403);
    let error = runtime.logs(&handle, 10).await.expect_err("forbidden");
    assert!(
        matches!(&error, RuntimeError::Forbidden(m) if m.contains("get the log of pod other in namespace previews") && m.contains("`get` on pods/log")),
        "{error}"
    );
}
