//! Experiments service: deterministic variant assignment, and the admin API
//! the A/B platform pushes experiment configs through.
//!
//! Assignment hashes (layer, user) into 10,000 buckets
//! (`recmesh_algo::assign`). The running experiments of one layer own
//! disjoint bucket ranges in config order, so a user is in at most one
//! experiment per layer; layers are independent. A pushed experiment is
//! validated in full (ids, traffic, weights, params against the pipeline's
//! schema, the layer's total traffic); a rejected push changes nothing.
//!
//! Pushes are kept in memory in this embedded version: a restart reloads the
//! experiments file (durable storage is issue #7).

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, RwLock};

use recmesh_algo::assign::{BUCKETS, bucket, pick_variant, share_buckets};
use recmesh_algo::params::VariantParams;
use recmesh_mesh::convert::{FieldError, check_id};
use recmesh_proto::v1::{
    self as pb, experiments_admin_server::ExperimentsAdminServer,
    experiments_server::ExperimentsServer,
};
use recmesh_server::GrpcServer;
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

/// Default gRPC port of the experiments service.
pub const DEFAULT_PORT: u16 = 50055;

/// Configuration of the experiments service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC and admin server.
    pub server: ServerConfig,
    /// TOML file of experiments loaded at start; empty: the built-in demo set.
    pub experiments_file: String,
    /// Bearer token the admin API requires. Empty: the admin API is open
    /// (for local demos only; a warning is logged at start).
    pub admin_token: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::on_port(DEFAULT_PORT),
            experiments_file: String::new(),
            admin_token: String::new(),
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.experiments_file.is_empty() {
            let text = std::fs::read_to_string(&self.experiments_file).map_err(|e| {
                ConfigError::invalid(
                    "experiments_file",
                    format!("{}: {e}", self.experiments_file),
                )
            })?;
            parse_file(&text).map_err(|e| {
                ConfigError::invalid(format!("experiments_file: {}", e.field), e.reason)
            })?;
        }
        Ok(())
    }
}

/// One variant of an experiment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VariantDef {
    /// Name, unique in the experiment; reported in responses.
    pub name: String,
    /// Relative weight.
    pub weight: u32,
    /// Pipeline params (see `recmesh_algo::params`).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

/// One experiment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExperimentDef {
    /// Unique id: lowercase letters, digits, `-` and `_`.
    pub id: String,
    /// Layer: experiments in one layer are mutually exclusive.
    pub layer: String,
    /// Share of the layer's users in the experiment, 0..=1.
    pub traffic: f64,
    /// `running` or `paused`.
    #[serde(default = "running")]
    pub status: String,
    /// Variants, at least one.
    pub variants: Vec<VariantDef>,
}

fn running() -> String {
    "running".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentsFile {
    #[serde(default)]
    experiments: Vec<ExperimentDef>,
}

/// The experiments served when no file is configured: one experiment on the
/// candidate count, so a demo shows assignments in every response.
pub const DEMO_EXPERIMENTS: &str = r#"
[[experiments]]
id = "candidate-count"
layer = "retrieval"
traffic = 1.0
status = "running"

[[experiments.variants]]
name = "control"
weight = 50

[[experiments.variants]]
name = "wide-retrieval"
weight = 50
params = { "retrieval.candidates" = "400", "rerank.category_cap" = "3" }
"#;

/// Parses and validates an experiments file into the set it describes.
pub fn parse_file(text: &str) -> Result<ExperimentSet, FieldError> {
    let file: ExperimentsFile =
        toml::from_str(text).map_err(|e| FieldError::new("toml", e.to_string()))?;
    let mut set = ExperimentSet::default();
    for (n, e) in file.experiments.into_iter().enumerate() {
        set.put(e, None).map_err(|err| {
            FieldError::new(format!("experiments[{n}].{}", err.field), err.reason)
        })?;
    }
    Ok(set)
}

fn validate(e: &ExperimentDef) -> Result<(), FieldError> {
    check_id("id", &e.id)?;
    if !e
        .id
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return Err(FieldError::new(
            "id",
            "must be lowercase letters, digits, `-` or `_`",
        ));
    }
    check_id("layer", &e.layer)?;
    if !(0.0..=1.0).contains(&e.traffic) || e.traffic.is_nan() {
        return Err(FieldError::new("traffic", "must be in 0.0..=1.0"));
    }
    if e.status != "running" && e.status != "paused" {
        return Err(FieldError::new("status", "must be `running` or `paused`"));
    }
    if e.variants.is_empty() {
        return Err(FieldError::new("variants", "needs at least one variant"));
    }
    let mut names = std::collections::HashSet::new();
    for (n, v) in e.variants.iter().enumerate() {
        check_id(&format!("variants[{n}].name"), &v.name)?;
        if !names.insert(v.name.as_str()) {
            return Err(FieldError::new(
                format!("variants[{n}].name"),
                format!("`{}` is used twice", v.name),
            ));
        }
        let params: HashMap<String, String> = v.params.clone().into_iter().collect();
        VariantParams::default().apply(&params).map_err(|err| {
            FieldError::new(format!("variants[{n}].params.{}", err.key), err.reason)
        })?;
    }
    if e.variants.iter().all(|v| v.weight == 0) {
        return Err(FieldError::new(
            "variants",
            "at least one weight must be above 0",
        ));
    }
    Ok(())
}

/// All experiments with their versions.
#[derive(Debug, Default, Clone)]
pub struct ExperimentSet {
    experiments: Vec<(ExperimentDef, u64)>,
    version: u64,
}

impl ExperimentSet {
    /// Validates and stores `e` (replacing one with the same id); returns its
    /// new version. `expected` is for optimistic concurrency (the version the
    /// caller last read).
    pub fn put(&mut self, e: ExperimentDef, expected: Option<u64>) -> Result<u64, FieldError> {
        validate(&e)?;
        let existing = self.experiments.iter().position(|(x, _)| x.id == e.id);
        if let (Some(want), Some(i)) = (expected, existing)
            && self.experiments[i].1 != want
        {
            return Err(FieldError::new(
                "version",
                format!("is {}, not {want}", self.experiments[i].1),
            ));
        }
        let layer_total: u32 = self
            .experiments
            .iter()
            .filter(|(x, _)| x.layer == e.layer && x.id != e.id)
            .map(|(x, _)| share_buckets(x.traffic))
            .sum::<u32>()
            + share_buckets(e.traffic);
        if layer_total > BUCKETS {
            return Err(FieldError::new(
                "traffic",
                format!(
                    "layer `{}` would be over-allocated ({:.2} of its users)",
                    e.layer,
                    f64::from(layer_total) / f64::from(BUCKETS)
                ),
            ));
        }
        self.version += 1;
        match existing {
            Some(i) => self.experiments[i] = (e, self.version),
            None => self.experiments.push((e, self.version)),
        }
        Ok(self.version)
    }

    /// The variants `user` is in, one per layer at most.
    pub fn assign(&self, user: &str) -> Vec<pb::Assignment> {
        let mut offsets: HashMap<&str, u32> = HashMap::new();
        let mut out = Vec::new();
        for (e, _) in &self.experiments {
            // Paused experiments keep their range so others do not shift.
            let offset = offsets.entry(e.layer.as_str()).or_insert(0);
            let start = *offset;
            *offset += share_buckets(e.traffic);
            if e.status != "running" {
                continue;
            }
            let weights: Vec<u32> = e.variants.iter().map(|v| v.weight).collect();
            if let Some(v) = pick_variant(bucket(&e.layer, user), start, e.traffic, &weights) {
                let variant = &e.variants[v];
                out.push(pb::Assignment {
                    experiment_id: e.id.clone(),
                    variant: variant.name.clone(),
                    params: variant.params.clone().into_iter().collect(),
                });
            }
        }
        out
    }
}

fn to_proto(e: &ExperimentDef, version: u64) -> pb::Experiment {
    pb::Experiment {
        id: e.id.clone(),
        layer: e.layer.clone(),
        traffic: e.traffic,
        status: e.status.clone(),
        version,
        variants: e
            .variants
            .iter()
            .map(|v| pb::Variant {
                name: v.name.clone(),
                weight: v.weight,
                params: v.params.clone().into_iter().collect(),
            })
            .collect(),
    }
}

fn from_proto(e: pb::Experiment) -> ExperimentDef {
    ExperimentDef {
        id: e.id,
        layer: e.layer,
        traffic: e.traffic,
        status: if e.status.is_empty() {
            running()
        } else {
            e.status
        },
        variants: e
            .variants
            .into_iter()
            .map(|v| VariantDef {
                name: v.name,
                weight: v.weight,
                params: v.params.into_iter().collect(),
            })
            .collect(),
    }
}

/// Shared state of both gRPC services.
#[derive(Debug, Clone)]
pub struct Experiments {
    set: Arc<RwLock<ExperimentSet>>,
    token: Arc<str>,
}

impl Experiments {
    /// State from `config` (its experiments file, or the demo set).
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        let text = if config.experiments_file.is_empty() {
            DEMO_EXPERIMENTS.to_owned()
        } else {
            std::fs::read_to_string(&config.experiments_file)
                .map_err(|e| ConfigError::invalid("experiments_file", e.to_string()))?
        };
        let set = parse_file(&text).map_err(|e| {
            ConfigError::invalid(format!("experiments_file: {}", e.field), e.reason)
        })?;
        if config.admin_token.is_empty() {
            tracing::warn!(
                "experiments admin API is open: set admin_token (RECMESH_ADMIN_TOKEN) outside local demos"
            );
        }
        Ok(Experiments {
            set: Arc::new(RwLock::new(set)),
            token: Arc::from(config.admin_token.as_str()),
        })
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.token.is_empty() {
            return Ok(());
        }
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "admin API needs `authorization: Bearer <token>`",
            ));
        };
        let presented = value
            .to_str()
            .unwrap_or_default()
            .strip_prefix("Bearer ")
            .unwrap_or_default();
        if constant_time_eq(presented.as_bytes(), self.token.as_bytes()) {
            Ok(())
        } else {
            Err(Status::permission_denied("admin token not accepted"))
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ExperimentSet> {
        self.set.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl pb::experiments_server::Experiments for Experiments {
    async fn assign(
        &self,
        request: Request<pb::AssignRequest>,
    ) -> Result<Response<pb::AssignResponse>, Status> {
        let req = request.into_inner();
        check_id("user_id", &req.user_id)?;
        let set = self.read();
        Ok(Response::new(pb::AssignResponse {
            assignments: set.assign(&req.user_id),
            config_version: set.version,
        }))
    }
}

#[tonic::async_trait]
impl pb::experiments_admin_server::ExperimentsAdmin for Experiments {
    async fn put_experiment(
        &self,
        request: Request<pb::PutExperimentRequest>,
    ) -> Result<Response<pb::PutExperimentResponse>, Status> {
        self.authorize(&request)?;
        let e = request
            .into_inner()
            .experiment
            .ok_or_else(|| FieldError::new("experiment", "is required"))?;
        let expected = (e.version > 0).then_some(e.version);
        let def = from_proto(e);
        let version = self
            .set
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .put(def.clone(), expected)
            .map_err(|err| FieldError::new(format!("experiment.{}", err.field), err.reason))?;
        tracing::info!(experiment = %def.id, version, "experiment accepted");
        Ok(Response::new(pb::PutExperimentResponse { version }))
    }

    async fn get_experiment(
        &self,
        request: Request<pb::GetExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        self.authorize(&request)?;
        let id = request.into_inner().id;
        self.read()
            .experiments
            .iter()
            .find(|(e, _)| e.id == id)
            .map(|(e, v)| Response::new(to_proto(e, *v)))
            .ok_or_else(|| Status::not_found(format!("id: no experiment `{id}`")))
    }

    async fn list_experiments(
        &self,
        request: Request<pb::ListExperimentsRequest>,
    ) -> Result<Response<pb::ListExperimentsResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(pb::ListExperimentsResponse {
            experiments: self
                .read()
                .experiments
                .iter()
                .map(|(e, v)| to_proto(e, *v))
                .collect(),
        }))
    }
}

/// The experiments server, ready to start or run.
pub fn server(config: Config) -> Result<GrpcServer, ConfigError> {
    let state = Experiments::new(&config)?;
    Ok(GrpcServer::new("experiments", config.server.clone())
        .add_service(ExperimentsServer::new(state.clone()))
        .add_service(ExperimentsAdminServer::new(state)))
}

/// Serves until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    server(config)?.run(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::experiments_admin_server::ExperimentsAdmin;

    fn experiment(id: &str, layer: &str, traffic: f64) -> ExperimentDef {
        ExperimentDef {
            id: id.into(),
            layer: layer.into(),
            traffic,
            status: "running".into(),
            variants: vec![
                VariantDef {
                    name: "a".into(),
                    weight: 1,
                    params: BTreeMap::new(),
                },
                VariantDef {
                    name: "b".into(),
                    weight: 1,
                    params: BTreeMap::new(),
                },
            ],
        }
    }

    #[test]
    fn defaults_and_demo_set_are_valid() {
        let c: Config = recmesh_server::config::load(None).expect("defaults load");
        assert_eq!(c, Config::default());
        assert_eq!(
            parse_file(DEMO_EXPERIMENTS)
                .expect("demo parses")
                .experiments
                .len(),
            1
        );
    }

    #[test]
    fn assignment_is_deterministic_and_exclusive_within_a_layer() {
        let mut set = ExperimentSet::default();
        set.put(experiment("x", "home", 0.5), None).expect("ok");
        set.put(experiment("y", "home", 0.5), None).expect("ok");
        set.put(experiment("z", "other", 1.0), None).expect("ok");
        let mut in_x = 0;
        for u in 0..2_000 {
            let user = format!("u{u}");
            let a = set.assign(&user);
            assert_eq!(a, set.assign(&user), "deterministic");
            let home: Vec<_> = a.iter().filter(|x| x.experiment_id != "z").collect();
            assert_eq!(
                home.len(),
                1,
                "exactly one experiment of a fully allocated layer"
            );
            assert!(a.iter().any(|x| x.experiment_id == "z"));
            in_x += usize::from(home[0].experiment_id == "x");
        }
        assert!((800..1_200).contains(&in_x), "{in_x}");
    }

    #[test]
    fn invalid_pushes_name_the_field_and_change_nothing() {
        let mut set = ExperimentSet::default();
        set.put(experiment("x", "home", 0.6), None).expect("ok");
        let err = set
            .put(experiment("y", "home", 0.6), None)
            .expect_err("over-allocated");
        assert_eq!(err.field, "traffic");
        let mut bad = experiment("x", "home", 0.6);
        bad.variants[1]
            .params
            .insert("retrieval.candidates".into(), "1".into());
        let err = set.put(bad, None).expect_err("out of range");
        assert_eq!(err.field, "variants[1].params.retrieval.candidates");
        let mut dup = experiment("x", "home", 0.6);
        dup.variants[1].name = "a".into();
        assert_eq!(
            set.put(dup, None).expect_err("dup").field,
            "variants[1].name"
        );
        assert_eq!(
            set.put(experiment("x", "home", 0.6), Some(99))
                .expect_err("stale")
                .field,
            "version"
        );
        assert_eq!(set.experiments.len(), 1);
        assert_eq!(set.experiments[0].1, 1, "previous version still serving");
    }

    #[tokio::test]
    async fn admin_needs_the_token() {
        let config = Config {
            admin_token: "s3cret".into(),
            ..Config::default()
        };
        let svc = Experiments::new(&config).expect("state");
        let err = svc
            .list_experiments(Request::new(pb::ListExperimentsRequest {}))
            .await
            .expect_err("no token");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut req = Request::new(pb::ListExperimentsRequest {});
        req.metadata_mut()
            .insert("authorization", "Bearer nope".parse().expect("ascii"));
        assert_eq!(
            svc.list_experiments(req).await.expect_err("wrong").code(),
            tonic::Code::PermissionDenied
        );
        let mut req = Request::new(pb::ListExperimentsRequest {});
        req.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().expect("ascii"));
        assert_eq!(
            svc.list_experiments(req)
                .await
                .expect("ok")
                .into_inner()
                .experiments
                .len(),
            1
        );
    }
}
