//! Compiles `proto/recmesh/v1/*.proto` with protox (pure Rust, no system
//! `protoc`) and writes the descriptor set reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script binary reused from a shared target
    // directory may have been compiled for a checkout at another path.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("recmesh/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    let fds = protox::compile(&files, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("recmesh_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // A candidate has one to three source scores. A BTreeMap holds them in
        // one allocation with no hashing; a HashMap per candidate, hundreds
        // per call, showed in every stage's decode profile.
        .btree_map(".recmesh.v1.Candidate.source_scores")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
