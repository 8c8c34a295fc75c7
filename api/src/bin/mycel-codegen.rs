//! Writes mycel's CRDs into a directory: `mycel-codegen <dir>` (what `cargo xtask codegen`
//! runs, with `<workspace>/manifests/crds`).

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: mycel-codegen <directory to write the CRDs into>");
        return ExitCode::from(64);
    };
    let dir = PathBuf::from(dir);
    let files = match mycel_api::crd_files() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("error: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (name, contents) in files {
        let path = dir.join(name);
        // Unchanged files are left alone so that their modification time says something.
        if std::fs::read_to_string(&path).is_ok_and(|old| old == contents) {
            println!("unchanged {}", path.display());
            continue;
        }
        if let Err(e) = std::fs::write(&path, contents) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
