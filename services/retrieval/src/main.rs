//! `recmesh-retrieval`: the retrieval service on its own.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    recmesh_server::telemetry::init_tracing();
    recmesh_server::exit_code(run().await)
}

async fn run() -> anyhow::Result<()> {
    let Some(config) =
        recmesh_server::config::from_args::<recmesh_retrieval::Config>("recmesh-retrieval")?
    else {
        return Ok(());
    };
    recmesh_retrieval::run(config, recmesh_server::shutdown_signal()).await
}
