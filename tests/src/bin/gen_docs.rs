//! Write the generated man pages and completions into the repository
//! (`cargo run -p wasmcore-tests --bin wasmcore-gen-docs`, or `make docs`).

fn main() -> std::io::Result<()> {
    let root = wasmcore_tests::repo();
    for (path, bytes) in wasmcore_tests::docs::generated() {
        let full = root.join(&path);
        std::fs::create_dir_all(full.parent().expect("a parent directory"))?;
        std::fs::write(&full, bytes)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
