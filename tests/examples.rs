//! The deployment examples under `examples/` (issue #5): the config in the Kubernetes ConfigMap
//! loads as the StatefulSet's pods would load it (instance from the pod name, password from the
//! Secret), the StatefulSet's probes, port, grace period and per-replica spool volume fit that
//! config (#15), and the systemd unit runs, reloads, stops and restarts the bridge as documented.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use mqbridge::config::{load::load_plan_with_env, schema::default_drain_timeout};
use serde::Deserialize;

fn example(path: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(path);
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

/// Parses one YAML document into `T` (fields not in `T` are ignored).
fn yaml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> T {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Yaml))
        .build()
        .and_then(|c| c.try_deserialize())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// The parts of the Kubernetes objects these tests look at.

#[derive(Deserialize)]
struct Metadata {
    name: String,
}

#[derive(Deserialize)]
struct ConfigMap {
    kind: String,
    metadata: Metadata,
    data: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct StatefulSet {
    kind: String,
    spec: StatefulSetSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatefulSetSpec {
    replicas: u32,
    template: PodTemplate,
    #[serde(default)]
    volume_claim_templates: Vec<ClaimTemplate>,
}

#[derive(Deserialize)]
struct ClaimTemplate {
    metadata: Metadata,
}

#[derive(Deserialize)]
struct PodTemplate {
    spec: PodSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    termination_grace_period_seconds: u64,
    containers: Vec<Container>,
    volumes: Vec<Volume>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    args: Vec<String>,
    env: Vec<EnvVar>,
    ports: Vec<Port>,
    liveness_probe: Probe,
    readiness_probe: Probe,
    resources: Resources,
    volume_mounts: Vec<VolumeMount>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvVar {
    name: String,
    value: Option<String>,
    value_from: Option<ValueFrom>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ValueFrom {
    field_ref: Option<FieldRef>,
    secret_key_ref: Option<SecretKeyRef>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FieldRef {
    field_path: String,
}

#[derive(Deserialize)]
struct SecretKeyRef {
    name: String,
    key: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Port {
    name: String,
    container_port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    http_get: HttpGet,
}

#[derive(Deserialize)]
struct HttpGet {
    path: String,
    port: String,
}

#[derive(Deserialize)]
struct Resources {
    requests: BTreeMap<String, String>,
    limits: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeMount {
    name: String,
    mount_path: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Volume {
    name: String,
    config_map: Option<Metadata>,
}

const POD_NAME: &str = "mqbridge-1";
const SECRET_VALUE: &str = "from-the-secret";

/// The environment a pod of `container` gets: the pod name for `metadata.name`, a stand-in for
/// every Secret value.
fn pod_env(container: &Container) -> Vec<(String, String)> {
    container
        .env
        .iter()
        .map(|e| {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (
                    None,
                    Some(ValueFrom {
                        field_ref: Some(f), ..
                    }),
                ) => {
                    assert_eq!(f.field_path, "metadata.name", "{}", e.name);
                    POD_NAME.to_owned()
                }
                (
                    None,
                    Some(ValueFrom {
                        secret_key_ref: Some(s),
                        ..
                    }),
                ) => {
                    assert!(!s.name.is_empty() && !s.key.is_empty(), "{}", e.name);
                    SECRET_VALUE.to_owned()
                }
                _ => panic!("env {} has neither a value nor a valueFrom", e.name),
            };
            (e.name.clone(), value)
        })
        .collect()
}

#[test]
fn the_kubernetes_config_loads_as_a_pod_loads_it() {
    let (cm_path, cm_text) = example("kubernetes/configmap.yaml");
    let config_map: ConfigMap = yaml(&cm_path, &cm_text);
    let (set_path, set_text) = example("kubernetes/statefulset.yaml");
    let set: StatefulSet = yaml(&set_path, &set_text);
    assert_eq!(config_map.kind, "ConfigMap");
    assert_eq!(set.kind, "StatefulSet");
    let pod = &set.spec.template.spec;
    let container = &pod.containers[0];

    // The file the container is told to read is the ConfigMap's key, where the volume mounts it.
    let at = container
        .args
        .iter()
        .position(|a| a == "-c")
        .expect("run -c FILE");
    assert_eq!(container.args[0], "run");
    let file = Path::new(&container.args[at + 1]);
    let mount = container
        .volume_mounts
        .iter()
        .find(|m| file.starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("nothing mounted at {}", file.display()));
    let volume = pod.volumes.iter().find(|v| v.name == mount.name).unwrap();
    assert_eq!(
        volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some(config_map.metadata.name.as_str())
    );
    let key = file.file_name().unwrap().to_str().unwrap();
    let toml = config_map
        .data
        .get(key)
        .unwrap_or_else(|| panic!("the ConfigMap has no {key:?}"));

    // Loaded with the pod's environment, exactly as `mqbridge run` in the pod would.
    let dir = std::env::temp_dir().join(format!("mqbridge-examples-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(key);
    fs::write(&path, toml).unwrap();
    let env = pod_env(container);
    let plan = load_plan_with_env(&path, env.clone());
    let _ = fs::remove_dir_all(&dir);
    let plan = plan.unwrap_or_else(|e| panic!("the ConfigMap's {key}: {e}"));

    assert_eq!(plan.bridge.instance, POD_NAME, "instance from the pod name");
    let mut passwords = 0;
    for (var, _) in env.iter().filter(|(v, _)| v.ends_with("__PASSWORD")) {
        let broker = var
            .strip_prefix("MQBRIDGE__BROKERS__")
            .and_then(|b| b.strip_suffix("__PASSWORD"))
            .unwrap_or_else(|| panic!("{var} does not name a broker's password"))
            .to_ascii_lowercase();
        let b = plan
            .brokers
            .get(&broker)
            .unwrap_or_else(|| panic!("{var}: no broker {broker:?} in the config"));
        assert_eq!(b.password.as_ref().map(|p| p.expose()), Some(SECRET_VALUE));
        passwords += 1;
    }
    assert!(passwords > 0, "no password from a Secret");
    assert!(
        !toml.contains("password ="),
        "the ConfigMap must not carry a password"
    );

    // Probes on the admin endpoint's port.
    let admin = plan.admin_listen.expect("[admin] listen, for the probes");
    assert!(
        admin.ip().is_unspecified(),
        "probes come from outside the pod: listen on 0.0.0.0"
    );
    for (probe, path) in [
        (&container.liveness_probe, "/healthz"),
        (&container.readiness_probe, "/readyz"),
    ] {
        assert_eq!(probe.http_get.path, path);
        let port = container
            .ports
            .iter()
            .find(|p| {
                p.name == probe.http_get.port || p.container_port.to_string() == probe.http_get.port
            })
            .unwrap_or_else(|| {
                panic!("probe port {} is not a container port", probe.http_get.port)
            });
        assert_eq!(port.container_port, admin.port());
    }

    // Every spool on a volume of the replica's own (a claim template), not the container's
    // (read-only) root or a volume the replicas would share.
    let spooled: Vec<_> = plan
        .routes
        .iter()
        .filter_map(|r| r.spool.as_ref())
        .collect();
    assert!(!spooled.is_empty(), "the example shows a spool");
    for spool in spooled {
        let mount = container
            .volume_mounts
            .iter()
            .find(|m| spool.dir.starts_with(&m.mount_path))
            .unwrap_or_else(|| panic!("nothing mounted at {}", spool.dir.display()));
        assert!(
            set.spec
                .volume_claim_templates
                .iter()
                .any(|c| c.metadata.name == mount.name),
            "{} is not a per-replica volume",
            mount.name
        );
        assert!(
            spool.dir.to_string_lossy().contains(POD_NAME),
            "each replica's spool is under its own instance: {}",
            spool.dir.display()
        );
    }

    // Replicas of one bridge; time to drain before SIGKILL; bounded resources.
    assert_eq!(set.spec.replicas, 2);
    assert!(
        Duration::from_secs(pod.termination_grace_period_seconds)
            >= plan.bridge.drain_timeout + Duration::from_secs(5),
        "terminationGracePeriodSeconds {} leaves no time to drain ({:?})",
        pod.termination_grace_period_seconds,
        plan.bridge.drain_timeout
    );
    for res in ["cpu", "memory"] {
        assert!(
            container.resources.requests.contains_key(res),
            "requests.{res}"
        );
        assert!(container.resources.limits.contains_key(res), "limits.{res}");
    }
}

/// `[section]` → key → values (a key may repeat), comments and blank lines skipped.
fn unit_file(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a key=value line: {line:?}"));
        assert!(!current.is_empty(), "{line:?} before any section");
        sections
            .entry(current.clone())
            .or_default()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    sections
}

#[test]
fn the_systemd_unit_runs_reloads_and_drains_the_bridge() {
    let (_, text) = example("systemd/mqbridge.service");
    let unit = unit_file(&text);
    let service = &unit["Service"];
    let one = |key: &str| -> &str {
        match service.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("[Service] {key}: expected one value, found {other:?}"),
        }
    };
    assert_eq!(one("Type"), "simple");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/mqbridge run -c /etc/mqbridge/mqbridge.toml"
    );
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("Restart"), "on-failure");
    // An invalid config (exit 2) is not retried in a loop.
    assert_eq!(one("RestartPreventExitStatus"), "2");
    let stop = humantime::parse_duration(one("TimeoutStopSec")).expect("TimeoutStopSec");
    assert!(
        stop > default_drain_timeout() + Duration::from_secs(5),
        "TimeoutStopSec {stop:?} leaves no time to drain ({:?})",
        default_drain_timeout()
    );
    // Hardening.
    assert!(
        one("DynamicUser") == "yes" || service.contains_key("User"),
        "runs as root"
    );
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("ProtectHome"), "yes");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("CapabilityBoundingSet"), "");
    assert!(
        unit["Unit"]["After"]
            .iter()
            .any(|v| v.contains("network-online.target"))
    );
    assert_eq!(unit["Install"]["WantedBy"], ["multi-user.target"]);
}
