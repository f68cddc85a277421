//! `recmesh-ranking`: the ranking service on its own.

fn main() -> std::process::ExitCode {
    recmesh_server::service_main("recmesh-ranking", |config, stop| {
        recmesh_ranking::run(config, stop)
    })
}
