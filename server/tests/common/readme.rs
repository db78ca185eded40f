//! The README's sections and ```sh blocks, for tests that run the documented commands as written.

/// The repository's README.md.
pub fn readme() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    std::fs::read_to_string(path).expect("README.md")
}

/// The text of the README section under `heading` (up to the next `## ` heading).
pub fn section<'a>(readme: &'a str, heading: &str) -> &'a str {
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no {heading:?} section"));
    let body = &readme[start + heading.len() + 2..];
    match body.find("\n## ") {
        Some(end) => &body[..end],
        None => body,
    }
}

/// The ```sh blocks of `text`, in order.
pub fn sh_blocks(text: &str) -> Vec<String> {
    let mut blocks = vec![];
    let mut rest = text;
    while let Some(i) = rest.find("```sh\n") {
        let body = &rest[i + 6..];
        let end = body.find("```").expect("an unterminated ```sh block");
        blocks.push(body[..end].to_string());
        rest = &body[end + 3..];
    }
    blocks
}

/// The first ```sh block of the README section under `heading`.
pub fn first_sh_block(heading: &str) -> String {
    sh_blocks(section(&readme(), heading))
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("README.md's {heading:?} section has no ```sh block"))
}
