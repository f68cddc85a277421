//! `recmesh-features`: the features service on its own.

fn main() -> std::process::ExitCode {
    recmesh_server::service_main("recmesh-features", |config, stop| {
        recmesh_features::run(config, stop)
    })
}
