//! Preview app instances on a Kubernetes cluster: the [`PreviewRuntime`] that runs each instance
//! as one Pod, reached by the proxy through one ClusterIP Service.
//!
//! Per instance, all named [`dns_label`] of the spec's name, in one namespace:
//! - a **Secret** with the instance's secret variables (only when it has any), which the Pod
//!   names in `secretKeyRef`s: the values are never in the Pod's spec;
//! - the **Pod**: one container `app`, `restartPolicy: Never` (the caller decides about
//!   restarts, as the worker does for the sandbox), no service account token, no service links,
//!   non-root user 1000, no privilege escalation, every capability dropped, the runtime's default
//!   seccomp profile, a read-only root file system with a writable `/tmp` (`$HOME`), memory
//!   requested and limited at the spec's limit, CPU requested at its share and limited only at
//!   its cap if it has one (the process limit is the kubelet's, not per Pod), and a readiness
//!   probe on the health path (or the port);
//! - the **Service**: ClusterIP, its port to the app's port; the address is `{name}.{ns}.svc:{port}`;
//! - the **NetworkPolicy**: ingress to the Pod only from the proxy's pods
//!   (`understudy.dev/role=proxy`, in the previews' namespace or the one configured) on the
//!   app's port, and no egress at all, as in the sandbox. So no preview reaches another.
//!
//! Every object is labelled `app.kubernetes.io/managed-by=understudy`,
//! `understudy.dev/environment`, `understudy.dev/deployment` and `understudy.dev/instance`.
//!
//! A start that meets an object already there (409 AlreadyExists) reads it: one created from the
//! same spec (the `understudy.dev/spec-hash` annotation; a Secret's data) counts as started, so a
//! retried start is idempotent; one from a different spec is a [`RuntimeError::Conflict`], never
//! replaced, because a Pod cannot be replaced in place and a name belongs to one deployment.
//! A start cut short leaves what it created; the next start or a stop completes it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, Pod, PodSecurityContext, PodSpec,
    Probe, ResourceRequirements, SeccompProfile, Secret, SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec,
    TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, LogParams, PostParams};
use kube::Resource;
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::logs::Redactor;
use super::runtime::{dns_label, Address, InstanceHandle, InstanceSpec, InstanceStatus, PreviewRuntime, RuntimeError};

/// The label every object of ours carries, and its value.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "understudy");
pub const ENVIRONMENT_LABEL: &str = "understudy.dev/environment";
pub const DEPLOYMENT_LABEL: &str = "understudy.dev/deployment";
/// Selects one instance's Pod (for its Service and NetworkPolicy).
pub const INSTANCE_LABEL: &str = "understudy.dev/instance";
/// The label of the proxy's pods, the only ones a preview accepts connections from.
pub const PROXY_ROLE: (&str, &str) = ("understudy.dev/role", "proxy");
/// Hash of the spec an object was created from, compared by a repeated start.
pub const SPEC_HASH: &str = "understudy.dev/spec-hash";
/// The app's container in each Pod.
const CONTAINER: &str = "app";
/// The user and group apps run as (the sandbox's, too).
const APP_UID: i64 = super::sandbox::SANDBOX_UID as i64;

/// Where and how previews run on the cluster.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// The namespace every instance's objects go in.
    pub namespace: String,
    /// The image an instance runs when its spec names none (a Node or Wing base image).
    pub image: String,
    /// The namespace of the proxy's pods (`understudy.dev/role=proxy`); none: the previews' own.
    pub proxy_namespace: Option<String>,
    /// Mount the container's root file system read-only (`/tmp` stays writable). Apps that write
    /// next to their code (build caches, a Wing simulator's state) need it off.
    pub read_only_root_filesystem: bool,
}

impl KubernetesConfig {
    pub fn new(namespace: impl Into<String>, image: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), image: image.into(), proxy_namespace: None, read_only_root_filesystem: true }
    }
}

/// Runs preview instances as Pods and Services in one namespace of a cluster.
#[derive(Clone)]
pub struct KubernetesRuntime {
    client: kube::Client,
    config: KubernetesConfig,
}

impl KubernetesRuntime {
    pub fn new(client: kube::Client, config: KubernetesConfig) -> Self {
        Self { client, config }
    }

    /// Connects as kube-rs finds its configuration: `$KUBECONFIG` or `~/.kube/config`, else the
    /// in-cluster service account.
    pub async fn infer(config: KubernetesConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        let kube_config =
            kube::Config::infer().await.context("finding the Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)")?;
        let client = kube::Client::try_from(kube_config).context("building the Kubernetes client")?;
        Ok(Self::new(client, config))
    }

    /// Connects to the API server at `url` without credentials (a test server, `kubectl proxy`).
    pub fn for_url(url: &str, config: KubernetesConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        let uri: http::Uri = url.parse().with_context(|| format!("the Kubernetes API URL {url:?} is not a URL"))?;
        let client = kube::Client::try_from(kube::Config::new(uri)).context("building the Kubernetes client")?;
        Ok(Self::new(client, config))
    }

    pub fn config(&self) -> &KubernetesConfig {
        &self.config
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn metadata(&self, name: &str, spec: &InstanceSpec) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.config.namespace.clone()),
            labels: Some(labels(name, spec)),
            ..ObjectMeta::default()
        }
    }

    /// The Secret holding the instance's secret variables, one key per variable.
    pub fn secret(&self, name: &str, spec: &InstanceSpec) -> Secret {
        let data = spec.secrets.iter().map(|(k, v)| (k.clone(), ByteString(v.expose_secret().as_bytes().to_vec()))).collect();
        Secret { metadata: self.metadata(name, spec), type_: Some("Opaque".into()), data: Some(data), ..Secret::default() }
    }

    /// The instance's Pod: plain variables by value, secret ones by reference to its Secret.
    pub fn pod(&self, name: &str, spec: &InstanceSpec) -> Pod {
        let mut env: Vec<EnvVar> =
            spec.plain_env().into_iter().map(|(name, value)| EnvVar { name, value: Some(value), value_from: None }).collect();
        env.extend(spec.secrets.iter().map(|(key, _)| EnvVar {
            name: key.clone(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector { name: name.to_string(), key: key.clone(), optional: Some(false) }),
                ..EnvVarSource::default()
            }),
        }));
        // CPU: requested at the share, limited only at the cap; memory: both at its limit.
        let memory = ("memory".to_string(), Quantity(spec.limits.memory_bytes.to_string()));
        let requests: BTreeMap<String, Quantity> =
            [("cpu".to_string(), Quantity(format!("{}m", spec.limits.cpu_millicores))), memory.clone()].into();
        let mut limits: BTreeMap<String, Quantity> = [memory].into();
        if let Some(cap) = spec.limits.cpu_cap_millicores {
            limits.insert("cpu".to_string(), Quantity(format!("{cap}m")));
        }
        let port = i32::from(spec.port);
        let readiness_probe = Probe {
            http_get: spec.health_path.as_ref().map(|path| HTTPGetAction {
                path: Some(path.clone()),
                port: IntOrString::Int(port),
                ..HTTPGetAction::default()
            }),
            tcp_socket: spec.health_path.is_none().then_some(TCPSocketAction { port: IntOrString::Int(port), host: None }),
            period_seconds: Some(2),
            timeout_seconds: Some(5),
            ..Probe::default()
        };
        let container = Container {
            name: CONTAINER.into(),
            image: Some(spec.image.clone().unwrap_or_else(|| self.config.image.clone())),
            command: (!spec.command.is_empty()).then(|| spec.command.clone()),
            working_dir: Some(spec.workdir.clone()),
            env: Some(env),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: port,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]),
            resources: Some(ResourceRequirements { requests: Some(requests), limits: Some(limits), ..ResourceRequirements::default() }),
            readiness_probe: Some(readiness_probe),
            security_context: Some(SecurityContext {
                run_as_non_root: Some(true),
                privileged: Some(false),
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(self.config.read_only_root_filesystem),
                capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(vec![VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() }]),
            ..Container::default()
        };
        let pod_spec = PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(10),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(APP_UID),
                run_as_group: Some(APP_UID),
                fs_group: Some(APP_UID),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
                ..PodSecurityContext::default()
            }),
            volumes: Some(vec![Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() }]),
            ..PodSpec::default()
        };
        let mut metadata = self.metadata(name, spec);
        metadata.annotations = Some([(SPEC_HASH.to_string(), fingerprint(&pod_spec))].into());
        Pod { metadata, spec: Some(pod_spec), status: None }
    }

    /// The instance's ClusterIP Service, its port to the app's.
    pub fn service(&self, name: &str, spec: &InstanceSpec) -> Service {
        let port = i32::from(spec.port);
        let service_spec = ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some([(INSTANCE_LABEL.to_string(), name.to_string())].into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port,
                target_port: Some(IntOrString::Int(port)),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        };
        let mut metadata = self.metadata(name, spec);
        metadata.annotations = Some([(SPEC_HASH.to_string(), fingerprint(&service_spec))].into());
        Service { metadata, spec: Some(service_spec), status: None }
    }

    /// The instance's NetworkPolicy: in from the proxy's pods on the app's port, nothing out.
    pub fn network_policy(&self, name: &str, spec: &InstanceSpec) -> NetworkPolicy {
        let proxy = NetworkPolicyPeer {
            pod_selector: Some(LabelSelector {
                match_labels: Some([(PROXY_ROLE.0.to_string(), PROXY_ROLE.1.to_string())].into()),
                match_expressions: None,
            }),
            namespace_selector: self.config.proxy_namespace.as_ref().map(|ns| LabelSelector {
                match_labels: Some([("kubernetes.io/metadata.name".to_string(), ns.clone())].into()),
                match_expressions: None,
            }),
            ip_block: None,
        };
        let policy_spec = NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some([(INSTANCE_LABEL.to_string(), name.to_string())].into()),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![proxy]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(i32::from(spec.port))),
                    protocol: Some("TCP".into()),
                    end_port: None,
                }]),
            }]),
            // Egress is a policy type with no rule: nothing goes out.
            egress: Some(Vec::new()),
        };
        let mut metadata = self.metadata(name, spec);
        metadata.annotations = Some([(SPEC_HASH.to_string(), fingerprint(&policy_spec))].into());
        NetworkPolicy { metadata, spec: Some(policy_spec) }
    }

    /// Creates `object`, or accepts the one already there when `same` says it is ours.
    async fn create<K>(&self, object: &K, same: impl Fn(&K) -> bool) -> Result<(), RuntimeError>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + std::fmt::Debug + Serialize + DeserializeOwned,
        <K as Resource>::DynamicType: Default,
    {
        let api = self.api::<K>();
        let name = object.meta().name.clone().unwrap_or_default();
        match api.create(&PostParams::default(), object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                let existing = api.get(&name).await.map_err(|e| self.error::<K>(e, "get", &name))?;
                if same(&existing) {
                    return Ok(());
                }
                Err(RuntimeError::Conflict(format!(
                    "{} {name} in namespace {} exists already with a different spec: stop that instance first, or start this one under another name",
                    K::kind(&Default::default()),
                    self.config.namespace
                )))
            }
            Err(error) => Err(self.error::<K>(error, "create", &name)),
        }
    }

    /// Deletes the named object; one that is not there is deleted already.
    async fn delete<K>(&self, name: &str) -> Result<(), RuntimeError>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + std::fmt::Debug + DeserializeOwned,
        <K as Resource>::DynamicType: Default,
    {
        match self.api::<K>().delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(error) => Err(self.error::<K>(error, "delete", name)),
        }
    }

    /// What a failed API call means for the caller, naming what we tried, on what and where.
    fn error<K: Resource>(&self, error: kube::Error, verb: &str, name: &str) -> RuntimeError
    where
        <K as Resource>::DynamicType: Default,
    {
        let kind = K::kind(&Default::default()).to_lowercase();
        self.error_on(error, verb, &format!("{kind} {name}"), &K::plural(&Default::default()))
    }

    /// [`Self::error`] for `verb` on `what` ("pod x"), which RBAC calls `resource` ("pods").
    fn error_on(&self, error: kube::Error, verb: &str, what: &str, resource: &str) -> RuntimeError {
        let namespace = &self.config.namespace;
        let what = format!("{verb} {what} in namespace {namespace}");
        let kube::Error::Api(status) = error else {
            return RuntimeError::Unavailable(format!("could not {what}: {error}"));
        };
        let answer = format!("Kubernetes answered {} {}: {}", status.code, status.reason, status.message);
        match status.code {
            401 | 403 => RuntimeError::Forbidden(format!(
                "not allowed to {what} ({answer}); grant the runtime's service account `{verb}` on {resource} in namespace {namespace}"
            )),
            409 => RuntimeError::Conflict(format!("could not {what}: {answer}")),
            404 => RuntimeError::Invalid(format!("could not {what}: {answer}; does namespace {namespace} exist?")),
            400 | 422 => RuntimeError::Invalid(format!("Kubernetes rejected the request to {what}: {answer}")),
            _ => RuntimeError::Unavailable(format!("could not {what}: {answer}")),
        }
    }
}

/// The labels of every object of one instance.
fn labels(name: &str, spec: &InstanceSpec) -> BTreeMap<String, String> {
    [
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (ENVIRONMENT_LABEL.to_string(), spec.environment.to_string()),
        (DEPLOYMENT_LABEL.to_string(), spec.deployment.to_string()),
        (INSTANCE_LABEL.to_string(), name.to_string()),
    ]
    .into()
}

/// A short hash of an object's spec as we send it (never of secret values: specs hold none).
fn fingerprint(spec: &impl Serialize) -> String {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    hex::encode(&Sha256::digest(&json)[..16])
}

fn spec_hash<K: Resource>(object: &K) -> Option<&String> {
    object.meta().annotations.as_ref().and_then(|a| a.get(SPEC_HASH))
}

/// Where a Pod stands, from its phase, its container's state and its readiness.
pub fn pod_status(pod: &Pod) -> InstanceStatus {
    if pod.metadata.deletion_timestamp.is_some() {
        return InstanceStatus::Failed("the pod is being deleted".into());
    }
    let Some(status) = &pod.status else { return InstanceStatus::Pending };
    let container = status.container_statuses.iter().flatten().find(|c| c.name == CONTAINER);
    let state = container.and_then(|c| c.state.as_ref());
    if let Some(terminated) = state.and_then(|s| s.terminated.as_ref()) {
        return match terminated.reason.as_deref() {
            Some("OOMKilled") => InstanceStatus::Failed("the app ran out of memory (killed at its memory limit)".into()),
            _ => InstanceStatus::Exited(terminated.exit_code),
        };
    }
    if let Some(waiting) = state.and_then(|s| s.waiting.as_ref()) {
        // These do not pass by waiting: the image or the container's configuration is wrong.
        const STUCK: &[&str] =
            &["ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"];
        if let Some(reason) = waiting.reason.as_deref().filter(|r| STUCK.contains(r)) {
            return InstanceStatus::Failed(format!("{reason}: {}", waiting.message.as_deref().unwrap_or("the container cannot start")));
        }
    }
    let why = || [status.reason.as_deref(), status.message.as_deref()].into_iter().flatten().collect::<Vec<_>>().join(": ");
    match status.phase.as_deref() {
        Some("Running") if container.is_some_and(|c| c.ready) => InstanceStatus::Ready,
        Some("Running") => InstanceStatus::Running,
        Some("Succeeded") => InstanceStatus::Exited(0),
        Some("Failed") => InstanceStatus::Failed(match why() {
            reason if reason.is_empty() => "the pod failed".into(),
            reason => format!("the pod failed: {reason}"),
        }),
        Some("Unknown") => InstanceStatus::Failed("the pod's node does not answer (phase Unknown)".into()),
        _ => InstanceStatus::Pending,
    }
}

#[async_trait::async_trait]
impl PreviewRuntime for KubernetesRuntime {
    async fn start(&self, spec: &InstanceSpec) -> Result<InstanceHandle, RuntimeError> {
        spec.check()?;
        let name = dns_label(&spec.name);
        // The Secret first: a Pod whose Secret is missing waits in CreateContainerConfigError.
        if !spec.secrets.is_empty() {
            let secret = self.secret(&name, spec);
            self.create(&secret, |existing: &Secret| existing.data == secret.data).await?;
        }
        let pod = self.pod(&name, spec);
        self.create(&pod, |existing: &Pod| spec_hash(existing) == spec_hash(&pod)).await?;
        let service = self.service(&name, spec);
        self.create(&service, |existing: &Service| spec_hash(existing) == spec_hash(&service)).await?;
        let policy = self.network_policy(&name, spec);
        self.create(&policy, |existing: &NetworkPolicy| spec_hash(existing) == spec_hash(&policy)).await?;
        tracing::info!(instance = %name, namespace = %self.config.namespace, deployment = %spec.deployment, "started a preview pod");
        Ok(InstanceHandle { name, port: spec.port })
    }

    async fn status(&self, handle: &InstanceHandle) -> Result<InstanceStatus, RuntimeError> {
        match self.api::<Pod>().get_opt(&handle.name).await {
            Ok(Some(pod)) => Ok(pod_status(&pod)),
            Ok(None) => Ok(InstanceStatus::Failed(format!("pod {} in namespace {} no longer exists", handle.name, self.config.namespace))),
            Err(error) => Err(self.error::<Pod>(error, "get", &handle.name)),
        }
    }

    fn address(&self, handle: &InstanceHandle) -> Address {
        Address::Tcp(format!("{}.{}.svc:{}", handle.name, self.config.namespace, handle.port))
    }

    async fn stop(&self, handle: &InstanceHandle) -> Result<(), RuntimeError> {
        // The policy last: until the Pod is gone, nothing but the proxy may reach it.
        self.delete::<Pod>(&handle.name).await?;
        self.delete::<Service>(&handle.name).await?;
        self.delete::<Secret>(&handle.name).await?;
        self.delete::<NetworkPolicy>(&handle.name).await?;
        tracing::info!(instance = %handle.name, namespace = %self.config.namespace, "stopped a preview pod");
        Ok(())
    }

    async fn logs(&self, handle: &InstanceHandle, lines: usize) -> Result<String, RuntimeError> {
        let params = LogParams { container: Some(CONTAINER.into()), tail_lines: Some(lines as i64), ..LogParams::default() };
        let text = match self.api::<Pod>().logs(&handle.name, &params).await {
            Ok(text) => text,
            // Gone, or not started yet ("container \"app\" in pod … is waiting to start"): no output.
            Err(kube::Error::Api(status)) if status.is_not_found() || status.code == 400 => return Ok(String::new()),
            Err(error) => return Err(self.error_on(error, "get", &format!("the log of pod {}", handle.name), "pods/log")),
        };
        // The app may print its secrets; read them back to hide them.
        let secret = self.api::<Secret>().get_opt(&handle.name).await.map_err(|e| self.error::<Secret>(e, "get", &handle.name))?;
        let values = secret.and_then(|s| s.data).into_iter().flatten().map(|(_, v)| String::from_utf8_lossy(&v.0).into_owned());
        let redactor = Redactor::new(values);
        Ok(text.lines().map(|line| redactor.redact(line) + "\n").collect())
    }
}
