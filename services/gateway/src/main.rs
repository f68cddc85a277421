//! `recmesh-gateway`: the gateway service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recmesh_server::telemetry::init_tracing();
    let Some(config) =
        recmesh_server::config::from_args::<recmesh_gateway::Config>("recmesh-gateway")?
    else {
        return Ok(());
    };
    recmesh_gateway::run(config, recmesh_server::shutdown_signal()).await?;
    Ok(())
}
