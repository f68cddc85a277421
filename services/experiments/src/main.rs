//! `recmesh-experiments`: the experiments service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recmesh_server::telemetry::init_tracing();
    let Some(config) =
        recmesh_server::config::from_args::<recmesh_experiments::Config>("recmesh-experiments")?
    else {
        return Ok(());
    };
    recmesh_experiments::run(config, recmesh_server::shutdown_signal()).await?;
    Ok(())
}
