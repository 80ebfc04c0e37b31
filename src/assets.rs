//! Where the demo assets (the MiniLM encoder, the SmolLM2 tokenizer) are, so that the job
//! spec defaults that name them work from any working folder.
//!
//! The folder is, in this order:
//! 1. `QUAD_ASSETS`, when set;
//! 2. the installed assets folder: the nearest folder named `assets` beside the running binary
//!    or in a folder above it (the repository's `assets` for `target/release/quad`);
//! 3. `assets` in the repository quad was compiled from (`CARGO_MANIFEST_DIR`, fixed at build
//!    time), when the binary was moved away from it.
use std::path::{Path, PathBuf};

/// The environment variable that names the assets folder.
pub const ASSETS_ENV: &str = "QUAD_ASSETS";

/// The assets folder and how it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetsDir {
    pub path: PathBuf,
    pub found_by: FoundBy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundBy {
    Env,
    Binary,
    CompileTime,
}

impl std::fmt::Display for AssetsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self.found_by {
            FoundBy::Env => format!("from {ASSETS_ENV}"),
            FoundBy::Binary => "the installed assets folder, found from quad's binary".into(),
            FoundBy::CompileTime => {
                "the assets folder of the repository quad was built from".into()
            }
        };
        write!(f, "{} ({how})", self.path.display())
    }
}

/// The assets folder (see the module's doc for the order).
pub fn assets_dir() -> AssetsDir {
    if let Some(dir) = std::env::var_os(ASSETS_ENV).filter(|v| !v.is_empty()) {
        return AssetsDir {
            path: PathBuf::from(dir),
            found_by: FoundBy::Env,
        };
    }
    let beside_binary = std::env::current_exe()
        .ok()
        .and_then(|exe| nearest_assets(&exe));
    match beside_binary {
        Some(path) => AssetsDir {
            path,
            found_by: FoundBy::Binary,
        },
        None => AssetsDir {
            path: Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"),
            found_by: FoundBy::CompileTime,
        },
    }
}

/// The nearest `assets` folder beside `exe` or in a folder above it.
fn nearest_assets(exe: &Path) -> Option<PathBuf> {
    exe.ancestors()
        .skip(1)
        .map(|dir| dir.join("assets"))
        .find(|dir| dir.is_dir())
}

/// A default that names a demo asset: `relative` (e.g. "minilm/...") in the assets folder.
pub fn default_asset(relative: &str) -> PathBuf {
    assets_dir().path.join(relative)
}

/// For an error about `key` whose value is `value`: when `value` is the default
/// `default_asset(relative)`, a sentence that says so and how to set it; empty otherwise.
pub fn default_note(key: &str, value: &Path, relative: &str) -> String {
    let dir = assets_dir();
    if value != dir.path.join(relative) {
        return String::new();
    }
    format!(
        " ({key} is not set: its default is the demo asset {relative} in {dir}; set {key} in the \
         job spec, or {ASSETS_ENV} to the folder that holds the demo assets)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_assets_folder_above_the_binary_is_found() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("repo/target/release");
        std::fs::create_dir_all(&bin).unwrap();
        assert_eq!(nearest_assets(&bin.join("quad")), None);
        std::fs::create_dir_all(root.path().join("repo/assets")).unwrap();
        assert_eq!(
            nearest_assets(&bin.join("quad")),
            Some(root.path().join("repo/assets"))
        );
    }

    #[test]
    fn the_note_names_the_default_only_for_the_default() {
        let default = default_asset("minilm/model");
        let note = default_note("embed.model", &default, "minilm/model");
        assert!(note.contains("embed.model is not set"), "{note}");
        assert!(note.contains(ASSETS_ENV), "{note}");
        assert_eq!(
            default_note("embed.model", Path::new("/elsewhere"), "minilm/model"),
            ""
        );
    }
}
