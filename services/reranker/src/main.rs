//! `recmesh-reranker`: the reranker service on its own.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recmesh_server::telemetry::init_tracing();
    let Some(config) =
        recmesh_server::config::from_args::<recmesh_reranker::Config>("recmesh-reranker")?
    else {
        return Ok(());
    };
    recmesh_reranker::run(config, recmesh_server::shutdown_signal()).await?;
    Ok(())
}
