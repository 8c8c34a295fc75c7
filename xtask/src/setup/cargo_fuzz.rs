//! cargo-fuzz, which builds and runs the fuzz targets in `fuzz/` with libFuzzer (under the
//! nightly toolchain setup already installs).

use super::{Check, Step};
use crate::{
    cmd::{self, Cmd},
    workspace::Ctx,
};

/// The cargo-fuzz releases the fuzz workspace is known to work with.
const VERSION_REQ: &str = "^0.13";
/// The same, as `cargo fuzz --version` prints it.
const VERSION_PREFIX: &str = "cargo-fuzz 0.13.";

/// Checks that `cargo-fuzz` runs and is 0.13.
pub fn check(ctx: &Ctx) -> Check {
    let what = "cargo-fuzz 0.13".to_owned();
    let Some(path) = cmd::which("cargo-fuzz") else {
        return Check::missing(what, install_step(ctx, false, "installing"));
    };
    match Cmd::new(&path).args(["fuzz", "--version"]).probe() {
        Some(v) if v.trim().starts_with(VERSION_PREFIX) => {
            Check::present(what, path.display().to_string())
        }
        other => {
            let found = other.map_or_else(|| "does not run".to_owned(), |v| v.trim().to_owned());
            let verb = format!("reinstalling ({}: {found})", path.display());
            Check::missing(what, install_step(ctx, true, &verb))
        }
    }
}

fn install_step(ctx: &Ctx, force: bool, verb: &str) -> Step {
    let install = |locked: bool| {
        Cmd::shown_as(&ctx.cargo, "cargo")
            .args(["install", "cargo-fuzz", "--version", VERSION_REQ])
            .args(locked.then_some("--locked"))
            .args(force.then_some("--force"))
            // Away from the workspace, so its .cargo/config.toml does not apply.
            .dir(std::env::temp_dir())
    };
    Step::new(
        format!(
            "{verb} cargo-fuzz 0.13 into {} (about a minute)",
            ctx.cargo_home.join("bin").display()
        ),
        vec![install(true)],
    )
    .with_fallback(install(false))
}
