//! Sections of README.md that commands write: the kernel matrix (`test-kernels
//! --update-readme`) and benchmark tables (`bench <name> --update-readme`).
//!
//! A section is everything between a line starting with `<!-- NAME:begin` and the line
//! `<!-- NAME:end -->`; the rest of the README is left as it is.

use std::path::Path;

use anyhow::Context as _;

/// Replaces section `name` of the README at `path` with `body`.
pub fn update_section(path: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let text = replace_section(&text, name, body).with_context(|| {
        format!(
            "{} has no `<!-- {name}:begin -->` … `<!-- {name}:end -->` section",
            path.display()
        )
    })?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("==> updated the {name} section of {}", path.display());
    Ok(())
}

/// `text` with section `name` holding `body`; `None` without the markers.
fn replace_section(text: &str, name: &str, body: &str) -> Option<String> {
    let begin = format!("<!-- {name}:begin");
    let end = format!("<!-- {name}:end -->");
    let at = text.find(&begin)?;
    let start = at + text[at..].find('\n')? + 1;
    let stop = start + text[start..].find(&end)?;
    Some(format!(
        "{}{}\n{}",
        &text[..start],
        body.trim_matches('\n'),
        &text[stop..]
    ))
}

#[cfg(test)]
mod tests {
    use super::replace_section;

    #[test]
    fn replaces_only_the_marked_section() {
        let text = "intro\n<!-- t:begin (how) -->\nold\ntable\n<!-- t:end -->\nafter\n";
        assert_eq!(
            replace_section(text, "t", "\nnew\n").as_deref(),
            Some("intro\n<!-- t:begin (how) -->\nnew\n<!-- t:end -->\nafter\n")
        );
        let empty = "<!-- t:begin -->\n<!-- t:end -->\n";
        assert_eq!(
            replace_section(empty, "t", "x").as_deref(),
            Some("<!-- t:begin -->\nx\n<!-- t:end -->\n")
        );
        assert_eq!(replace_section("no markers", "t", "x"), None);
    }
}
