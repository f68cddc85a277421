//! `recmesh-features`: the features service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recmesh_server::telemetry::init_tracing();
    let Some(config) =
        recmesh_server::config::from_args::<recmesh_features::Config>("recmesh-features")?
    else {
        return Ok(());
    };
    recmesh_features::run(config, recmesh_server::shutdown_signal()).await?;
    Ok(())
}
