//! `recmesh-reranker`: the reranker service on its own.

fn main() -> std::process::ExitCode {
    recmesh_server::service_main("recmesh-reranker", |config, stop| {
        recmesh_reranker::run(config, stop)
    })
}
