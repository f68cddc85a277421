//! `recmesh-retrieval`: the retrieval service on its own.

fn main() -> std::process::ExitCode {
    recmesh_server::service_main("recmesh-retrieval", |config, stop| {
        recmesh_retrieval::run(config, stop)
    })
}
