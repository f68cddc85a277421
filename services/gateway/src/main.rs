//! `recmesh-gateway`: the gateway service on its own.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    recmesh_server::service_main("recmesh-gateway", |config, stop| {
        recmesh_gateway::run(config, stop)
    })
    .await
}
