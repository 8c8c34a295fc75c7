//! `cargo xtask codegen`: writes the generated files (today the CRDs under
//! `manifests/crds/`) from the Rust types.
//!
//! The generator is the `mycel-codegen` binary of the `mycel-api` crate rather than code in
//! xtask, so that xtask stays free of kube and k8s-openapi: it builds quickly and before
//! `cargo xtask setup` has installed anything.

use crate::workspace::Ctx;

/// Where the CRDs go, from the workspace root: the plain manifests (mycel-api's
/// `CRD_DIR`) and the Helm chart's `crds/` (Helm installs those before the templates).
const CRD_DIRS: [&str; 2] = ["manifests/crds", "manifests/helm/mycel/crds"];

/// Regenerates the CRDs.
pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    for dir in CRD_DIRS {
        let cmd = ctx
            .cargo()
            .args([
                "run",
                "--quiet",
                "-p",
                "mycel-api",
                "--bin",
                "mycel-codegen",
                "--",
            ])
            .arg(ctx.root.join(dir));
        println!("==> {cmd}");
        cmd.run()?;
    }
    Ok(())
}
