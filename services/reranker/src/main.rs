//! `recmesh-reranker`: the reranker service on its own.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    recmesh_server::telemetry::init_tracing();
    recmesh_server::exit_code(run().await)
}

async fn run() -> anyhow::Result<()> {
    let Some(config) =
        recmesh_server::config::from_args::<recmesh_reranker::Config>("recmesh-reranker")?
    else {
        return Ok(());
    };
    recmesh_reranker::run(config, recmesh_server::shutdown_signal()).await
}
