//! The deployment manifests agree with the binaries: `kubectl kustomize`
//! renders both overlays, and for every Deployment the binary it runs
//! accepts its `RECMESH_*` environment (the same loader, unknown keys
//! refused), its container ports are the ports that config serves on, its
//! probes point at them, its Service forwards to them, and every upstream
//! address in the config names a Service and port that exist. The Helm
//! chart passes `helm lint --strict` and what `helm template` renders is
//! checked the same way; so are its values, read directly.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;

use recmesh_server::config::{ServerConfig, ServiceConfig, load_with_env};
use serde_yaml::Value;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn render(overlay: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join("k8s/overlays").join(overlay))
        .output()
        .expect("kubectl runs (tests/run.sh installs it when missing)");
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("yaml"))
        .collect()
}

use serde::Deserialize;

/// The server section and upstream addresses of the config a binary builds
/// from `env`; the error names what it refuses.
fn check_env(
    binary: &str,
    env: &[(String, String)],
) -> Result<(ServerConfig, Vec<String>), String> {
    fn load<T: ServiceConfig>(env: &[(String, String)]) -> Result<T, String> {
        load_with_env::<T>(env).map_err(|e| e.to_string())
    }
    Ok(match binary {
        "recmesh-gateway" => {
            let c: recmesh_gateway::Config = load(env)?;
            let u = &c.upstreams;
            let ups = vec![
                u.experiments.clone(),
                u.features.clone(),
                u.retrieval.clone(),
                u.ranking.clone(),
                u.reranker.clone(),
            ];
            (c.server, ups)
        }
        "recmesh-retrieval" => (load::<recmesh_retrieval::Config>(env)?.server, vec![]),
        "recmesh-ranking" => {
            let c: recmesh_ranking::Config = load(env)?;
            (c.server, vec![c.features_addr])
        }
        "recmesh-reranker" => (load::<recmesh_reranker::Config>(env)?.server, vec![]),
        "recmesh-experiments" => {
            let c: recmesh_experiments::Config = load(env)?;
            (c.server, vec![c.features_addr])
        }
        "recmesh-features" => (load::<recmesh_features::Config>(env)?.server, vec![]),
        other => return Err(format!("unknown binary {other}")),
    })
}

/// `host:port` of an upstream, `http://host:port` or `dns://host:port`.
fn host_port(up: &str) -> &str {
    up.trim_start_matches("http://")
        .trim_start_matches("dns://")
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn check_overlay(overlay: &str) -> usize {
    check_docs(overlay, &render(overlay))
}

/// `helm lint`, then `helm template rm` of the chart: the objects a
/// `helm install rm helm/recmesh` would create, with the default values.
fn render_helm() -> Vec<Value> {
    let chart = repo().join("helm/recmesh");
    let helm = |args: &[&str]| {
        let out = Command::new("helm")
            .args(args)
            .arg(&chart)
            .output()
            .expect("helm runs (tests/run.sh installs it when missing)");
        assert!(
            out.status.success(),
            "helm {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    helm(&["lint", "--strict"]);
    let text = helm(&["template", "rm"]);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("yaml"))
        .filter(|d| !d.is_null())
        .collect()
}

/// The checks of the module docs over rendered objects; `overlay` names
/// them in messages. Returns how many Deployments were checked.
fn check_docs(overlay: &str, docs: &[Value]) -> usize {
    let kind = |d: &Value| s(&d["kind"]).to_owned();
    // Service name → port name → (port, targetPort name).
    let mut services: HashMap<String, BTreeMap<String, (u64, String)>> = HashMap::new();
    for d in docs.iter().filter(|d| kind(d) == "Service") {
        let ports = d["spec"]["ports"]
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        services.insert(
            s(&d["metadata"]["name"]).to_owned(),
            ports
                .iter()
                .map(|p| {
                    (
                        s(&p["name"]).to_owned(),
                        (
                            p["port"].as_u64().unwrap_or(0),
                            s(&p["targetPort"]).to_owned(),
                        ),
                    )
                })
                .collect(),
        );
    }
    let mut checked = 0;
    for d in docs.iter().filter(|d| kind(d) == "Deployment") {
        let name = s(&d["metadata"]["name"]).to_owned();
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        let binary = s(&c["command"][0])
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let env: Vec<(String, String)> = c["env"]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|e| (s(&e["name"]).to_owned(), s(&e["value"]).to_owned()))
            .collect();
        let (server, upstreams) =
            check_env(&binary, &env).unwrap_or_else(|e| panic!("{overlay}/{name}: {e}"));
        let ports: HashMap<String, u64> = c["ports"]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| {
                (
                    s(&p["name"]).to_owned(),
                    p["containerPort"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let grpc = u64::from(server.grpc_addr.port());
        let admin = u64::from(server.admin_addr.port());
        assert!(
            server.grpc_addr.ip().is_unspecified(),
            "{overlay}/{name}: must listen on all interfaces"
        );
        assert_eq!(
            ports.get("grpc"),
            Some(&grpc),
            "{overlay}/{name}: grpc containerPort"
        );
        assert_eq!(
            ports.get("admin"),
            Some(&admin),
            "{overlay}/{name}: admin containerPort"
        );
        assert_eq!(
            c["readinessProbe"]["grpc"]["port"].as_u64(),
            Some(grpc),
            "{overlay}/{name}: readiness"
        );
        assert_eq!(
            s(&c["livenessProbe"]["httpGet"]["path"]),
            "/healthz",
            "{overlay}/{name}"
        );
        assert_eq!(
            s(&c["livenessProbe"]["httpGet"]["port"]),
            "admin",
            "{overlay}/{name}"
        );
        let svc = services
            .get(&name)
            .unwrap_or_else(|| panic!("{overlay}: no Service {name}"));
        assert_eq!(
            svc.get("grpc"),
            Some(&(grpc, "grpc".to_owned())),
            "{overlay}: Service {name}"
        );
        for up in upstreams {
            let host_port = host_port(&up);
            let (host, port) = host_port.split_once(':').expect("host:port");
            let target = services
                .get(host)
                .unwrap_or_else(|| panic!("{overlay}/{name}: upstream {up} names no Service"));
            assert_eq!(
                target.get("grpc").map(|p| p.0),
                port.parse().ok(),
                "{overlay}/{name}: upstream {up} is not the Service's grpc port"
            );
        }
        checked += 1;
    }
    checked
}

#[test]
fn kustomize_overlays_match_the_binaries() {
    assert_eq!(check_overlay("dev"), 6, "six Deployments");
    assert_eq!(check_overlay("prod"), 6, "six Deployments");
}

#[test]
fn the_helm_chart_renders_and_matches_the_binaries() {
    let docs = render_helm();
    assert_eq!(check_docs("helm", &docs), 6, "six Deployments");
    let kinds: Vec<&str> = docs.iter().map(|d| s(&d["kind"])).collect();
    for kind in ["Service", "PodDisruptionBudget"] {
        assert_eq!(
            kinds.iter().filter(|k| **k == kind).count(),
            6,
            "one {kind} per service: {kinds:?}"
        );
    }
}

#[test]
fn helm_values_match_the_binaries() {
    let text =
        std::fs::read_to_string(repo().join("helm/recmesh/values.yaml")).expect("values.yaml");
    let values: Value = serde_yaml::from_str(&text).expect("yaml");
    let services = values["services"].as_mapping().expect("services");
    assert_eq!(services.len(), 6);
    let mut ports = HashMap::new();
    for (name, svc) in services {
        ports.insert(s(name).to_owned(), svc["port"].as_u64().expect("port"));
    }
    for (name, svc) in services {
        let name = s(name);
        let port = svc["port"].as_u64().expect("port");
        // What the chart's template sets for every service, then its env.
        let mut env = vec![
            (
                "RECMESH_SERVER__GRPC_ADDR".to_owned(),
                format!("0.0.0.0:{port}"),
            ),
            (
                "RECMESH_SERVER__ADMIN_ADDR".to_owned(),
                format!("0.0.0.0:{}", port + 1000),
            ),
            (
                "RECMESH_SERVER__SHUTDOWN_DELAY_MS".to_owned(),
                values["shutdownDelayMs"]
                    .as_u64()
                    .expect("shutdownDelayMs")
                    .to_string(),
            ),
            (
                "RECMESH_SERVER__CONSUL__AGENT".to_owned(),
                format!(
                    "http://10.0.0.1:{}",
                    values["consul"]["agentPort"].as_u64().expect("agentPort")
                ),
            ),
        ];
        for (k, v) in svc["env"].as_mapping().cloned().unwrap_or_default() {
            // Templated values (`{{ ... }}`) are filled from other values; the
            // service addresses the chart builds are checked below.
            let v = s(&v)
                .replace("{{ .Release.Name }}-", "recmesh-")
                .replace("{{ .Values.redis.url }}", s(&values["redis"]["url"]));
            env.push((s(&k).to_owned(), v));
        }
        let (server, upstreams) = check_env(&format!("recmesh-{name}"), &env)
            .unwrap_or_else(|e| panic!("helm {name}: {e}"));
        assert_eq!(u64::from(server.grpc_addr.port()), port);
        assert_eq!(u64::from(server.admin_addr.port()), port + 1000);
        for up in upstreams {
            let (host, p) = host_port(&up).split_once(':').expect("host:port");
            let target = host.trim_start_matches("recmesh-");
            assert_eq!(
                ports.get(target).copied(),
                p.parse().ok(),
                "helm {name}: upstream {up}"
            );
        }
    }
}
