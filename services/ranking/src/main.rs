//! `recmesh-ranking`: the ranking service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recmesh_server::telemetry::init_tracing();
    let Some(config) =
        recmesh_server::config::from_args::<recmesh_ranking::Config>("recmesh-ranking")?
    else {
        return Ok(());
    };
    recmesh_ranking::run(config, recmesh_server::shutdown_signal()).await?;
    Ok(())
}
