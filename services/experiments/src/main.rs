//! `recmesh-experiments`: the experiments service on its own.

fn main() -> std::process::ExitCode {
    recmesh_server::service_main("recmesh-experiments", |config, stop| {
        recmesh_experiments::run(config, stop)
    })
}
