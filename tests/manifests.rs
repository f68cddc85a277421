//! The deployment manifests agree with the binaries: `kubectl kustomize`
//! renders both overlays, and for every Deployment the binary it runs
//! accepts its `RECMESH_*` environment (the same loader, unknown keys
//! refused), its container ports are the ports that config serves on, its
//! probes point at them, its Service forwards to them, and every upstream
//! address in the config names a Service and port that exist. The Helm
//! chart passes `helm lint --strict` and what `helm template` renders is
//! checked the same way (default values, and prod-like ones: a data volume,
//! a Qdrant server, a ServiceMonitor); so are its values, read directly.
//!
//! Every pod meets Pod Security "restricted" (non-root, no privilege
//! escalation, no capabilities, seccomp, read-only root with /tmp mounted),
//! an HPA-managed Deployment sets no replicas, and every rendered object
//! passes `kubernetes-validate --strict` for the Kubernetes version the
//! manifests target (installed by tests/run.sh).

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

/// The Kubernetes version the manifests target (the oldest supported minor
/// they are validated against).
const KUBERNETES_VERSION: &str = "1.30.0";

/// Prod-like chart values: a data volume (the trainer's bundle served by
/// retrieval and ranking), a Qdrant server, a ServiceMonitor for
/// kube-prometheus-stack, a toleration.
const HELM_PROD: &[&str] = &[
    "--set",
    "data.existingClaim=recmesh-data",
    "--set",
    "qdrant.url=http://qdrant:6334",
    "--set",
    "serviceMonitor.enabled=true",
    "--set",
    "serviceMonitor.labels.release=kube-prometheus-stack",
    "--set",
    "prometheusRule.enabled=true",
    "--set",
    "tolerations[0].key=dedicated",
    "--set",
    "tolerations[0].operator=Exists",
];

/// `helm lint`, then `helm template rm` of the chart: the objects a
/// `helm install rm helm/recmesh` would create, with the default values.
fn render_helm() -> Vec<Value> {
    render_helm_with(&[])
}

/// As [`render_helm`], with `helm template` arguments `extra`.
fn render_helm_with(extra: &[&str]) -> Vec<Value> {
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
    let mut args = vec!["template", "rm", "--namespace", "recmesh"];
    args.extend_from_slice(extra);
    let text = helm(&args);
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
    let autoscaled: Vec<&str> = docs
        .iter()
        .filter(|d| kind(d) == "HorizontalPodAutoscaler")
        .map(|d| s(&d["spec"]["scaleTargetRef"]["name"]))
        .collect();
    for d in docs.iter().filter(|d| kind(d) == "CronJob") {
        let name = s(&d["metadata"]["name"]);
        check_restricted(
            &format!("{overlay}/{name}"),
            &d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        );
    }
    let mut checked = 0;
    for d in docs.iter().filter(|d| kind(d) == "Deployment") {
        let name = s(&d["metadata"]["name"]).to_owned();
        check_restricted(&format!("{overlay}/{name}"), &d["spec"]["template"]["spec"]);
        if autoscaled.contains(&name.as_str()) {
            assert!(
                d["spec"]["replicas"].is_null(),
                "{overlay}/{name}: an HPA owns its replicas; setting them resets its choice at every apply"
            );
        }
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

/// Pod Security "restricted" (and a bit more) for one pod spec.
fn check_restricted(what: &str, pod: &Value) {
    let sc = &pod["securityContext"];
    assert_eq!(
        sc["runAsNonRoot"].as_bool(),
        Some(true),
        "{what}: runAsNonRoot"
    );
    assert!(
        sc["runAsUser"].as_u64().is_some_and(|u| u > 0),
        "{what}: runAsUser"
    );
    assert_eq!(
        s(&sc["seccompProfile"]["type"]),
        "RuntimeDefault",
        "{what}: seccompProfile"
    );
    assert_eq!(
        pod["automountServiceAccountToken"].as_bool(),
        Some(false),
        "{what}: no service-account token"
    );
    for c in pod["containers"].as_sequence().cloned().unwrap_or_default() {
        let cs = &c["securityContext"];
        let name = s(&c["name"]);
        assert_eq!(
            cs["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{what}/{name}: allowPrivilegeEscalation"
        );
        assert_eq!(
            cs["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{what}/{name}: readOnlyRootFilesystem"
        );
        let drops: Vec<&str> = cs["capabilities"]["drop"]
            .as_sequence()
            .map(|d| d.iter().map(s).collect())
            .unwrap_or_default();
        assert_eq!(drops, ["ALL"], "{what}/{name}: capabilities");
        let mounts: Vec<&str> = c["volumeMounts"]
            .as_sequence()
            .map(|m| m.iter().map(|m| s(&m["mountPath"])).collect())
            .unwrap_or_default();
        assert!(
            mounts.contains(&"/tmp"),
            "{what}/{name}: a read-only root needs /tmp mounted: {mounts:?}"
        );
    }
}

/// A validator installed by tests/run.sh (a Python virtualenv of pinned
/// PyPI packages under ~/.cache/recmesh/tools/py).
fn python_tool(name: &str) -> String {
    format!(
        "{}/.cache/recmesh/tools/py/bin/{name}",
        std::env::var("HOME").unwrap_or_default()
    )
}

/// Writes rendered objects to `dir/what.yaml`, leaving out custom
/// resources when `core_only` (validators without their schemas).
fn write_docs(dir: &Path, what: &str, docs: &[Value], core_only: bool) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("scratch dir");
    let file = dir.join(format!("{}.yaml", what.replace('/', "-")));
    let text: String = docs
        .iter()
        .filter(|d| !core_only || !s(&d["apiVersion"]).contains("monitoring.coreos.com"))
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).expect("yaml")))
        .collect();
    std::fs::write(&file, text).expect("write");
    file
}

fn scratch(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("recmesh-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `kubernetes-validate --strict` on rendered objects (the ServiceMonitor,
/// a custom resource whose schema it does not have, is left out).
fn validate(what: &str, docs: &[Value]) {
    let file = write_docs(&scratch("validate"), what, docs, true);
    let tool = python_tool("kubernetes-validate");
    let out = Command::new(&tool)
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool}: {e} (tests/run.sh installs kubernetes-validate from PyPI)")
        });
    assert!(
        out.status.success(),
        "kubernetes-validate {what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// checkov with tests/checkov.yaml (every check, except the skips it
/// lists with their reasons).
fn checkov(args: &[&str]) {
    let tool = python_tool("checkov");
    let out = Command::new(&tool)
        .arg("--config-file")
        .arg(repo().join("tests/checkov.yaml"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (tests/run.sh installs checkov from PyPI)"));
    assert!(
        out.status.success(),
        "checkov {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_rendering_passes_checkov() {
    // The Kubernetes framework over every rendering...
    let dir = scratch("checkov");
    for overlay in ["dev", "prod"] {
        write_docs(&dir, overlay, &render(overlay), false);
    }
    write_docs(&dir, "helm", &render_helm(), false);
    write_docs(&dir, "helm-prod", &render_helm_with(HELM_PROD), false);
    checkov(&[
        "--framework",
        "kubernetes",
        "-d",
        dir.to_str().expect("utf-8 path"),
    ]);
    // ...and the Helm framework, which renders the chart itself.
    let chart = repo().join("helm/recmesh");
    let values = repo().join("tests/checkov-helm-values.yaml");
    checkov(&[
        "--framework",
        "helm",
        "-d",
        chart.to_str().expect("utf-8 path"),
        "--var-file",
        values.to_str().expect("utf-8 path"),
    ]);
}

#[test]
fn every_rendering_passes_kubernetes_validate() {
    for overlay in ["dev", "prod"] {
        validate(overlay, &render(overlay));
    }
    validate("helm", &render_helm());
    validate("helm-prod", &render_helm_with(HELM_PROD));
}

#[test]
fn the_prod_like_chart_wires_training_to_serving() {
    let docs = render_helm_with(HELM_PROD);
    assert_eq!(check_docs("helm-prod", &docs), 6, "six Deployments");
    let by = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| s(&d["kind"]) == kind && s(&d["metadata"]["name"]) == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    // The trainer writes the bundle where retrieval and ranking read it, on
    // the same claim.
    let trainer = &by("CronJob", "rm-trainer")["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    let args: Vec<&str> = trainer["containers"][0]["args"]
        .as_sequence()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    let out = args
        .iter()
        .position(|a| *a == "--out")
        .map(|i| args[i + 1])
        .expect("--out");
    let claim = |pod: &Value| -> Vec<String> {
        pod["volumes"]
            .as_sequence()
            .map(|v| {
                v.iter()
                    .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(claim(trainer), ["recmesh-data"]);
    for service in ["rm-retrieval", "rm-ranking"] {
        let pod = &by("Deployment", service)["spec"]["template"]["spec"];
        let env = &pod["containers"][0]["env"];
        let bundle_dir = env
            .as_sequence()
            .and_then(|e| e.iter().find(|e| s(&e["name"]) == "RECMESH_BUNDLE_DIR"))
            .map(|e| s(&e["value"]))
            .unwrap_or_else(|| panic!("{service}: RECMESH_BUNDLE_DIR"));
        assert_eq!(
            bundle_dir, out,
            "{service} serves what the trainer publishes"
        );
        assert_eq!(
            claim(pod),
            ["recmesh-data"],
            "{service}: the trainer's claim"
        );
    }
    // The ServiceMonitors keep the series' own `service` label and carry
    // the labels kube-prometheus-stack selects on.
    let monitors: Vec<&Value> = docs
        .iter()
        .filter(|d| s(&d["kind"]) == "ServiceMonitor")
        .collect();
    assert_eq!(monitors.len(), 6);
    for m in monitors {
        assert_eq!(
            m["spec"]["endpoints"][0]["honorLabels"].as_bool(),
            Some(true)
        );
        assert_eq!(
            s(&m["metadata"]["labels"]["release"]),
            "kube-prometheus-stack"
        );
    }
    // No default admin token: a random one when none is given.
    let secret = by("Secret", "rm-admin");
    let token = s(&secret["stringData"]["token"]);
    assert!(token.len() >= 32 && token != "change-me", "{token}");
}

/// Runs `promtool` with `args` in `dir`.
fn promtool(dir: &Path, args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs (tests/run.sh installs it when missing)");
    assert!(
        out.status.success(),
        "promtool {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The alerting rules as the prod overlay and the prod-like chart render
/// them: the same groups as the rules file, valid for `promtool check
/// rules`, and behaving as tests/rules.test.yaml says under `promtool test
/// rules` (latency and error burn rates, degraded share, guardrail stop,
/// SRM: firing and quiet cases).
#[test]
fn the_alerting_rules_pass_promtool_and_their_unit_tests() {
    let file: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("helm/recmesh/rules/prometheusrule.yaml"))
            .expect("rules file"),
    )
    .expect("yaml");
    let groups = &file["spec"]["groups"];
    assert!(groups.as_sequence().is_some_and(|g| !g.is_empty()));
    for (what, docs) in [
        ("prod", render("prod")),
        ("helm-prod", render_helm_with(HELM_PROD)),
    ] {
        let rules: Vec<&Value> = docs
            .iter()
            .filter(|d| s(&d["kind"]) == "PrometheusRule")
            .collect();
        assert_eq!(rules.len(), 1, "{what}: one PrometheusRule");
        assert_eq!(
            &rules[0]["spec"]["groups"], groups,
            "{what}: the rules file's groups"
        );
    }
    let dir = scratch("rules");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let mut plain = serde_yaml::Mapping::new();
    plain.insert("groups".into(), groups.clone());
    std::fs::write(
        dir.join("recmesh.rules.yaml"),
        serde_yaml::to_string(&plain).expect("yaml"),
    )
    .expect("write rules");
    std::fs::copy(
        repo().join("tests/rules.test.yaml"),
        dir.join("rules.test.yaml"),
    )
    .expect("copy rule tests");
    promtool(&dir, &["check", "rules", "recmesh.rules.yaml"]);
    promtool(&dir, &["test", "rules", "rules.test.yaml"]);
}

#[test]
fn the_chart_refuses_bad_values_by_name() {
    for (set, named) in [
        ("services.gateway.port=nope", "services.gateway.port"),
        ("imagee.tag=x", "imagee"),
        ("gatewayService.type=Magic", "gatewayService.type"),
    ] {
        let out = Command::new("helm")
            .args(["template", "rm"])
            .arg(repo().join("helm/recmesh"))
            .args(["--set", set])
            .output()
            .expect("helm runs (tests/run.sh installs it when missing)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set} accepted");
        assert!(err.contains(named), "{set}: {err}");
    }
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
