//! `recmesh-gateway`: the gateway service on its own.

fn main() -> std::process::ExitCode {
    recmesh_server::service_main("recmesh-gateway", |config, stop| {
        recmesh_gateway::run(config, stop)
    })
}
